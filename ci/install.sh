#!/usr/bin/env bash
# Install virnet for development into the active Python (a venv is best): the Cython core
# is compiled in place, and the test extras come along.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip >/dev/null
python -m pip install -e '.[test]'
python -c 'import virnet; print("virnet", virnet.__version__, "compiled core:", virnet.compiled)'
