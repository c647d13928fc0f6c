"""A web UI as a user opens it: its server on a free loopback port, read in headless Chromium (Debian's
package, driven by Playwright). Shared by the MLflow UI and optuna-dashboard tests."""
import contextlib
import os
import signal
import subprocess
import urllib.request

from playwright.sync_api import sync_playwright

from conftest import free_port, wait_for

CHROMIUM = "/usr/bin/chromium"  # scripts/ci_system_deps.sh installs it
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def served(command, ready: str, cwd, viewport: dict, env=None):
    """Starts `command(port)` in its own process group, waits (90 s at most) until `ready` (a path) answers,
    and yields (base URL, a Chromium page); the browser and the server's whole group are gone after."""
    port = free_port()
    server = subprocess.Popen(command(port), cwd=cwd, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _answers(base + ready), 90, every=0.2), f"{command(port)[:3]} did not answer"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport=viewport)
            page.set_default_timeout(30_000)
            yield base, page
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
