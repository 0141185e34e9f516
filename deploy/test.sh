#!/usr/bin/env bash
# Sets up .venv (serving + train + camera + bridges + dev extras, TensorRT's type stubs) and runs the checks and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[train,camera,bridges,dev]' 2> >(grep -v '^WARNING: Location' >&2)
# TensorRT's API surface for mypy (TensorRT itself installs only from NVIDIA's index).
.venv/bin/python deploy/tensorrt_stubs.py .venv/tensorrt-stubs 2> >(grep -v '^WARNING: Location' >&2)
.venv/bin/python -m ruff check station tests
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q "$@"
