"""What the bench scripts share: the repository on sys.path, the timing loop, the matmul ceiling, a ready train step.

`python bench/x.py` puts bench/ first on sys.path, so each script imports this module before jax. The CPU scripts
pin JAX_PLATFORMS=cpu before importing it; then it sets the process up as the CLI does (grit_jax.perf.host: on the
CPU glibc keeps XLA's step buffers; GRIT_JAX_MALLOC=system leaves it alone, for the ablation), so torch, in the same
process in the side-by-side scripts, runs on the same allocator settings. On a GPU host (gpu_mfu.py) it changes
nothing.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grit_jax.perf import host  # noqa: E402  (imports no jax)

host.prepare_cpu_host()


def _block(out):
  import jax
  for leaf in jax.tree.leaves(out):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  return out


def wall_times(fn, runs: int, warmup: int = 1) -> list[float]:
  """Seconds of each of `runs` calls of fn() after `warmup` untimed calls (compilation, caches); jax outputs are
  waited for, so asynchronous dispatch is not mistaken for speed."""
  for _ in range(warmup):
    _block(fn())
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return times


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
  return statistics.median(wall_times(fn, runs, warmup))


def matmul_flops(n: int = 2048, dtype=None, reps: int = 10) -> tuple[float, float]:
  """(FLOP/s, FLOP per CPU-second) of a jitted n x n x n matmul with float32 accumulation: best wall time of `reps`,
  and all their FLOPs over the process CPU time. The practical ceiling of a CPU host, measured in the same run."""
  import jax
  import jax.numpy as jnp
  dtype = dtype or jnp.float32
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()  # compile outside the CPU-time window
  cpu0 = time.process_time()
  times = wall_times(lambda: f(a, b), reps, warmup=0)
  flops = 2 * n ** 3
  return flops / min(times), flops * reps / (time.process_time() - cpu0)


def ready_train_step(model_config, config, batch_np=None, devices=None, mesh_axes=None):
  """(state, train_step, batch on the mesh or None): the GRIT step as grit-jax train builds it, for `devices`
  (default: all) on config.mesh or `mesh_axes`."""
  import jax
  from grit_jax.data import to_global_batch
  from grit_jax import sharding as mesh_lib
  from grit_jax.training import optimizer as opt_lib, state as state_lib, step as step_lib

  mesh, rules = mesh_lib.make_mesh(mesh_axes or config.mesh, devices)
  tx = opt_lib.make_optimizer(config.optimizer, config.train.steps)
  state = state_lib.create_train_state(model_config, tx, mesh, rules, jax.random.PRNGKey(0))
  step = step_lib.make_train_step(model_config, config, mesh, rules)
  batch = None if batch_np is None else to_global_batch(batch_np, mesh)
  return state, step, batch


def time_train_steps(state, step, batch, steps: int):
  """Runs the first step (compilation included) and `steps` more. Returns (first-step seconds, seconds of each
  later step, process CPU seconds of the later steps together, last state, last metrics)."""
  box = {"state": state}

  def one_step():
    box["state"], box["metrics"] = step(box["state"], batch)
    return box["metrics"]

  first = wall_times(one_step, 1, warmup=0)[0]
  cpu0 = time.process_time()
  times = wall_times(one_step, steps, warmup=0)
  return first, times, time.process_time() - cpu0, box["state"], box["metrics"]
