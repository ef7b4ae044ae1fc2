#!/usr/bin/env bash
# The project's test command (README and .ci/run call exactly this):
#   lint (ruff), types (mypy), then the whole suite twice: with the compiled Cython core
#   (which must be present: a missing extension fails the run) and with the pure-Python
#   core (VIRNET_NO_EXTENSIONS=1). Async tests run on stock asyncio and uvloop each time.
# Extra arguments go to both pytest runs (for example: ci/test.sh -x -k stream).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ruff"
ruff check src tests bench fuzz conftest.py setup.py
echo "== mypy"
mypy

echo "== pytest, compiled core"
python -c 'import virnet, sys; sys.exit(0 if virnet.compiled else "compiled core missing: run pip install -e .")'
python -m pytest -p no:cacheprovider "$@"

echo "== pytest, pure-Python core (VIRNET_NO_EXTENSIONS=1)"
VIRNET_NO_EXTENSIONS=1 python -m pytest -p no:cacheprovider "$@"
