#!/usr/bin/env bash
# Sets up .venv (serving + train + dev extras) and runs the checks and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[train,camera,dev]' 2> >(grep -v '^WARNING: Location' >&2)
.venv/bin/python -m ruff check station tests
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q "$@"
