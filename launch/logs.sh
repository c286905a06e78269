#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Follow the training log of one worker (default 0, the one that prints the progress bar and writes metrics).
#   launch/logs.sh --name grit [--worker 3] [--lines 200] [--dry-run]
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/logs.sh [options] [--worker N] [--lines N]"
  usage_common
}

parse_common "$@"
WORKER=0
LINES=100
set -- "${EXTRA_ARGS[@]}"
while (($#)); do
  case "$1" in
    --worker) WORKER="$2"; shift 2 ;;
    --lines) LINES="$2"; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
printf -v LINES_Q '%q' "$LINES"
on_workers "$WORKER" "tail -n $LINES_Q -F ~/$REMOTE_DIR_Q/logs/train.log"
