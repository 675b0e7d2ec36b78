#!/usr/bin/env bash
# Installs mtmerge into .venv (if needed) and runs a config on this machine.
#   bash launch/local.sh [CONFIG] [WORKDIR]
# e.g. bash launch/local.sh configs/default.py:runlocal /tmp/quick
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONFIG=${1:-configs/default.py}
WORKDIR=${2:-runs/default}
VENV="$VENV" bash launch/install.sh
exec "$VENV/bin/python" -m mtmerge.main --config "$CONFIG" --workdir "$WORKDIR"
