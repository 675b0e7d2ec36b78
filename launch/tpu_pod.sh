#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM (single host or pod slice).
#   launch/tpu_pod.sh [OPTIONS] TPU_NAME ZONE CONFIG WORKDIR [EXTRA FLAGS...]
# e.g.
#   launch/tpu_pod.sh my-v5e-32 us-west4-a configs/default.py gs://bkt/run1
#   launch/tpu_pod.sh --dry-run my-v5e-32 us-west4-a configs/default.py \
#       gs://bkt/run1 --config.seed=1
# Options (before TPU_NAME):
#   --dry-run          print the gcloud commands, run nothing
#   --project ID       gcloud project (default: gcloud's configured one)
#   --env NAME=VALUE   set a variable on the workers (repeatable); MTMERGE_*
#                      variables of this shell are forwarded as well
#   --detach           run in the background on the workers (log in
#                      ~/mtmerge-run.log there) instead of streaming output
# Steps: (1) pack this checkout (tracked and untracked, not ignored, files),
# (2) copy it to every worker and unpack it into ~/mtmerge (swapped in
# whole, so deleted files disappear), (3) run launch/run_tpu.sh on all
# workers at once with `gcloud compute tpus tpu-vm ssh --worker=all`; each
# worker creates/updates its venv and runs mtmerge.main, which initializes
# jax.distributed itself. CONFIG is relative to the repository root; use a
# gs:// WORKDIR on pods so every worker sees the same checkpoints.
set -euo pipefail
DRY=0; DETACH=0; PROJECT=(); ENVS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --detach) DETACH=1; shift ;;
    --project) PROJECT=(--project "$2"); shift 2 ;;
    --project=*) PROJECT=(--project "${1#--project=}"); shift ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --env=*) ENVS+=("${1#--env=}"); shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    --*) echo "tpu_pod.sh: unknown option $1 (options go before TPU_NAME)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 4 ]; then
  echo "usage: $0 [--dry-run] [--project ID] [--env NAME=VALUE] [--detach] TPU_NAME ZONE CONFIG WORKDIR [EXTRA FLAGS...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$ROOT/${CONFIG%%:*}" ]; then
  echo "tpu_pod.sh: config file ${CONFIG%%:*} not found under $ROOT" >&2
  exit 2
fi
for e in "${ENVS[@]+"${ENVS[@]}"}"; do
  case "$e" in [A-Za-z_]*=*) ;; *) echo "tpu_pod.sh: --env needs NAME=VALUE, got '$e'" >&2; exit 2 ;; esac
done
while IFS='=' read -r name _; do
  ENVS+=("$name=${!name}")
done < <(env | grep -E '^MTMERGE_[A-Za-z0-9_]*=' || true)

# Shell-quotes its arguments (single quotes, only where needed) so printed
# commands can be pasted back as they are.
q() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
TARBALL=${TMPDIR:-/tmp}/mtmerge-$TPU_NAME.tgz
REMOTE_RUN="$(q env "${ENVS[@]+"${ENVS[@]}"}" bash launch/run_tpu.sh "$CONFIG" "$WORKDIR" "$@")"
if [ "$DETACH" = 1 ]; then
  REMOTE_RUN="nohup $REMOTE_RUN > ~/mtmerge-run.log 2>&1 < /dev/null &"
fi
REMOTE="set -e; rm -rf ~/mtmerge.new && mkdir -p ~/mtmerge.new && tar xzf ~/mtmerge.tgz -C ~/mtmerge.new && rm -rf ~/mtmerge && mv ~/mtmerge.new ~/mtmerge && cd ~/mtmerge && $REMOTE_RUN"
GCLOUD=(gcloud compute tpus tpu-vm)
PACK=(bash -c "cd $(q "$ROOT") && { git ls-files -co --exclude-standard -z 2>/dev/null || find . -path ./.git -prune -o -path ./.venv -prune -o -type f -print0; } | tar czf $(q "$TARBALL") --ignore-failed-read --null -T -")
COPY=("${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:~/mtmerge.tgz" --zone="$ZONE" --worker=all "${PROJECT[@]+"${PROJECT[@]}"}")
RUN=("${GCLOUD[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all "${PROJECT[@]+"${PROJECT[@]}"}" --command="$REMOTE")

for cmd in PACK COPY RUN; do
  declare -n c=$cmd
  echo "+ $(q "${c[@]}")"
  if [ "$DRY" = 0 ]; then "${c[@]}"; fi
done
