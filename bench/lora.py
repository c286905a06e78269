"""LoRA vs full fine-tuning on the real model: SmolLM2-135M-Instruct with the demo recipe (configs/smollm2.py: bf16
compute, scanned layers, full remat, packed passes, the shipped data), each run as `grit-jax train` builds it (Run:
the GGUF's weights loaded through init_from, the sharded state, the jitted step, the data iterator). The full run
trains every weight (float32 master weights + Adam moments); the LoRA run (model.lora_rank, default targets q, k, v,
o) keeps the base frozen in bf16 and trains only the adapters.

Each run is its own process (so its peak RSS is its own): the median step time over --steps real batches after one
warm-up step (the compile), the process CPU seconds per step (what a loaded, shared host distorts least), and the
process's peak resident memory (getrusage ru_maxrss) at the end. One invocation runs both, side by side by default
(`--sequential` runs one after the other), and prints the ratios. Targets (issue 24): LoRA step >= 1.5x faster,
LoRA peak host memory <= 0.6x the full run's.

  .venv/bin/python bench/lora.py [--steps 4] [--rank 16] [--targets q,k,v,o]
"""
import argparse
import json
import os
import subprocess
import sys

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=4)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--targets", default="q,k,v,o")
p.add_argument("--lora-remat", default=None, help="model.remat_policy of the LoRA run only (default: the recipe's "
               "full); the freed memory can hold the activations instead of recomputing them")
p.add_argument("--sequential", action="store_true", help="run the two processes one after the other")
p.add_argument("--child", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
args = p.parse_args()


def child(kind: str) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import resource
  import statistics
  import time

  from _common import wall_times  # noqa: F401  (puts the repo on sys.path, sets the host up as the CLI)
  from configs import smollm2
  from grit_jax import contract
  from grit_jax import data as data_lib
  from grit_jax.training import run as run_lib
  from grit_jax.training import step as step_lib

  c = smollm2.get_config()
  if kind == "lora":
    c.model.lora_rank = args.rank
    c.model.lora_targets = tuple(args.targets.split(","))
    c.model.remat_policy = args.lora_remat or c.model.remat_policy
  model_config = contract.validate(c, log=None)
  c = contract.with_model(c, model_config)  # as the trainer: the GGUF named as data.tokenizer -> its converted folder
  run = run_lib.Run(c, model_config)
  state = run.init_state()
  it = data_lib.make_train_iterator(c.data, **step_lib.packing_layout(c, run.mesh))
  box, times, cpu = {"state": state}, [], []
  for i in range(args.steps + 1):
    batch = data_lib.to_global_batch(next(it), run.mesh)

    def one(batch=batch):
      box["state"], box["m"] = run.train_step(box["state"], batch)
      return box["m"]

    cpu0 = time.process_time()
    t = wall_times(one, 1, warmup=0)[0]
    if i:  # step 1 compiles
      times.append(t)
      cpu.append(time.process_time() - cpu0)
  trained = sum(x.size for x in __import__("jax").tree.leaves(box["state"].params))
  return {"kind": kind, "step_s": statistics.median(times), "times": times, "trained_params": int(trained),
          "cpu_s": statistics.median(cpu),
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
          "loss": float(box["m"]["loss"])}


if args.child:
  print("RESULT " + json.dumps(child(args.child)), flush=True)
  sys.exit(0)

results, procs = {}, {}
for kind in ("full", "lora"):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--steps", str(args.steps), "--rank",
         str(args.rank), "--targets", args.targets] + (["--lora-remat", args.lora_remat] if args.lora_remat else [])
  procs[kind] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if args.sequential:
    procs[kind].wait()
for kind, proc in procs.items():
  stdout, stderr = proc.communicate()
  line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode or not line:
    sys.exit(f"{kind} run failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
  results[kind] = r = json.loads(line[0][len("RESULT "):])
  print(f"{kind:4s}: {r['step_s']:6.2f} s/step (median of {args.steps}: "
        f"{', '.join(f'{t:.2f}' for t in r['times'])}), {r['cpu_s']:6.2f} CPU s/step, peak RSS "
        f"{r['peak_rss_gib']:.2f} GiB, trained params {r['trained_params']:,}, last loss {r['loss']:.4f}", flush=True)
full, lora = results["full"], results["lora"]
speed = full["step_s"] / lora["step_s"]
cpu_speed = full["cpu_s"] / lora["cpu_s"]
mem = lora["peak_rss_gib"] / full["peak_rss_gib"]
print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end; SmolLM2-135M-Instruct, "
      f"configs/smollm2.py; LoRA rank {args.rank} on {args.targets}, remat {args.lora_remat or 'as the recipe'}; "
      f"{'one after the other' if args.sequential else 'side by side'}")
print(f"LoRA step speed-up vs full fine-tune: {speed:.2f}x wall, {cpu_speed:.2f}x CPU seconds",
      "PASS" if min(speed, cpu_speed) >= 1.5 else "FAIL", "(target >= 1.5x)")
print(f"LoRA peak host memory / full: {mem:.2f}", "PASS" if mem <= 0.6 else "FAIL", "(target <= 0.6)")
