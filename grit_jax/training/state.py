"""The train state (step, params, optimizer state), created directly sharded on the mesh.

Nothing is materialised on one device first: `jax.eval_shape` of the init gives the shapes and the logical axis
names of every parameter (and of the optimizer moments, which mirror them), the rules turn those into mesh
shardings, and the init itself runs as one `jax.jit` with those `out_shardings`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from grit_jax import sharding as mesh_lib


class TrainState(flax.struct.PyTreeNode):
  """step [] int32, params (float32 master weights, unboxed: what is trained), opt_state; `tx` is static (not
  saved). frozen: None, or with LoRA the frozen base (in lora_base_dtype) while params are only the adapters
  (grit_jax.modeling.lora): it gets no gradient and no optimizer state, and checkpoints leave it out."""
  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  frozen: Any = None

  @classmethod
  def create(cls, params, tx, frozen=None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx, frozen=frozen)

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def _init_boxed(model_config, tx, rng):
  from grit_jax.modeling import Transformer

  ids = jnp.zeros((1, 8), jnp.int32)  # [B, T]: shapes of the params do not depend on it
  params = Transformer(model_config).init(rng, ids, jnp.ones_like(ids), causal=True)["params"]
  if not model_config.lora_rank:
    return TrainState.create(params, tx)  # boxed (LogicallyPartitioned) leaves carry the axis names
  from grit_jax.modeling import lora

  base, adapters = lora.split(params)
  dtype = jnp.dtype(model_config.lora_base_dtype)
  base = jax.tree.map(lambda b: b.replace_boxed(b.unbox().astype(dtype)), base,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return TrainState.create(adapters, tx, frozen=base)


def state_shardings(model_config, tx, mesh, rules, rng=None):
  """(abstract TrainState of ShapeDtypeStructs, matching tree of NamedShardings) without allocating anything."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return mesh_lib.logical_shardings(jax.eval_shape(lambda r: _init_boxed(model_config, tx, r), rng), mesh, rules)


def create_train_state(model_config, tx, mesh, rules, rng, with_frozen: bool = True) -> TrainState:
  """A TrainState whose params and optimizer state are created sharded over `mesh` (one jitted init). LoRA with
  `with_frozen=False`: no random base (the compiler drops its init; the real one is read next), the same adapters."""
  _, shardings = state_shardings(model_config, tx, mesh, rules, rng)
  keep = lambda state: state if with_frozen else state.replace(frozen=None)  # noqa: E731
  init = jax.jit(lambda r: keep(nn.meta.unbox(_init_boxed(model_config, tx, r))), out_shardings=keep(shardings))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return init(rng)

