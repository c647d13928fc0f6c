"""Bring `cluster/local.yaml` up on this machine, for tests: ray up / submit / down over ssh.

    sys.path.insert(0, str(Path(__file__).parent))   # tests/ is not a package
    from sshd_harness import local_ray_cluster, run_submit

    with local_ray_cluster(tmp_path) as cluster:
        proc = cluster.submit("sweeps/gopc2_stability.py", "--preset", "smoke", env={"X": "1"})
        assert proc.returncode == 0, proc.stdout
    # or, one shot (up, submit, down):
    proc = run_submit("sweeps/gopc2_stability.py", ["--preset", "smoke"], tmp_path=tmp_path)

What it does (all state lives in one short-named temp dir, removed at exit):

* starts a private sshd as our child: `sshd -D -f <tmp>/sshd_config`, 127.0.0.1 only, a
  free port, key-only auth, a host key and authorized_keys made fresh in tmp. sshd's
  `SetEnv HOME=<tmp>/node` gives the "remote" node its own home, so nothing Ray puts in
  `~` (the synced project, ray_bootstrap_*.yaml/pem, the submitted script, the token,
  ~/.bashrc edits, ~/mlflow) touches the real home;
* the node's ~/.bashrc puts a private venv first on PATH (`--system-site-packages`, so the
  already-installed deps are reused) so local.yaml's `python -m pip install -e` lands in
  the venv, not in the system site-packages, and `ray start` runs the venv's python (so
  Ray workers import the synced `gopc`). It also sets RAY_TMPDIR, so the cluster's
  session dir and `ray_current_cluster` live in tmp: a plain `ray.init()` elsewhere on the
  machine never reads our address file (nor /tmp/ray/ray_current_cluster goes stale);
* derives a copy of cluster/local.yaml (head_ip 127.0.0.1, no workers, ssh_user = us,
  our key, `ssh_proxy_command: nc 127.0.0.1 <port>`, a unique cluster_name, free ports
  for Ray's GCS and MLflow, a tmp dir for GOPC_STORAGE) and validates it;
* `ray up -y`, then `.submit()` = `ray submit`, and at exit `ray down -y`, the MLflow
  server's process group, our ssh ControlMaster connections and sshd are stopped, and it
  verifies that no process of ours (Ray, sshd, mlflow, ssh) is left; if one is, it is
  killed and HarnessError is raised.

`ray up`/`ray down` run `ray stop` on the node, which normally kills *every* Ray process on
the machine (other people's clusters and `ray.init()` sessions included). The node's `ray`
is a wrapper whose `ray stop` only sees processes carrying this cluster's RAY_TMPDIR, so
the harness can run next to other Ray users on a shared box.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional

import yaml

from conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_YAML = REPO_ROOT / "cluster" / "local.yaml"
DEPS_SCRIPT = "scripts/ci_system_deps.sh"


class HarnessError(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers


def find_sshd() -> Optional[str]:
    for cand in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def missing_system_tools() -> list[str]:
    missing = [] if find_sshd() else ["sshd (openssh-server)"]
    for tool, pkg in (("ssh", "openssh-client"), ("ssh-keygen", "openssh-client"),
                      ("rsync", "rsync"), ("nc", "netcat-openbsd")):
        if not shutil.which(tool):
            missing.append(f"{tool} ({pkg})")
    return missing


def require_system_tools() -> None:
    missing = missing_system_tools()
    if missing:
        raise HarnessError(
            "the local Ray cluster test needs " + ", ".join(missing)
            + f"; install them with `sudo bash {DEPS_SCRIPT}` (Debian/Ubuntu)")


def _ray_cli() -> str:
    """The launcher-side `ray` of the interpreter running the tests."""
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


def validate_cluster_config(config: Mapping) -> dict:
    """prepare_config + validate_config, offline; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(dict(config)))
    validate_config(prepared)
    return prepared


def _replace_in_commands(cfg: dict, old: str, new: str) -> int:
    n = 0
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        cmds = cfg.get(key) or []
        n += sum(c.count(old) for c in cmds)
        cfg[key] = [c.replace(old, new) for c in cmds]
    return n


