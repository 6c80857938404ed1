#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine: installs HAProxy (the
# distribution's package) and a virtual environment with the test dependencies, then
# runs pytest. Extra arguments go to pytest (e.g. -k slots).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq haproxy >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
exec .venv/bin/python -m pytest "$@"
