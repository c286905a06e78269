#!/usr/bin/env bash
# One MaxText train_compile (AOT, on this CPU host) with the settings of BENCHMARKS.md's MaxText rows:
# 256 x 2048-token global batch, pure FSDP over all chips, full remat, float32 weights, bf16 compute, synthetic data.
# usage: bench/maxtext/run.sh MODEL TOPOLOGY PER_DEVICE_BATCH [extra key=value ...]
# Output: $RUNS/MODEL_TOPOLOGY/{log.txt,time.txt,dump/} (RUNS defaults to /work/mt-runs).
set -u
MODEL=$1; TOPO=$2; PDB=$3; shift 3
VENV=${VENV:-/work/maxtext-venv}
RUNS=${RUNS:-/work/mt-runs}
OUT=$RUNS/${MODEL}_${TOPO}${TAG:+_$TAG}
mkdir -p "$OUT"; rm -rf "$OUT/dump"
CFG=$("$VENV/bin/python" -c "import maxtext, os; print(os.path.dirname(maxtext.__file__))")/configs/base.yml
export ALLOW_MULTIPLE_LIBTPU_LOAD=true TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost TPU_WORKER_ID=0
export XLA_FLAGS="--xla_dump_to=$OUT/dump --xla_dump_hlo_module_re=jit_train_step"
cd "$OUT"
/usr/bin/time -v -o "$OUT/time.txt" timeout "${TIMEOUT:-1500}" \
  "$VENV/bin/python" -m maxtext.trainers.pre_train.train_compile "$CFG" \
  model_name="$MODEL" compile_topology="$TOPO" compile_topology_num_slices=1 \
  per_device_batch_size="$PDB" max_target_length=2048 remat_policy=full ici_fsdp_parallelism=-1 \
  weight_dtype=float32 dtype=bfloat16 dataset_type=synthetic enable_checkpointing=false \
  base_output_directory="$OUT/out" run_name=aot "$@" > "$OUT/log.txt" 2>&1
echo "rc=$?" >> "$OUT/time.txt"