def derive_local_config(*, ssh_user: str, ssh_private_key: str, ssh_port: int,
                        cluster_name: str, ray_port: int, mlflow_port: int,
                        storage_path: str, source: Path = LOCAL_YAML) -> dict:
    """cluster/local.yaml pointed at 127.0.0.1:<ssh_port>, single node, private ports."""
    cfg = yaml.safe_load(source.read_text())
    cfg["cluster_name"] = cluster_name
    cfg["provider"]["head_ip"] = "127.0.0.1"
    cfg["provider"]["worker_ips"] = []
    cfg["auth"] = {
        "ssh_user": ssh_user,
        "ssh_private_key": ssh_private_key,
        "ssh_proxy_command": f"nc 127.0.0.1 {ssh_port}",
    }
    # Fixed ports of the committed file -> free ones (other Ray/MLflow users on the box).
    for old, new in ((":6379", f":{ray_port}"), ("=6379", f"={ray_port}"),
                     ("127.0.0.1:5000", f"127.0.0.1:{mlflow_port}"),
                     ("--port 5000", f"--port {mlflow_port}"),
                     ("/mnt/nfs/gopc-sweeps", storage_path)):
        if not _replace_in_commands(cfg, old, new):
            raise HarnessError(f"cluster/local.yaml no longer contains {old!r}; update the harness")
    return cfg


def _psutil():
    """psutil as vendored by Ray (ray/thirdparty_files is put on sys.path by `import ray`)."""
    try:
        import psutil
    except ImportError:
        import ray  # noqa: F401  (vendored psutil)

        import psutil
    return psutil


def _proc_env(p) -> dict:
    try:
        return p.environ()
    except Exception:
        return {}


def _proc_cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except Exception:
        return ""


# --------------------------------------------------------------------------- handle


