"""Where inference puts the weights: replicated on every local device, or FSDP-sharded with the training mesh's
rules when they do not fit one device (`placement`, used by encode, generate and rag; `generation_params`)."""
from __future__ import annotations

import jax

WEIGHTS_FIT_FRACTION = 0.5  # shard_weights=None: shard when the params exceed this share of one device's memory


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def device_memory(device) -> int | None:
  """Bytes one device can hold (memory_stats' bytes_limit), None where the platform does not say (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # platforms without memory stats raise instead of returning None
    return None
  return (stats or {}).get("bytes_limit")


def should_shard(params, devices, shard_weights: bool | None) -> bool:
  """shard_weights, or (None) whether the params exceed WEIGHTS_FIT_FRACTION of one device's memory (the rest is
  for activations / caches); never on one device."""
  if len(devices) == 1:
    return False
  if shard_weights is not None:
    return bool(shard_weights)
  limit = device_memory(devices[0])
  return limit is not None and param_bytes(params) > WEIGHTS_FIT_FRACTION * limit


def weight_shardings(config, params, mesh, rules, shard: bool):
  """(shardings of `params` (arrays or their shapes), sharding that splits a batch's rows) on `mesh`: the weights
  FSDP-sharded with the training rules (modeling.model.param_shardings) when `shard`, else replicated."""
  from jax.sharding import NamedSharding, PartitionSpec
  from grit_jax import sharding as mesh_lib
  if shard:
    from grit_jax.modeling.model import param_shardings
    shardings = param_shardings(config, mesh, rules)[1]
  else:
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
  return shardings, NamedSharding(mesh, PartitionSpec(mesh_lib.batch_axes(mesh, rules)))


def placement(model, devices=None):
  """(params on `devices`, sharding that splits a batch's leading axis over them, or None on one device).
  Replicated params, or when `should_shard(model.shard_weights)` FSDP-sharded with the training mesh's rules
  (sharding.make_mesh with fsdp = every device, modeling.model.param_shardings): each device holds 1/N of every
  weight and XLA gathers them layer by layer. One placement per model and device set, reused across calls (and by
  generate)."""
  devices = list(devices if devices is not None else jax.local_devices())
  if len(devices) == 1:
    return model.params, None
  shard = should_shard(model.params, devices, getattr(model, "shard_weights", None))
  key = (tuple(d.id for d in devices), shard)
  cached = getattr(model, "_placement", None)
  if cached is None or cached[0] != key or cached[1] is not model.params:
    from grit_jax import sharding as mesh_lib
    mesh, rules = mesh_lib.make_mesh({"data": 1, "fsdp": -1}, devices)
    shardings, rows = weight_shardings(model.config, model.params, mesh, rules, shard)
    params = jax.device_put(model.params, shardings)
    cached = (key, model.params, params, rows)
    model._placement = cached
  return cached[2], cached[3]


def generation_params(model):
  """The params generation runs with: `model.params`, or sharded over the local devices (`placement`) when they do
  not fit one device (the batch is then replicated; XLA gathers each layer's weights)."""
  devices = jax.local_devices()
  if should_shard(model.params, devices, getattr(model, "shard_weights", None)):
    return placement(model, devices)[0]
  return model.params
