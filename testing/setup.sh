#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for the test bed: the distribution's HAProxy and
# Prometheus (server and promtool, for contrib/prometheus/), and a virtual environment (.venv)
# with the pinned dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

if ! command -v haproxy >/dev/null || ! command -v systemd-analyze >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq haproxy systemd >/dev/null
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    $sudo apt-get update -qq
    # Without recommends (the node exporter). Where no systemd runs (a container), the
    # package cannot start its service and says so without failing; where one runs, the
    # service it starts is stopped: the tests start their own server on a free port.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now prometheus.service >/dev/null 2>&1
    fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv || { echo "error: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
