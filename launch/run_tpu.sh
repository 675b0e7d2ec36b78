#!/usr/bin/env bash
# Per-worker entry on a TPU VM (run on every worker by launch/tpu_pod.sh):
# creates the virtual environment if missing, installs mtmerge (again only
# when setup.py changed), then runs
#   python -m mtmerge.main --config CONFIG --workdir WORKDIR [EXTRA FLAGS]
# Usage:  bash launch/run_tpu.sh CONFIG WORKDIR [EXTRA FLAGS...]
# Environment:
#   VENV         venv path (default ~/mtmerge-venv, outside the synced repo)
#   JAX_EXTRA    pip extra for jax on this machine (default "tpu" when TPU
#                devices are present, else none)
#   MTMERGE_*, JAX_*, XLA_FLAGS, LIBTPU_INIT_ARGS: passed through unchanged
#                (tpu_pod.sh forwards them from the launching machine).
# Multi-host initialization happens inside mtmerge.main
# (mtmerge.distributed.maybe_initialize detects the TPU pod). Use a gs://
# WORKDIR on pods: every worker must see the same checkpoint directory.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [EXTRA FLAGS...]" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
cd "$(dirname "$0")/.."
VENV=${VENV:-$HOME/mtmerge-venv}
if [ -z "${JAX_EXTRA+x}" ]; then
  if ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then JAX_EXTRA=tpu; else JAX_EXTRA=; fi
fi
STAMP="$VENV/.mtmerge-install-stamp"
WANT="$(sha256sum setup.py | cut -c1-16) jax[$JAX_EXTRA]"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  VENV="$VENV" bash launch/install.sh
  if [ -n "$JAX_EXTRA" ]; then
    "$VENV/bin/python" -m pip install -q -U "jax[$JAX_EXTRA]"
  fi
  echo "$WANT" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
fi
echo "[$(hostname)] $VENV/bin/python -m mtmerge.main --config $CONFIG --workdir $WORKDIR $*"
exec "$VENV/bin/python" -m mtmerge.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
