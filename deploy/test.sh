#!/usr/bin/env bash
# Sets up .venv (serving + train + camera + bridges + dev extras, TensorRT's type stubs) and runs the checks and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# The operator page's browser tests drive Debian's chromium (Playwright's own browser download is not used).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null
fi
# The MES recorder's PostgreSQL tests and the MQTT bridge's tests start real servers: Debian's postgresql and mosquitto.
need=""
{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || need="$need postgresql"
{ command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || need="$need mosquitto"
if [ -n "$need" ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need; } >/dev/null
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[train,camera,bridges,dev]' 2> >(grep -v '^WARNING: Location' >&2)
# TensorRT's API surface for mypy (TensorRT itself installs only from NVIDIA's index).
.venv/bin/python deploy/tensorrt_stubs.py .venv/tensorrt-stubs 2> >(grep -v '^WARNING: Location' >&2)
.venv/bin/python -m ruff check station tests
.venv/bin/python -m mypy
# The layer contract (pyproject.toml [tool.importlinter], docs/architecture.md): layers, no cycles, torch-free serving.
.venv/bin/lint-imports --no-cache
# The same TensorRT code against TensorRT 11's API: stubs made once from NVIDIA's 11.x bindings wheel
# (PyPI), kept in .venv/tensorrt11; a name 11.x removed, outside an `if TENSORRT_10:` branch, fails here.
.venv/bin/python deploy/tensorrt11_check.py station/core/backends 2> >(grep -v '^WARNING: Location' >&2)
# In parallel: most tests wait on a station subprocess or a socket, so 3 workers beat the 2 cores' worth
# (measured on 2 cores: 3 ahead of 2, 4 and 6).
# loadfile keeps a file's tests on one worker (many share a server, a browser or a data set per file);
# tests/conftest.py hands the longest files out first, hence no reordering by xdist. `-n 0` runs serially.
exec .venv/bin/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder "$@"
