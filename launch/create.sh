#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create the TPU VM (or a queued resource, --queued) that the other scripts use, and wait until it is ready.
#   launch/create.sh --name grit --zone us-east5-a --accelerator v5p-64 [--queued] [--spot] [--dry-run]
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/create.sh [options]"
  usage_common
}

parse_common "$@"
if ((ACCELERATOR_DEFAULTED)); then
  # A slice is billed per chip-hour: never pick a large one silently.
  echo "note: no --accelerator (nor ACCELERATOR): creating the smallest v5p slice, $ACCELERATOR (4 chips, 1 host);" \
    "pass --accelerator v5p-64 or another size for a 7B run (launch/README.md, Topologies)" >&2
fi
SPOT_FLAG=()
if ((SPOT)); then
  SPOT_FLAG=(--spot)
fi

if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --node-id "$TPU_NAME" \
    --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME_VERSION" "${SPOT_FLAG[@]}"
  # A queued resource is granted later: poll its state until ACTIVE (FAILED/SUSPENDED are fatal).
  describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --format "value(state.state)")
  if ((DRY_RUN)); then
    run "${describe[@]}"
  else
    while true; do
      state="$("${describe[@]}")"
      echo "queued resource $TPU_NAME: $state"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) echo "error: queued resource $TPU_NAME is $state" >&2; exit 1 ;;
      esac
      sleep 60
    done
  fi
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME_VERSION" "${SPOT_FLAG[@]}"
fi
