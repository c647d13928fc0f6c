#!/usr/bin/env bash
# System packages the cluster test (tests/test_cluster.py) needs: an sshd it can run as a
# child on 127.0.0.1, rsync (Ray's file_mounts) and nc (the ssh ProxyCommand); and the browser that
# tests/test_mlflow_ui.py opens the MLflow UI in: Debian's chromium, driven by Playwright.
# Idempotent: installs only what is missing. Debian/Ubuntu; run as root (or via sudo).
set -euo pipefail

need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)
[ -x /usr/bin/chromium ] || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
    echo "ci_system_deps: all present"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "ci_system_deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# policy-rc.d in containers may refuse to start the packaged sshd service; that is fine,
# the test runs its own sshd.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
