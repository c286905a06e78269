#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy a run's outputs to this machine: from worker 0's disk (the HF export, metrics, TensorBoard events) or from a
# gs:// checkpoint directory.
#   launch/copy.sh --name grit --from runs/gritlm_7b/hf --to gritlm_7b_hf   # worker 0: ~/grit_jax/runs/gritlm_7b/hf
#   launch/copy.sh --from gs://BUCKET/gritlm_7b --to ckpt                     # checkpoints in a bucket
# --to (new, or empty) receives the files of --from: gritlm_7b_hf/config.json, never gritlm_7b_hf/hf/config.json.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/copy.sh [options] --from PATH --to NEW_LOCAL_DIR   (NEW_LOCAL_DIR gets the files of PATH)"
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

# --to becomes the copy of --from (its files, not a folder named after it): the copy goes to a path that does not
# exist yet, which scp creates, as `cp -r` would. A folder with files in it is refused rather than merged into.
if [[ -e "$TO" && ! -d "$TO" ]]; then
  echo "error: --to $TO exists and is not a folder" >&2
  exit 2
fi
if [[ -d "$TO" && -n "$(ls -A "$TO")" ]]; then
  echo "error: --to $TO is not empty: it receives the files of $FROM themselves (no $TO/$(basename "$FROM") inside);" \
    "name a new folder" >&2
  exit 2
fi
if [[ "$FROM" == gs://* ]]; then
  run mkdir -p "$TO"
  # rsync copies the objects under the prefix to the same relative paths under $TO (cp -r would nest them).
  run gcloud storage rsync --recursive "$FROM" "$TO"
else
  run mkdir -p "$(dirname "$TO")"
  if [[ -d "$TO" ]]; then  # empty: scp would copy into it, as $TO/$(basename "$FROM")
    run rmdir "$TO"
  fi
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$REMOTE_DIR/$FROM" "$TO" "${GCLOUD_SCOPE[@]}" --worker=0
fi
