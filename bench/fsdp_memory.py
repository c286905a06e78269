"""Per-device parameter + optimizer bytes under FSDP on 8 fake CPU devices vs the ideal total / 8.

  .venv/bin/python bench/fsdp_memory.py [--preset mistral_7b|tiny_mistral|...] [--devices 8]

Nothing is allocated: the state's shapes and shardings come from grit_jax.training.state.state_shardings
(jax.eval_shape), and each leaf's per-device bytes from its sharding's shard shape. Target: the largest device
within 5% of total / 8.
"""
import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--preset", default="mistral_7b")
p.add_argument("--devices", type=int, default=8)
args = p.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import _common  # noqa: E402,F401  (puts the repo on sys.path)

import math  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from grit_jax.modeling import ModelConfig  # noqa: E402
from grit_jax import sharding as mesh_lib
from grit_jax.training import optimizer as opt_lib, state as state_lib  # noqa: E402

config = base.get_config(args.preset)
model_config = ModelConfig(**config.model.to_dict())
mesh, rules = mesh_lib.make_mesh(config.mesh)
tx = opt_lib.make_optimizer(config.optimizer, config.train.steps)
abstract, shardings = state_lib.state_shardings(model_config, tx, mesh, rules)

per_device = np.zeros(len(jax.devices()))
total = 0
for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
  nbytes = math.prod(a.shape) * a.dtype.itemsize
  total += nbytes
  shard_bytes = math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
  for dev in s.addressable_devices:  # every device holding a (possibly replicated) shard pays for it
    per_device[dev.id] += shard_bytes
ideal = total / len(per_device)
worst = per_device.max()
print(f"preset {args.preset}: {total / 2**30:.3f} GiB params + optimizer state; mesh {dict(mesh.shape)}")
print(f"per device: max {worst / 2**30:.4f} GiB, min {per_device.min() / 2**30:.4f} GiB, "
      f"ideal total/{len(per_device)} {ideal / 2**30:.4f} GiB -> max is {worst / ideal - 1:+.3%} over ideal")
print("PASS" if worst <= 1.05 * ideal else "FAIL", "(target: within 5%)")

if total < 2**31:  # small enough to allocate here: measure the live buffers too
  state = state_lib.create_train_state(model_config, tx, mesh, rules, jax.random.PRNGKey(0))
  live = np.zeros(len(jax.devices()))
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      live[shard.device.id] += shard.data.nbytes
  print(f"allocated (live shards): max {live.max() / 2**20:.3f} MiB per device, sum {live.sum() / 2**20:.3f} MiB, "
        f"max is {live.max() / (live.sum() / len(live)) - 1:+.3%} over sum/{len(live)}")
