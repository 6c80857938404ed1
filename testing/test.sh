#!/usr/bin/env bash
# The whole test suite (what CI runs): prepares the machine, then runs pytest.
# Extra arguments go to pytest (e.g. -k slots, or testing/test_e2e.py).
set -euo pipefail
cd "$(dirname "$0")/.."
./testing/setup.sh
.venv/bin/ruff check .          # pyproject.toml: the program's lines within 100 columns, pyflakes
exec .venv/bin/python -m pytest "$@"
