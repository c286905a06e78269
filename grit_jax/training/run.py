"""The run's building blocks, made once from a validated config: the model config, mesh and rules, optimizer,
jitted train step, the (possibly restored or imported) sharded state, and host copies of sharded trees."""
from __future__ import annotations

import os

import jax
import numpy as np

from grit_jax import contract
from grit_jax.errors import GritJaxError


class Run:
  """Everything the loop needs, built once from the config (after `contract.validate`)."""

  def __init__(self, config, model_config=None):
    from grit_jax import sharding as mesh_lib
    from grit_jax.training import optimizer as opt_lib
    from grit_jax.training import state as state_lib
    from grit_jax.training import step as step_lib

    self.config = config
    self.model_config = model_config if model_config is not None else contract.model_config(config, log=None)
    self.mesh, self.rules = mesh_lib.make_mesh(config.mesh)
    self.tx = opt_lib.make_optimizer(config.optimizer, config.train.steps)
    rng = jax.random.PRNGKey(config.train.seed)
    self._create = lambda **kw: state_lib.create_train_state(self.model_config, self.tx, self.mesh, self.rules, rng,
                                                             **kw)
    self.train_step = step_lib.make_train_step(self.model_config, config, self.mesh, self.rules)

  def abstract_state(self, with_frozen: bool = False):
    """The state's shapes, dtypes and shardings on this mesh, without allocating it (the restore target: a LoRA
    run's frozen base is not in its checkpoints, so it is left out unless `with_frozen`)."""
    from grit_jax.training import state as state_lib

    shapes, shardings = state_lib.state_shardings(self.model_config, self.tx, self.mesh, self.rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract if with_frozen else abstract.replace(frozen=None)

  def init_state(self, workdir: str | None = None):
    """Fresh state (seeded init), with the weights of config.init_from when it is set. LoRA: they go into the frozen
    base; a base initialised from scratch is saved once to <workdir>/lora_base (what `with_base` reads back)."""
    if self.model_config.lora_rank:
      if self.config.init_from or (workdir and os.path.isdir(base_dir(workdir))):
        return self.with_base(self._create(with_frozen=False), workdir)  # no random base beside the real one
      state = self._create()
      if workdir:
        save_base(state.frozen, base_dir(workdir))
      return state
    state = self._create()
    if self.config.init_from:
      state = replace_params(state, load_init_params(self.config.init_from, self.model_config, params(state),
                                                     self.config.train.allow_unverified_checkpoints))
    return state

  def with_base(self, state, workdir: str | None):
    """A restored LoRA state (adapters only) with its frozen base: from config.init_from, else from
    <workdir>/lora_base (written by `init_state`). Other runs: the state as it is."""
    if not self.model_config.lora_rank:
      return state
    from grit_jax.modeling import lora

    like = self.abstract_state(with_frozen=True).frozen
    if self.config.init_from:
      base = load_init_params(self.config.init_from, lora.base_config(self.model_config), like,
                              self.config.train.allow_unverified_checkpoints)
    else:
      path = base_dir(workdir) if workdir else ""
      if not path or not os.path.isdir(path):
        raise GritJaxError(f"{path or 'workdir'}: no saved LoRA base (model.lora_rank > 0 with init_from='' keeps "
                           "its random base there); set config.init_from or start a new workdir")
      import orbax.checkpoint as ocp

      with ocp.StandardCheckpointer() as ckptr:
        base = ckptr.restore(path, like)
    return state.replace(frozen=base)


def load_init_params(spec: str, model_config, like, allow_unverified: bool = False):
  """Weights for init_from = hf:DIR (converted Hugging Face weights) or ckpt:DIR (a grit_jax checkpoint's),
  placed like the arrays of `like` (same shapes, dtypes, shardings)."""
  from grit_jax import contract
  from grit_jax.training import checkpoint as ckpt_lib

  kind, path = contract.init_source(spec)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  if kind == "hf":
    from grit_jax.convert import hf as hf_lib

    loaded = hf_lib.load_hf(path, model_config)
    return jax.tree.map(lambda a, x: jax.device_put(np.asarray(x, a.dtype), a.sharding), abstract, loaded)
  if kind == "ckpt":
    return ckpt_lib.restore_params(path, abstract, allow_unverified)
  raise GritJaxError(f"config.init_from={spec!r}: expected hf:DIR or ckpt:DIR")


BASE_DIR = "lora_base"  # <workdir>/lora_base: the random base of a LoRA run without init_from, written once


def base_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, BASE_DIR))


def save_base(base, path: str) -> None:
  """The frozen base, once per run (orbax writes to a temporary folder and renames: never half-written)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, base)
    ckptr.wait_until_finished()


def params(state):
  return state.params if hasattr(state, "params") else state["params"]


def model_params(state):
  """The params the model applies: the trained params, joined to the frozen base in a LoRA run."""
  frozen = getattr(state, "frozen", None)
  if frozen is None:
    return params(state)
  from grit_jax.modeling import lora

  return lora.combine(frozen, state.params)


def export_params(state, model_config):
  """(params, model config) of the plain model a run exports: LoRA adapters merged into the base's kernels."""
  if getattr(state, "frozen", None) is None:
    return params(state), model_config
  from grit_jax.modeling import lora

  return lora.merge(model_params(state), lora.scale(model_config)), lora.base_config(model_config)


def replace_params(state, new_params):
  return state.replace(params=new_params) if hasattr(state, "replace") else dict(state, params=new_params)


def to_host(tree):
  """Fully-addressable numpy copies of (possibly multi-host sharded) arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)
