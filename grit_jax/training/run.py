"""The run's building blocks, made once from a validated config: the model config, mesh and rules, optimizer,
jitted train step, the (possibly restored or imported) sharded state, and host copies of sharded trees."""
from __future__ import annotations

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
    self._create = lambda: state_lib.create_train_state(self.model_config, self.tx, self.mesh, self.rules, rng)
    self.train_step = step_lib.make_train_step(self.model_config, config, self.mesh, self.rules)

  def abstract_state(self):
    """The state's shapes, dtypes and shardings on this mesh, without allocating it (the restore target)."""
    from grit_jax.training import state as state_lib

    shapes, shardings = state_lib.state_shardings(self.model_config, self.tx, self.mesh, self.rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

  def init_state(self):
    """Fresh state (seeded init), with the weights of config.init_from when it is set."""
    state = self._create()
    if self.config.init_from:
      state = replace_params(state, load_init_params(self.config.init_from, self.model_config, params(state),
                                                     self.config.train.allow_unverified_checkpoints))
    return state


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


def params(state):
  return state.params if hasattr(state, "params") else state["params"]


def replace_params(state, new_params):
  return state.replace(params=new_params) if hasattr(state, "replace") else dict(state, params=new_params)


def to_host(tree):
  """Fully-addressable numpy copies of (possibly multi-host sharded) arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)
