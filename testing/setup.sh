#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for the test bed: the distribution's HAProxy and a
# virtual environment (.venv) with the pinned dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null || ! command -v systemd-analyze >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq haproxy systemd >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv || { echo "error: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
