"""The device mesh (axes data, fsdp, tensor, expert) and the logical-axis rules that map the model's axis names
onto it.

The model names every parameter and activation dimension (embed, heads, kv_heads, head_dim, mlp, vocab, exp, batch,
length, layers); which mesh axes shard them is decided here, per mesh shape, never in the model:
- pure FSDP (the default, config.mesh.fsdp=-1): the batch is split over data x fsdp, every weight is sharded on its
  `embed` dimension over fsdp (gathered per layer by XLA), the optimizer state follows the weights.
- tensor parallelism (config.mesh.tensor > 1): heads, kv_heads, mlp and vocab also split over `tensor`.
- expert parallelism (config.mesh.expert > 1): the MoE experts (`exp`) split over `expert`; the batch is split over
  it too, so expert devices do data-parallel work outside the MoE blocks.
Rules are ordered by priority (flax assigns a mesh axis to at most one dimension per array): `batch` comes first,
so an activation [batch, length, embed] is split on the batch and not also on embed.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from grit_jax.errors import GritJaxError

AXES = ("data", "fsdp", "tensor", "expert")
# Mesh axes that split the batch of activations (W = the product of their sizes; see grit_jax.objectives).
BATCH_AXES = ("data", "fsdp", "expert")
# Axes the input batch arrives sharded over (grit_jax.data.to_global_batch).
INPUT_BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def fsdp_rules() -> Rules:
  return (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("length", None),
      ("layers", None),
      ("heads", None),
      ("kv_heads", None),
      ("head_dim", None),
      ("mlp", None),
      ("vocab", None),
      ("exp", None),
  )


def make_rules(tensor: bool = False, expert: bool = False) -> Rules:
  """The logical-axis rule table: pure FSDP, plus tensor and/or expert parallelism."""
  table = dict(fsdp_rules())
  if expert:
    table["batch"] = ("data", "fsdp", "expert")
    table["exp"] = "expert"
  if tensor:
    table.update(heads="tensor", kv_heads="tensor", mlp="tensor", vocab="tensor")
  order = ("batch", "exp", "heads", "kv_heads", "mlp", "vocab", "embed", "length", "layers", "head_dim")
  return tuple((name, table[name]) for name in order)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor, expert) from config.mesh; one axis may be -1 (all remaining devices)."""
  sizes = []
  for name in AXES:
    v = mesh_cfg[name] if name in mesh_cfg else 1
    if not isinstance(v, int) or (v < 1 and v != -1):
      raise GritJaxError(f"config.mesh.{name}={v!r}: expected a positive integer or -1")
    sizes.append(v)
  if sizes.count(-1) > 1:
    raise GritJaxError(f"config.mesh: only one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise GritJaxError(f"config.mesh: {num_devices} devices do not split into {dict(zip(AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise GritJaxError(f"config.mesh: {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                       f"there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> tuple[Mesh, Rules]:
  """(Mesh with axes AXES and Auto axis types, logical rules for its shape) from config.mesh (a ConfigDict or a
  dict with keys data/fsdp/tensor/expert)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (AxisType.Auto,) * len(AXES)
  if len(devices) == len(jax.devices()):
    mesh = jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)  # topology-aware device order
  else:
    mesh = Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)
  sizes = dict(zip(AXES, shape))
  return mesh, make_rules(tensor=sizes["tensor"] > 1, expert=sizes["expert"] > 1)


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
  """Mesh axes the `batch` logical axis maps to under `rules`."""
  axes = dict(rules).get("batch")
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.axis_names)


def num_batch_shards(mesh: Mesh, rules: Rules) -> int:
  """W: how many shards the batch is split into."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))