@dataclass
class LocalRayCluster:
    """Handle to a running single-node cluster made from cluster/local.yaml."""

    root: Path                 # everything of ours lives here (short path: unix sockets)
    yaml_path: Path            # the derived, validated config that ray up/submit/down use
    config: dict               # its contents
    cluster_name: str
    ssh_port: int
    ray_port: int
    mlflow_port: int
    node_home: Path            # $HOME of the "remote" node (sshd SetEnv)
    client_home: Path          # $HOME of the launching side (holds the token we ship)
    storage_path: Path         # GOPC_STORAGE on the node
    ray_tmpdir: Path           # RAY_TMPDIR on the node
    venv: Path
    launcher_env: dict = field(repr=False, default_factory=dict)
    log: list = field(repr=False, default_factory=list)
    sshd: Optional[subprocess.Popen] = field(repr=False, default=None)
    up_seconds: float = 0.0

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    # -- ray CLI -----------------------------------------------------------------------
    def ray(self, *args: str, timeout: float = 600, check: bool = False,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """Run the `ray` CLI on the launching side (cwd = repo root) and capture output."""
        cmd = [_ray_cli(), *args]
        run_env = dict(self.launcher_env)
        if env:
            run_env.update(env)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        self.log.append((args, proc.returncode, time.monotonic() - t0))
        if check and proc.returncode != 0:
            raise HarnessError(f"`ray {' '.join(args)}` failed ({proc.returncode}):\n"
                               f"{proc.stdout[-6000:]}")
        return proc

    def submit(self, script: os.PathLike | str, *args: str,
               env: Optional[Mapping[str, str]] = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray submit <derived yaml> <script> -- <args>`; returns the CompletedProcess.

        The script is copied to ~/<basename> on the head and run there as
        `python ~/<basename> args` in a login shell (GOPC_STORAGE, GOPC_TRACKING_URI,
        RAY_AUTH_MODE set by local.yaml, cwd = node home). `env` adds environment
        variables for that driver process (ray submit has no option for it, so they go
        into a file the node's ~/.bashrc sources, removed afterwards). Args are
        shell-quoted, because ray joins them into a shell command line. stdout+stderr
        are merged in `.stdout`. Relative script paths are relative to the repo root.
        """
        script = Path(script)
        if not script.is_absolute():
            script = REPO_ROOT / script
        if not script.is_file():
            raise HarnessError(f"no such script: {script}")
        env_file = self.node_home / ".harness_submit_env"
        if env:
            env_file.write_text("".join(f"export {k}={shlex.quote(str(v))}\n"
                                        for k, v in env.items()))
        try:
            return self.ray("submit", str(self.yaml_path), str(script), "--",
                            *[shlex.quote(str(a)) for a in args], timeout=timeout)
        finally:
            env_file.unlink(missing_ok=True)
            (self.node_home / script.name).unlink(missing_ok=True)

    def exec(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray exec <derived yaml> <command>` on the head."""
        return self.ray("exec", str(self.yaml_path), command, timeout=timeout)


# --------------------------------------------------------------------------- setup


def _run(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, **kw)


# The node's `ray` command. Identical to Ray's console script except for `ray stop`:
# local.yaml's start commands and `ray down` both run `ray stop`, which kills every Ray
# process on the machine - on a shared dev/CI box that includes other people's clusters
# and `ray.init()` sessions. Here it only sees processes whose RAY_TMPDIR is this
# cluster's (every process the node's shells start inherits it), and otherwise runs the
# real `ray stop` (same signals, grace period, address-file cleanup).
_RAY_WRAPPER = """\
import os
import sys

if sys.argv[1:2] == ["stop"] and os.environ.get("RAY_TMPDIR"):
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    _iter, _mine = psutil.process_iter, os.environ["RAY_TMPDIR"]

    def _scoped(*args, **kwargs):
        for proc in _iter(*args, **kwargs):
            try:
                if proc.environ().get("RAY_TMPDIR") == _mine:
                    yield proc
            except psutil.Error:
                pass

    psutil.process_iter = _scoped

from ray.scripts.scripts import main

sys.exit(main())
"""


def _make_venv(venv: Path) -> None:
    # --without-pip: `python -m pip` falls back to the system pip module but installs into
    # the venv (sys.prefix); --system-site-packages reuses torch/ray/mlflow/... as is.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    # --system-site-packages only exposes the *base* interpreter's packages; when the tests run in
    # the project's own venv (make test), its site-packages must be visible too. Paths listed in a
    # .pth are put on sys.path without running their own .pth files, so the test venv's editable
    # `gopc` is not activated there and the node's own `pip install -e` copy wins.
    import site
    (site_dir,) = (venv / "lib").glob("python*/site-packages")
    (site_dir / "zz_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # The venv has no `ray` console script (ray is a system package), and `ray start` must
    # run under the venv's python so Ray workers (started with sys.executable) see the
    # editable `gopc`. A console script is exactly this:
    ray = venv / "bin" / "ray"
    ray.write_text(f"#!{venv}/bin/python\n" + _RAY_WRAPPER)
    ray.chmod(0o755)


def _write_sshd_config(root: Path, port: int) -> Path:
    cfg = root / "sshd_config"
    cfg.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/ssh_host_ed25519_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
X11Forwarding no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
SetEnv HOME={root}/node GOPC_TEST_SESSION={os.environ.get("GOPC_TEST_SESSION", "")}
Subsystem sftp internal-sftp
""")
    return cfg


def _start_sshd(root: Path, port: int) -> subprocess.Popen:
    sshd = find_sshd()
    cfg = _write_sshd_config(root, port)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege-separation dir
    check = subprocess.run([sshd, "-t", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise HarnessError(f"sshd rejected {cfg}: {check.stderr}")
    log = open(root / "sshd.log", "wb")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"sshd exited ({proc.returncode}):\n"
                               + (root / "sshd.log").read_text())
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise HarnessError("sshd did not start listening within 10 s")


def _ssh_probe(root: Path, key: Path, port: int, user: str) -> None:
    cmd = ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={os.devnull}",
           "-o", f"ProxyCommand=nc 127.0.0.1 {port}", "-o", "ConnectTimeout=10",
           f"{user}@127.0.0.1", "bash --login -c -i 'source ~/.bashrc; echo $HOME; command -v python ray'"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    lines = p.stdout.split()
    if p.returncode != 0 or not lines or lines[0] != str(root / "node") \
            or not all(s.startswith(str(root / "venv")) for s in lines[1:3]):
        raise HarnessError(f"ssh probe failed ({p.returncode}): stdout={p.stdout!r} "
                           f"stderr={p.stderr!r}\nsshd log:\n{(root / 'sshd.log').read_text()}")


def _prepare(tmp_path: Path) -> LocalRayCluster:
    # Short root: Ray puts unix sockets under RAY_TMPDIR (<= 107 bytes per path).
    root = Path(tempfile.mkdtemp(prefix="gopc-rc-", dir="/tmp"))
    try:
        return _prepare_in(root, tmp_path)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _prepare_in(root: Path, tmp_path: Path) -> LocalRayCluster:
    (Path(tmp_path) / "local_ray_cluster_root").write_text(str(root))  # breadcrumb
    node_home, client_home = root / "node", root / "client"
    ray_tmpdir, storage, venv = root / "rt", root / "shared" / "gopc-sweeps", root / "venv"
    for d in (node_home, client_home / ".ray", ray_tmpdir, storage, root / "tmp"):
        d.mkdir(parents=True)
    ssh_port, ray_port, mlflow_port = free_port(), free_port(), free_port()
    cluster_name = "gopc-ci-" + root.name.split("-")[-1].lower()
    user = getpass.getuser()

    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshd-harness-host",
          "-f", str(root / "ssh_host_ed25519_key")])
    key = root / "id_ed25519"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshd-harness", "-f", str(key)])
    shutil.copy(root / "id_ed25519.pub", root / "authorized_keys")
    os.chmod(root / "authorized_keys", 0o600)
    _make_venv(venv)

    # The node's login environment. local.yaml's setup commands append `. ~/.gopc_env`.
    (node_home / ".bashrc").write_text(
        f"export PATH={venv}/bin:{Path(sys.executable).parent}:$PATH\n"
        f"export RAY_TMPDIR={ray_tmpdir}\n"
        f"export TMPDIR={root}/tmp\n"
        "export RAY_USAGE_STATS_ENABLED=0\n"
        "[ -f ~/.harness_submit_env ] && . ~/.harness_submit_env\n")

    launcher_env = dict(os.environ)
    for k in [k for k in launcher_env if k.startswith("RAY_")]:
        launcher_env.pop(k)   # no RAY_ADDRESS etc. from the caller
    launcher_env.update(HOME=str(client_home), RAY_TMPDIR=str(root / "tmp"),
                        TMPDIR=str(root / "tmp"), RAY_USAGE_STATS_ENABLED="0",
                        RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    # The token local.yaml ships from the launcher's ~/.ray/auth_token to the node.
    subprocess.run([_ray_cli(), "get-auth-token", "--generate"], env=launcher_env,
                   check=True, capture_output=True, timeout=120)
    if not (client_home / ".ray" / "auth_token").is_file():
        raise HarnessError("`ray get-auth-token --generate` did not write a token")

    cfg = derive_local_config(ssh_user=user, ssh_private_key=str(key), ssh_port=ssh_port,
                              cluster_name=cluster_name, ray_port=ray_port,
                              mlflow_port=mlflow_port, storage_path=str(storage))
    validate_cluster_config(cfg)
    yaml_path = root / "local.yaml"
    yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    return LocalRayCluster(root=root, yaml_path=yaml_path, config=cfg, cluster_name=cluster_name,
                           ssh_port=ssh_port, ray_port=ray_port, mlflow_port=mlflow_port,
                           node_home=node_home, client_home=client_home, storage_path=storage,
                           ray_tmpdir=ray_tmpdir, venv=venv, launcher_env=launcher_env)


# --------------------------------------------------------------------------- teardown


def _ours(p, c: LocalRayCluster) -> bool:
    root = str(c.root)
    if root in _proc_cmdline(p):
        return True
    env = _proc_env(p)
    return any(env.get(k, "").startswith(root) for k in ("RAY_TMPDIR", "HOME", "TMPDIR"))


def _our_processes(c: LocalRayCluster) -> list:
    psutil = _psutil()

    me = os.getpid()
    out = []
    sshd_tree = set()
    if c.sshd is not None:
        with contextlib.suppress(psutil.Error):
            sp = psutil.Process(c.sshd.pid)
            sshd_tree = {p.pid for p in sp.children(recursive=True)} | {sp.pid}
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            if p.pid in sshd_tree or _ours(p, c):
                out.append(p)
    return out


def _kill_group_from_pidfile(pidfile: Path) -> None:
    with contextlib.suppress(Exception):
        pgid = int(pidfile.read_text().strip())
        os.killpg(pgid, signal.SIGTERM)
        for _ in range(50):
            os.killpg(pgid, 0)
            time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)


