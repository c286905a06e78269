#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy a run's outputs to this machine: from worker 0's disk (the HF export, metrics, TensorBoard events) or from a
# gs:// checkpoint directory.
#   launch/copy.sh --name grit --from runs/gritlm_7b --to ./runs/          # worker 0: ~/grit_jax/runs/gritlm_7b
#   launch/copy.sh --from gs://BUCKET/gritlm_7b --to ./ckpt/             # checkpoints in a bucket
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/copy.sh [options] --from PATH --to LOCAL_DIR"
  usage_common
}

parse_common "$@"
FROM=""
TO=""
set -- "${EXTRA_ARGS[@]}"
while (($#)); do
  case "$1" in
    --from) FROM="$2"; shift 2 ;;
    --to) TO="$2"; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$FROM" || -z "$TO" ]]; then
  echo "error: --from and --to are required" >&2
  exit 2
fi

run mkdir -p "$TO"
if [[ "$FROM" == gs://* ]]; then
  run gcloud storage cp --recursive "$FROM" "$TO"
else
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$REMOTE_DIR/$FROM" "$TO" "${GCLOUD_SCOPE[@]}" --worker=0
fi
