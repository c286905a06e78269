"""The device mesh (axes data, fsdp, tensor, expert) and the logical-axis rules that map the model's axis names
onto it.

The model names every parameter and activation dimension (embed, heads, kv_heads, head_dim, mlp, vocab, exp, batch,
length, layers); which mesh axes shard them is decided here, per mesh shape, never in the model:
- pure FSDP (the default, config.mesh.fsdp=-1): the batch is split over data x fsdp, every weight is sharded on its
  `embed` dimension over fsdp (gathered per layer by XLA), the optimizer state follows the weights.
- tensor parallelism (config.mesh.tensor > 1): heads, kv_heads, mlp and vocab also split over `tensor`.
- expert parallelism (config.mesh.expert > 1): the MoE experts (`exp`) split over `expert`; the batch is split over
  it too, so expert devices do data-parallel work outside the MoE blocks.
- several slices (multislice): each axis is the product of a within-slice part (config.mesh.data, ...: ICI) and
  an across-slice part (config.mesh.dcn_data, ...: the data-center network), arranged as jax's hybrid device mesh;
  by default the slices only split the batch (dcn_data), so weights are gathered within a slice.
Rules are ordered by priority (flax assigns a mesh axis to at most one dimension per array): `batch` comes first,
so an activation [batch, length, embed] is split on the batch and not also on embed.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from grit_jax.errors import GritJaxError

AXES = ("data", "fsdp", "tensor", "expert")
# config.mesh keys of the across-slice (DCN) part of each axis; the plain keys are the within-slice (ICI) part.
DCN_KEYS = tuple(f"dcn_{a}" for a in AXES)
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


def _resolve(mesh_cfg, keys: tuple[str, ...], num_devices: int, what: str) -> tuple[int, ...]:
  """Sizes of the mesh axes `keys` of config.mesh (a missing key = 1); one may be -1 (all remaining devices)."""
  sizes = []
  for key in keys:
    v = mesh_cfg[key] if key in mesh_cfg else 1
    if not isinstance(v, int) or (v < 1 and v != -1):
      raise GritJaxError(f"config.mesh.{key}={v!r}: expected a positive integer or -1")
    sizes.append(v)
  named = dict(zip(keys, sizes))
  if sizes.count(-1) > 1:
    raise GritJaxError(f"config.mesh: only one {what} axis may be -1, got {named}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise GritJaxError(f"config.mesh: {num_devices} {what} devices do not split into {named}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise GritJaxError(f"config.mesh: {named} needs {math.prod(sizes)} {what} devices, there are {num_devices}")
  return tuple(sizes)


def hybrid_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(within-slice sizes, across-slice sizes) of (data, fsdp, tensor, expert): config.mesh.{data,...} split the
  chips of one slice (ICI), config.mesh.dcn_{data,...} split the slices (DCN; data parallel by default, so only
  the gradient reduction crosses the slower network). The mesh axis sizes are their products."""
  if num_devices % num_slices:
    raise GritJaxError(f"{num_devices} devices do not split into {num_slices} slices")
  ici = _resolve(mesh_cfg, AXES, num_devices // num_slices, "within-slice")
  return ici, _resolve(mesh_cfg, DCN_KEYS, num_slices, "across-slice")


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor, expert) from config.mesh (see hybrid_shape)."""
  ici, dcn = hybrid_shape(mesh_cfg, num_devices, num_slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def num_slices(devices) -> int:
  """Slices the devices span (TPU devices carry slice_index; other platforms are one slice)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(mesh_cfg, devices) -> np.ndarray:
  """The devices arranged as the mesh, in the physical order mesh_utils picks: within a slice, mesh axes follow
  the torus (an axis over devices in id order is no ring: the TPU compiler then gathers weights as a write into a
  zero buffer plus an all-reduce, twice the bytes of an all-gather); slices are blocks of the across-slice axes."""
  slices = num_slices(devices)
  ici, dcn = hybrid_shape(mesh_cfg, len(devices), slices)
  if slices > 1:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)


def make_mesh(mesh_cfg, devices=None) -> tuple[Mesh, Rules]:
  """(Mesh with axes AXES and Auto axis types, logical rules for its shape) from config.mesh (a ConfigDict or a
  dict with keys data/fsdp/tensor/expert and, across slices, dcn_data/...)."""
  devices = list(jax.devices() if devices is None else devices)
  grid = device_grid(mesh_cfg, devices)
  mesh = Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
  sizes = dict(zip(AXES, grid.shape))
  return mesh, make_rules(tensor=sizes["tensor"] > 1, expert=sizes["expert"] > 1)


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
  """Mesh axes the `batch` logical axis maps to under `rules`."""
  axes = dict(rules).get("batch")
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.axis_names)


def num_batch_shards(mesh: Mesh, rules: Rules) -> int:
  """W: how many shards the batch is split into."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def mesh_axes_of(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, an axis name or a tuple of names) as a tuple of names."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def dividing_axes(mesh: Mesh, entry, size: int):
  """The one divide-or-drop rule: the mesh axes of `entry` that split a dimension of `size`, in order, as long as
  their product divides it (e.g. a vocab of 32001 over tensor=4, or a batch of 3 over data=2: left whole on that
  axis instead of failing to compile). Returns `entry` itself when every axis is kept, else the kept tuple or
  None."""
  names = mesh_axes_of(entry)
  kept, prod = [], 1
  for a in names:
    n = mesh.shape.get(a)
    if n is not None and size % (prod * n) == 0:
      kept.append(a)
      prod *= n
  return entry if len(kept) == len(names) else (tuple(kept) or None)


def logical_shardings(boxed, mesh: Mesh, rules: Rules):
  """(abstract tree, matching NamedShardings) of a tree of boxed leaves (flax LogicallyPartitioned, e.g.
  jax.eval_shape of an init): each leaf's logical axis names mapped through `rules`, each dimension keeping the
  mesh axes that divide it (dividing_axes), the rest replicated. Unnamed leaves (step, counts) are replicated."""
  import flax.linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract = nn.meta.unbox(boxed)

  def fit(a, s):
    spec = tuple(s.spec) + (None,) * (len(a.shape) - len(s.spec))
    return NamedSharding(mesh, P(*(dividing_axes(mesh, axes, dim) for dim, axes in zip(a.shape, spec))))
  return abstract, jax.tree.map(fit, abstract, shardings)
