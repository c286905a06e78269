#!/usr/bin/env bash
# Shared by the launch/*.sh scripts (sourced, not run): option parsing, defaults and a `run` that prints every
# command and, unless --dry-run, executes it.
#
# Every option can also come from the environment (TPU_NAME, ZONE, PROJECT, ACCELERATOR, RUNTIME_VERSION, ...), so a
# session can `export` them once and call the scripts without flags.

set -euo pipefail

TPU_NAME="${TPU_NAME:-grit-jax}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-}"  # empty: the smallest slice (DEFAULT_ACCELERATOR), which create.sh names
DEFAULT_ACCELERATOR="v5p-8"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
REMOTE_DIR="${REMOTE_DIR:-grit_jax}"
DRY_RUN=0
EXTRA_ARGS=()

usage_common() {
  cat <<USAGE
common options (or the environment variable in brackets):
  --name NAME              TPU VM / queued resource name [TPU_NAME, default grit-jax]
  --zone ZONE              [ZONE, default us-east5-a]
  --project PROJECT        [PROJECT, default: gcloud's configured project]
  --accelerator TYPE       v5p-8 ... v5p-1024, v5litepod-8 ... v5litepod-256 [ACCELERATOR, default v5p-8:
                           the smallest v5p slice, 4 chips; GritLM-7B wants v5p-64, see launch/README.md]
  --version VERSION        TPU software version [RUNTIME_VERSION, default from the accelerator]
  --queued                 use a queued resource instead of an on-demand TPU VM [QUEUED=1]
  --spot                   spot capacity [SPOT=1]
  --remote-dir DIR         checkout folder on the workers, relative to \$HOME [REMOTE_DIR, default grit_jax]
  --dry-run                print every command instead of running it
USAGE
}

# parse_common "$@": consumes the common options; anything else is left in EXTRA_ARGS for the script.
parse_common() {
  while (($#)); do
    case "$1" in
      --name) TPU_NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --accelerator) ACCELERATOR="$2"; shift 2 ;;
      --version) RUNTIME_VERSION="$2"; shift 2 ;;
      --queued) QUEUED=1; shift ;;
      --spot) SPOT=1; shift ;;
      --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) EXTRA_ARGS+=("$1"); shift ;;
    esac
  done
  ACCELERATOR_DEFAULTED=0  # create.sh says so when it is 1
  if [[ -z "$ACCELERATOR" ]]; then
    ACCELERATOR="$DEFAULT_ACCELERATOR"
    # shellcheck disable=SC2034  # read by create.sh
    ACCELERATOR_DEFAULTED=1
  fi
  if [[ -z "$RUNTIME_VERSION" ]]; then
    case "$ACCELERATOR" in
      v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
      v5litepod-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
      v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
      v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
      *) echo "error: unknown accelerator type '$ACCELERATOR' (pass --version)" >&2; exit 2 ;;
    esac
  fi
  # Pasted into remote shell commands after `~/`: quoted like every other argument (spaces, `;`, `$(...)`).
  # shellcheck disable=SC2034  # used by the scripts that source this file
  printf -v REMOTE_DIR_Q '%q' "$REMOTE_DIR"
  GCLOUD_SCOPE=(--zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_SCOPE+=(--project "$PROJECT")
  fi
}

# run CMD ARGS...: prints the command (shell-quoted, so it can be pasted), then runs it unless --dry-run.
run() {
  local arg line="+"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then
      line+=" $arg"
    else
      line+=" ${arg@Q}"
    fi
  done
  echo "$line"
  if ((DRY_RUN == 0)); then
    "$@"
  fi
}

# on_workers WORKER COMMAND: runs a shell command over ssh on one worker (0, 1, ...) or on all of them.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --worker="$1" --command "$2"
}
