"""The GRIT train step: one `jax.jit` over the sharded state and the global batch, with donated state.

loss = lambda_rep * L_rep(queries, passages) + lambda_gen * L_gen(generative batch) + router_aux_coef * aux
- Query and passage passes: `causal` per config.attn (chars 1-2; b = bidirectional), no LM head; mean (or
  weightedmean / lasttoken) pooling in float32; cosine / temperature; in-batch negatives over the global batch
  (grit_jax.objectives: `exact` or `gritlm` gradients).
- Generative pass: causal, LM head, next-token loss (mixed / token), plus the MoE load-balancing loss (Mixtral).
Batches without query_* keys (generative-only) or without gen_* keys (embedding-only) drop that term.

Three ways to compute the same gradient (tests/test_train_step.py checks they agree):
- plain (grad_accum=1, gradcache_chunk=0): one value_and_grad over the whole batch.
- gradient accumulation (grad_accum=k): the generative batch runs in k micro-batches (lax.scan, gradients summed;
  the per-token weights of L_gen come from the full batch, so the sum is exactly the full-batch L_gen). The
  contrastive loss is not a sum over micro-batches (every query scores every passage of the global batch), so the
  embedding part runs GradCache with k chunks: representations of all chunks first, L_rep over the full batch,
  then chunk-by-chunk backward. In-batch negatives are therefore always the whole global batch. The one
  approximation: the MoE load-balancing loss is averaged over micro-batches (as the reference per device).
- GradCache (gradcache_chunk=c): the embedding part in chunks of c queries (and their c*g passages); the
  generative part in grad_accum micro-batches (one by default, the reference's --no_gen_gas).

Metrics: loss, loss_rep, accuracy (contrastive top-1 within the global batch), loss_gen, aux_loss, grad_norm
(before clipping), lr (used by this update), tokens (non-padding tokens of all passes).

The loss and its three gradients: training/grit_objective.py (GritObjective); here the jit over the mesh.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from grit_jax import common_types as ct
from grit_jax import sharding as mesh_lib
from grit_jax.training import optimizer as opt_lib
from grit_jax.training.grit_objective import GritObjective


def _split_config(loss_cfg, attn, grad_accum, gradcache_chunk):
  """Accepts config.loss or a whole recipe config (then attn / train.grad_accum / train.gradcache_chunk come
  from it, unless given); attn comes back parsed (common_types.AttnMode)."""
  if "loss" in loss_cfg:
    full = loss_cfg
    loss_cfg = full.loss
    attn = full.attn if attn is None else attn
    grad_accum = full.train.grad_accum if grad_accum is None else grad_accum
    gradcache_chunk = full.train.gradcache_chunk if gradcache_chunk is None else gradcache_chunk
  return loss_cfg, ct.parse_attn("bbcc" if attn is None else attn), 1 if grad_accum is None else grad_accum, \
      0 if gradcache_chunk is None else gradcache_chunk


def _pass_tokens(batch: dict, name: str):
  """(text tokens, token slots) of one pass: what the pass holds vs what the accelerator computes."""
  real = batch[ct.key(name, ct.SEGMENT_IDS)] > 0 if ct.is_packed(batch, name) else batch[ct.key(name, ct.MASK)] > 0
  return jnp.sum(real.astype(jnp.int32)), real.size


def batch_tokens(batch: dict):
  """Non-padding tokens of every pass in the batch."""
  return sum((_pass_tokens(batch, n)[0] for n in ct.PASSES if ct.has_pass(batch, n)), jnp.zeros((), jnp.int32))


def packing_efficiency(batch: dict) -> dict:
  """efficiency_{query,passage,gen}: text tokens / token slots of each pass (padded or packed)."""
  out = {}
  for name in ct.PASSES:
    if ct.has_pass(batch, name):
      tokens, slots = _pass_tokens(batch, name)
      out[f"efficiency_{name}"] = tokens.astype(jnp.float32) / slots
  return out


class MeshFn:
  """A jitted function called (and lowered) under the mesh and the logical-axis rules, so the model's
  `with_logical_constraint`s resolve to mesh axes at trace time. `build(first_arg)` makes the jitted function on
  the first call (when it needs the state's shardings)."""

  def __init__(self, mesh, rules, build):
    self.mesh, self.rules, self._build, self.jitted = mesh, rules, build, None

  def _get(self, first):
    if self.jitted is None:
      self.jitted = self._build(first)
    return self.jitted

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._get(args[0])(*args)

  def trace(self, *args):
    """jax's Traced program (`.jaxpr`, `.lower()`) under the mesh and rules; call `.lower()` under them too."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._get(args[0]).trace(*args)

  def lower(self, *args):
    """AOT lowering (abstract ShapeDtypeStruct args with shardings work): `.lower(...).compile()`."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._get(args[0]).lower(*args)


def _shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def input_batch_sharding(mesh) -> NamedSharding:
  """Sharding of every batch array (leading dim over the input batch axes, as grit_jax.data.to_global_batch)."""
  return NamedSharding(mesh, P(tuple(a for a in mesh_lib.INPUT_BATCH_AXES if a in mesh.axis_names)))


def packing_layout(config, mesh) -> dict:
  """What the data iterator packs for (make_train_iterator's packing_kw): one unit per input batch shard of `mesh`,
  and rows that split into the step's embedding chunks and generative micro-batches."""
  t, d = config.train, config.data
  shards = math.prod(mesh.shape[a] for a in mesh_lib.INPUT_BATCH_AXES if a in mesh.axis_names)
  emb_chunks = d.embedding_batch_size // t.gradcache_chunk if t.gradcache_chunk else t.grad_accum
  return {"batch_shards": shards, "chunks": (max(emb_chunks, 1), t.grad_accum)}


def compiler_options(mesh) -> dict | None:
  """XLA options of the train step's compile. On a CPU mesh, no while-loop invariant code motion: XLA:CPU converts
  each layer's weights to another dtype for some of its ops, and that pass hoists the conversions out of the scanned
  layers, keeping a converted copy of the whole stack through the step (LoRA on SmolLM2: peak 3.05 -> 2.10 GiB
  without it, 1.39x -> 1.58x the full step, same loss; BENCHMARKS.md). TPUs and GPUs keep the pass."""
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
  return None


def make_train_step(model_config, loss_cfg, mesh, rules, *, attn: str | None = None, grad_accum: int | None = None,
                    gradcache_chunk: int | None = None, state_shardings: Any = None, donate: bool = True):
  """Returns step(state, batch) -> (new state, metrics): one jitted GRIT update.

  model_config: ModelConfig; loss_cfg: config.loss (or the whole recipe config, from which attn,
  train.grad_accum and train.gradcache_chunk are then read); mesh, rules: grit_jax.sharding.make_mesh;
  attn: config.attn; grad_accum: generative micro-batches and, with embedding keys, GradCache chunks;
  gradcache_chunk: > 0 = GradCache with this many queries per chunk; state_shardings: the TrainState's sharding
  tree (default: taken from the first state passed in). The state is donated.
  """
  loss_cfg, attn, grad_accum, gradcache_chunk = _split_config(loss_cfg, attn, grad_accum, gradcache_chunk)
  obj = GritObjective(model_config, loss_cfg, mesh, rules, attn)

  def step(state, batch):
    (loss, metrics), grads = obj.with_frozen(getattr(state, "frozen", None)).value_and_grad(
        state.params, batch, grad_accum, gradcache_chunk)
    new_state = state.apply_gradients(grads)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), tokens=batch_tokens(batch),
                   **packing_efficiency(batch))
    try:
      metrics["lr"] = opt_lib.current_lr(new_state.opt_state)
    except ValueError:  # an optimizer not built by make_optimizer: no lr to report
      pass
    return new_state, metrics

  batch_sharding = input_batch_sharding(mesh)

  def build(state):
    shardings = state_shardings if state_shardings is not None else _shardings_of(state)
    return jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options(mesh))

  return MeshFn(mesh, rules, build)


def make_grad_fn(model_config, loss_cfg, mesh, rules, *, attn: str | None = None, grad_accum: int | None = None,
                 gradcache_chunk: int | None = None):
  """Returns grad_fn(params, batch) -> ((loss, metrics), grads), jitted: the gradient the train step applies
  (before clipping), for tests and tools."""
  loss_cfg, attn, grad_accum, gradcache_chunk = _split_config(loss_cfg, attn, grad_accum, gradcache_chunk)
  obj = GritObjective(model_config, loss_cfg, mesh, rules, attn)
  fn = lambda params, batch: obj.value_and_grad(params, batch, grad_accum, gradcache_chunk)
  batch_sharding = input_batch_sharding(mesh)
  return MeshFn(mesh, rules, lambda params: jax.jit(fn, in_shardings=(_shardings_of(params), batch_sharding),
                                                    compiler_options=compiler_options(mesh)))
