#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run the same `grit-jax train` command on every worker (in the background, logging to logs/train.log there).
# Everything after `--` goes to `grit-jax train`:
#   launch/train.sh --name grit -- --config configs/gritlm_7b.py --workdir runs/gritlm_7b \
#     --config.train.checkpoint_dir=gs://BUCKET/gritlm_7b '--config.init_from=hf:$HOME/Mistral-7B-v0.1'
# A quoted '$HOME' is the workers' home; an unquoted one (expanded here to this machine's) is mapped back to it.
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

# A path in the user's home means the workers' home, which is not this machine's: `hf:$HOME/x` typed unquoted arrives
# here already expanded to this machine's home. Such a prefix is handed back to the workers' $HOME (and said so); a
# literal $HOME (quoted by the user) expands on the workers (remote_word). Everything else is quoted as it is.
# shellcheck disable=SC2016  # the single-quoted $HOME is meant literally: the workers' shell expands it
to_remote_home() {
  local arg="$1" sep
  if [[ -n "$HOME" && "$HOME" != "/" ]]; then
    if [[ "$arg" == "$HOME" || "$arg" == "$HOME"/* ]]; then
      arg='$HOME'"${arg#"$HOME"}"
    fi
    for sep in "=" ":" ","; do
      arg="${arg//"$sep$HOME/"/"$sep"'$HOME/'}"
      if [[ "$arg" == *"$sep$HOME" ]]; then
        arg="${arg%"$HOME"}"'$HOME'
      fi
    done
  fi
  printf '%s' "$arg"
}

# remote_word ARG: ARG as one word of the workers' shell, every literal $HOME or ${HOME} in it expanding there.
# shellcheck disable=SC2016
remote_word() {
  local arg="$1" word="" tail
  while [[ "$arg" =~ ^(.*)\$(HOME|\{HOME\})([^A-Za-z0-9_].*)?$ ]]; do  # the last one first
    arg="${BASH_REMATCH[1]}"
    tail="${BASH_REMATCH[3]}"
    if [[ -n "$tail" ]]; then
      word="$(printf '%q' "$tail")$word"
    fi
    word='"$HOME"'"$word"
  done
  if [[ -n "$arg" || -z "$word" ]]; then
    word="$(printf '%q' "$arg")$word"
  fi
  printf '%s' "$word"
}

QUOTED=""
for arg in "${TRAIN_ARGS[@]}"; do
  remote="$(to_remote_home "$arg")"
  if [[ "$remote" != "$arg" ]]; then
    echo "note: $arg names this machine's home ($HOME); the workers get $remote, in their own home" \
      "(write '\$HOME/...' in single quotes to say so)" >&2
  fi
  QUOTED+=" $(remote_word "$remote")"
done
# --distributed=yes: jax.distributed.initialize() finds the coordinator and the worker ids on a TPU VM by itself.
CMD=".venv/bin/grit-jax train --distributed=yes${QUOTED}"
if ((FOREGROUND)); then
  on_workers all "cd ~/$REMOTE_DIR_Q && mkdir -p logs && TF_CPP_MIN_LOG_LEVEL=2 $CMD 2>&1 | tee logs/train.log"
else
  on_workers all "cd ~/$REMOTE_DIR_Q && mkdir -p logs && TF_CPP_MIN_LOG_LEVEL=2 nohup $CMD > logs/train.log 2>&1 &"
  echo "started on every worker of $TPU_NAME; follow with: launch/logs.sh --name $TPU_NAME --zone $ZONE"
fi
