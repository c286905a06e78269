#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete the TPU VM (or the queued resource with --queued). Copy what you need first (launch/copy.sh).
#   launch/delete.sh --name grit --zone us-east5-a [--queued] [--dry-run]
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/delete.sh [options]"
  usage_common
}

parse_common "$@"
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --quiet
fi
