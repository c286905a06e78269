#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy this checkout to every worker of the TPU VM and install it there (Python 3.11 venv + jax[tpu]).
#   launch/install.sh --name grit --zone us-east5-a [--dry-run]
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/install.sh [options]"
  usage_common
}

parse_common "$@"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/grit_jax_src.tgz"
JAX_VERSION="$(sed -n 's/^jax==//p' "$REPO/requirements.txt")"

# The working tree as it is (uncommitted edits included), without the venv, runs and git objects.
run tar -C "$REPO" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude='*/__pycache__' -czf "$TARBALL" .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:grit_jax_src.tgz" "${GCLOUD_SCOPE[@]}" --worker=all
# TPU VM images ship Ubuntu 22.04 with Python 3.10; the project needs 3.11.
on_workers all "set -e; sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv; \
mkdir -p ~/$REMOTE_DIR_Q && tar -xzf ~/grit_jax_src.tgz -C ~/$REMOTE_DIR_Q && cd ~/$REMOTE_DIR_Q && \
python3.11 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
.venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' && .venv/bin/pip install -q --no-deps -e . && \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