def _teardown(c: LocalRayCluster, ran_up: bool) -> list[str]:
    psutil = _psutil()

    problems: list[str] = []
    if ran_up:
        down = c.ray("down", "-y", str(c.yaml_path), timeout=300)
        if down.returncode != 0:
            problems.append(f"`ray down` failed ({down.returncode}):\n{down.stdout[-3000:]}")
    # local.yaml's MLflow server (ray down does not stop it; on a real cloud the node goes).
    _kill_group_from_pidfile(c.node_home / "mlflow" / "server.pid")
    # ssh ControlMaster connections (ControlPersist) that Ray's ssh calls left: ours all
    # carry our key path on their command line.
    for p in _our_processes(c):
        with contextlib.suppress(psutil.Error):
            if p.name() == "ssh":
                p.terminate()
    psutil.wait_procs([p for p in _our_processes(c) if _safe_name(p) == "ssh"], timeout=5)
    # sshd: session children first, then the listener (a killed listener leaves sessions).
    if c.sshd is not None and c.sshd.poll() is None:
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(c.sshd.pid).children(recursive=True)
            for k in kids:
                with contextlib.suppress(psutil.Error):
                    k.terminate()
            psutil.wait_procs(kids, timeout=5)
        c.sshd.terminate()
        try:
            c.sshd.wait(10)
        except subprocess.TimeoutExpired:
            c.sshd.kill()
            c.sshd.wait(10)
    # Anything of ours still alive now is a leak: report, then kill it.
    deadline = time.monotonic() + 15
    left = _our_processes(c)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _our_processes(c)
    if left:
        desc = [f"{p.pid} {_safe_name(p)} {_proc_cmdline(p)[:160]}" for p in left]
        problems.append("processes left behind:\n  " + "\n  ".join(desc))
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=5)
    if (c.ray_tmpdir / "ray" / "ray_current_cluster").exists():
        problems.append(f"stale {c.ray_tmpdir}/ray/ray_current_cluster after ray down")
    # Ray's ssh control-socket dir is hard-coded to /tmp/ray_ssh_<user hash>/<cluster hash>.
    user_h = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    cluster_h = hashlib.sha256(c.cluster_name.encode()).hexdigest()[:10]
    shutil.rmtree(f"/tmp/ray_ssh_{user_h}/{cluster_h}", ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(f"/tmp/ray_ssh_{user_h}")  # only if now empty
    return problems


def _safe_name(p) -> str:
    try:
        return p.name()
    except Exception:
        return "?"


# --------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def local_ray_cluster(tmp_path: os.PathLike | str, *, up_timeout: float = 600,
                      keep_on_failure: bool = False) -> Iterator[LocalRayCluster]:
    """`ray up` cluster/local.yaml against a private sshd on 127.0.0.1; `ray down` at exit.

    Raises HarnessError if tools are missing, `ray up` fails, or anything of ours is left
    running after teardown.
    """
    require_system_tools()
    default_address_file = Path("/tmp/ray/ray_current_cluster")  # what ray.init() finds

    c = _prepare(Path(tmp_path))
    ran_up = False
    failed = True
    problems: list[str] = []
    try:
        c.sshd = _start_sshd(c.root, c.ssh_port)
        _ssh_probe(c.root, c.root / "id_ed25519", c.ssh_port, getpass.getuser())
        t0 = time.monotonic()
        ran_up = True
        up = c.ray("up", "-y", "--no-config-cache", "--disable-usage-stats",
                   str(c.yaml_path), timeout=up_timeout)
        c.up_seconds = time.monotonic() - t0
        if up.returncode != 0:
            raise HarnessError(f"`ray up` failed ({up.returncode}):\n{up.stdout[-8000:]}")
        yield c
        failed = False
    finally:
        try:
            problems = _teardown(c, ran_up)
        finally:
            with contextlib.suppress(OSError):
                if default_address_file.read_text().strip().endswith(f":{c.ray_port}"):
                    problems.append(f"{default_address_file} points at our cluster "
                                    "(RAY_TMPDIR not honoured?)")
            if not (keep_on_failure and (failed or problems)):
                shutil.rmtree(c.root, ignore_errors=True)
    if problems:
        raise HarnessError("local cluster teardown: " + "\n".join(problems))


def run_submit(script: os.PathLike | str, args: tuple | list = (), *,
               tmp_path: os.PathLike | str, env: Optional[Mapping[str, str]] = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """One-shot: ray up cluster/local.yaml, `ray submit` script with args, ray down.

    Returns the submit's CompletedProcess (stdout+stderr merged in `.stdout`); teardown
    problems (leftover processes, failed ray down) raise HarnessError after it.
    """
    with local_ray_cluster(tmp_path) as cluster:
        return cluster.submit(script, *args, env=env, timeout=timeout)
