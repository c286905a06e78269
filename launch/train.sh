#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run the same `grit-jax train` command on every worker (in the background, logging to logs/train.log there).
# Everything after `--` goes to `grit-jax train`:
#   launch/train.sh --name grit -- --config configs/gritlm_7b.py --workdir runs/gritlm_7b \
#     --config.train.checkpoint_dir=gs://BUCKET/gritlm_7b --config.init_from=hf:/home/USER/Mistral-7B-v0.1
# Rerunning the same command resumes from the last checkpoint. --foreground streams worker 0's output instead.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/train.sh [options] [--foreground] -- GRIT_JAX_TRAIN_ARGS..."
  usage_common
}

FOREGROUND=0
TRAIN_ARGS=()
ARGS=()
while (($#)); do
  case "$1" in
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --foreground) FOREGROUND=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
parse_common "${ARGS[@]}"
if ((${#EXTRA_ARGS[@]})); then
  echo "error: unknown option ${EXTRA_ARGS[0]} (grit-jax train arguments go after --)" >&2
  exit 2
fi
if ((${#TRAIN_ARGS[@]} == 0)); then
  echo "error: no training arguments: launch/train.sh [options] -- --config configs/X.py --workdir DIR" >&2
  exit 2
fi

printf -v QUOTED '%q ' "${TRAIN_ARGS[@]}"
# --distributed=yes: jax.distributed.initialize() finds the coordinator and the worker ids on a TPU VM by itself.
CMD=".venv/bin/grit-jax train --distributed=yes ${QUOTED% }"
if ((FOREGROUND)); then
  on_workers all "cd ~/$REMOTE_DIR_Q && mkdir -p logs && TF_CPP_MIN_LOG_LEVEL=2 $CMD 2>&1 | tee logs/train.log"
else
  on_workers all "cd ~/$REMOTE_DIR_Q && mkdir -p logs && TF_CPP_MIN_LOG_LEVEL=2 nohup $CMD > logs/train.log 2>&1 &"
  echo "started on every worker of $TPU_NAME; follow with: launch/logs.sh --name $TPU_NAME --zone $ZONE"
fi
