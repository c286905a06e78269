"""The GRIT loss over a global batch and its gradient (traced inside the jit of training/step.py): the embedding
passes and L_rep, the generative pass and L_gen, and one gradient computed three equal ways (plain, gradient
accumulation, GradCache; the step's docstring says how)."""
from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from grit_jax import common_types as ct
from grit_jax import contract, objectives
from grit_jax import sharding as mesh_lib
from grit_jax.errors import GritJaxError
from grit_jax.modeling import model as model_lib
from grit_jax.training import gradcache as gc

# The batch keys (common_types): padded passes [B, T]; packed passes (grit_jax.data.packing.pack_sequences) [U, R, L]
# arrays (U packing units = device shares, R rows of L tokens) and {pass}_lengths [U, n] (n sequences per unit), a
# pass packed when it has segment ids; pos_key [Bq, 2] (data.batching.positive_keys), optional: masks duplicate
# positives in L_rep.
is_packed = ct.is_packed


class GritObjective:
  """The pieces of the GRIT loss over a global batch (traced inside the step's jit)."""

  def __init__(self, model_config, loss_cfg, mesh, rules, attn: str | ct.AttnMode = "bbcc"):
    from grit_jax.modeling import Transformer

    self.config, self.loss_cfg, self.mesh, self.rules = model_config, loss_cfg, mesh, rules
    self.model = Transformer(model_config)
    self.causal_q, self.causal_p = ct.parse_attn(attn)
    contract.check_loss(loss_cfg)
    self.batch_axes = mesh_lib.batch_axes(mesh, rules)
    self.shards = mesh_lib.num_batch_shards(mesh, rules)

  frozen = None  # with LoRA: the frozen base (set by `with_frozen`), and `params` are the adapters

  def with_frozen(self, frozen) -> "GritObjective":
    """This objective over LoRA adapters: every pass applies the adapters joined to the frozen base `frozen` (a
    traced argument of the step), so gradients flow to the adapters only; None = plain params."""
    if frozen is None:
      return self
    obj = copy.copy(self)
    obj.frozen = frozen
    return obj

  def variables(self, params) -> dict:
    from grit_jax.modeling import lora

    return {"params": params if self.frozen is None else lora.combine(self.frozen, params)}

  # -- embedding side -------------------------------------------------------------------------------------------

  def embed(self, params, ids, mask, pool_mask, *, causal: bool):
    """[b, T] int32 x3 -> pooled representations [b, D] float32 (normalised later, inside the loss)."""
    out = self.model.apply(self.variables(params), ids, mask, causal=causal, return_logits=False)
    return objectives.pool(out.hidden, pool_mask, method=self.loss_cfg.pooling)

  def embed_query(self, params, ids, mask, pool_mask):
    return self.embed(params, ids, mask, pool_mask, causal=self.causal_q)

  def embed_passage(self, params, ids, mask, pool_mask):
    return self.embed(params, ids, mask, pool_mask, causal=self.causal_p)

  def embed_packed(self, params, ids_URL, segment_ids_URL, positions_URL, pool_mask_URL, *, num_per_unit: int,
                   causal: bool):
    """Packed rows [U, R, L] x4 -> pooled representations [U * n, D] float32 in batch order. Tokens attend only
    inside their own sequence (segment ids), positions restart per sequence, each sequence pooled on its own text
    tokens (grit_jax.objectives.pool_packed). With a subset of each unit's rows (GradCache chunks), the sequences
    of the other rows come out as 0: a sum over row chunks gives the full result."""
    pooled_UND, _ = model_lib.embed_packed(self.model, self.variables(params), ids_URL, segment_ids_URL,
                                           positions_URL, pool_mask_URL, num_per_unit=num_per_unit, causal=causal,
                                           pooling=self.loss_cfg.pooling)
    return pooled_UND.reshape(ids_URL.shape[0] * num_per_unit, -1)

  def pass_inputs(self, batch: dict, name: str):
    """(representation fn(params, *arrays), arrays, packed) of the query or passage pass of a batch."""
    causal = self.causal_q if name == ct.QUERY else self.causal_p
    if is_packed(batch, name):
      fn = functools.partial(self.embed_packed, num_per_unit=batch[ct.key(name, ct.LENGTHS)].shape[1], causal=causal)
      return (lambda p, *a: fn(p, *a)), tuple(batch[ct.key(name, f)] for f in ct.packed_fields(name)), True
    fn = self.embed_query if name == ct.QUERY else self.embed_passage
    return fn, tuple(batch[k] for k in ct.padded_keys(name)), False

  def rep_loss(self, q_BD, p_PD, batch: dict):
    """(L_rep, metrics: accuracy, and loss_distill when distilling) over the global batch, with the configured
    gradient semantics (objectives.representation_loss: Matryoshka dims, distillation, and the batch's per-query
    rows: pos_key, no_in_batch_neg, teacher_scores)."""
    l = self.loss_cfg
    g = p_PD.shape[0] // q_BD.shape[0]
    distill = float(l.distill_weight) if ct.TEACHER_SCORES in batch else 0.0  # eval batches carry no scores
    rows = {k: batch.get(k) for k in ct.QUERY_ROW_KEYS}
    kw = dict(normalize=l.normalize, dims=tuple(l.matryoshka_dims), dim_weights=tuple(l.matryoshka_weights),
              distill_weight=distill, distill_temperature=float(l.distill_temperature))
    if l.contrastive_grad == "gritlm":
      out = objectives.gathered_representation_loss(q_BD, p_PD, self.mesh, self.batch_axes, l.temperature, g,
                                                    grad="gritlm", rows=rows, **kw)
    else:
      out = objectives.representation_loss(q_BD, p_PD, l.temperature, g,
                                           **{k: v for k, v in rows.items() if v is not None}, **kw)
    metrics = {"accuracy": out["accuracy"]}
    if distill:
      metrics.update(loss_distill=out["distill"], loss_contrastive=out["contrastive"])
    return out["loss"], metrics

  # -- generative side ------------------------------------------------------------------------------------------

  def lm_weights(self, gen: dict):
    """Per-target weights [..., L-1] of the whole generative batch (padded rows [B, L] or packed [U, R, L])."""
    l = self.loss_cfg
    kw = {}
    if is_packed(gen, ct.GEN):  # the sample of each target token; samples, not rows, are what the modes count
      kw = dict(target_samples=gen[ct.GEN_SEGMENT_IDS][..., 1:] - 1, num_samples=gen[ct.GEN_LENGTHS].size)
    return objectives.lm_token_weights(gen[ct.GEN_LABELS], l.lm_loss_mode, l.lm_loss_sub_batches,
                                       l.lm_token_factor, **kw)

  def gen_terms(self, params, gen: dict, weights):
    """(sum of weighted next-token CE, MoE aux loss) of a (micro-)batch of generative rows ([B, L], or packed
    [U, R, L] with segment ids and positions)."""
    L = gen[ct.GEN_IDS].shape[-1]
    flat = lambda x: None if x is None else x.reshape(-1, L)
    packed = is_packed(gen, ct.GEN)
    out = self.model.apply(self.variables(params), flat(gen[ct.GEN_IDS]), None if packed else gen[ct.GEN_MASK],
                           causal=True, positions=flat(gen.get(ct.GEN_POSITIONS)),
                           segment_ids=flat(gen.get(ct.GEN_SEGMENT_IDS)))
    return (objectives.lm_loss(out.logits, flat(gen[ct.GEN_LABELS]), weights=weights.reshape(-1, L - 1)),
            out.aux_loss)

  def total(self, loss_rep=None, loss_gen=None, aux=None):
    l = self.loss_cfg
    return objectives.grit_loss(loss_rep, loss_gen, aux, lambda_rep=l.lambda_rep, lambda_gen=l.lambda_gen,
                                router_aux_coef=self.config.router_aux_loss_coef)

  # -- whole batch ----------------------------------------------------------------------------------------------

  def loss(self, params, batch):
    """(objective, metrics) of the full batch in one pass (the plain step and evaluation)."""
    metrics = {}
    loss_rep = loss_gen = aux = None
    if ct.GEN_IDS in batch:
      loss_gen, aux = self.gen_terms(params, batch, self.lm_weights(batch))
      metrics.update(loss_gen=loss_gen, aux_loss=aux)
    if ct.QUERY_IDS in batch:
      (q_fn, q_in, _), (p_fn, p_in, _) = self.pass_inputs(batch, ct.QUERY), self.pass_inputs(batch, ct.PASSAGE)
      loss_rep, rep_metrics = self.rep_loss(q_fn(params, *q_in), p_fn(params, *p_in), batch)
      metrics.update(loss_rep=loss_rep, **rep_metrics)
    total = self.total(loss_rep, loss_gen, aux)
    metrics["loss"] = total
    return total, metrics

  def chunked_grads(self, params, batch, grad_accum: int, emb_chunks: int):
    """((objective, metrics), grads) with the generative batch in `grad_accum` micro-batches and the embedding
    batch GradCache'd in `emb_chunks` chunks. Equal to jax.value_and_grad(self.loss) up to float rounding."""
    l = self.loss_cfg
    grads = jax.tree.map(jnp.zeros_like, params)
    metrics = {}
    loss_rep = loss_gen = aux = None
    if ct.GEN_IDS in batch:
      packed = is_packed(batch, ct.GEN)
      gen = {k: v for k, v in batch.items() if k.startswith(ct.key(ct.GEN, "")) and k != ct.GEN_LENGTHS}
      gen["weights"] = jnp.pad(self.lm_weights(batch), [(0, 0)] * (gen[ct.GEN_IDS].ndim - 1) + [(0, 1)])
      if packed:  # micro-batches = row chunks of every unit (the units stay on their devices)
        micro = {k: self._chunk_constraint(gc.split_rows(v, grad_accum), self.shards) for k, v in gen.items()}
      else:
        shards = gc.chunk_shards([gen[ct.GEN_IDS].shape[0]], grad_accum, self.shards)
        micro = {k: self._chunk_constraint(gc.split_chunks(v, grad_accum, shards), shards) for k, v in gen.items()}

      def micro_objective(p, mb):
        ce_sum, mb_aux = self.gen_terms(p, mb, mb["weights"][..., :-1])
        return self.total(None, ce_sum, mb_aux / grad_accum), (ce_sum, mb_aux)

      def body(acc, mb):
        (_, terms), g = jax.value_and_grad(micro_objective, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, acc, g), terms

      grads, (ce_parts, aux_parts) = jax.lax.scan(body, grads, micro)
      loss_gen, aux = ce_parts.sum(), aux_parts.mean()
      metrics.update(loss_gen=loss_gen, aux_loss=aux)
    if ct.QUERY_IDS in batch:
      (q_fn, q_in, q_packed), (p_fn, p_in, p_packed) = (self.pass_inputs(batch, ct.QUERY),
                                                        self.pass_inputs(batch, ct.PASSAGE))
      padded_rows = [x[0].shape[0] for x, packed in ((q_in, q_packed), (p_in, p_packed)) if not packed]
      shards = gc.chunk_shards(padded_rows, emb_chunks, self.shards) if padded_rows else self.shards

      def rep_objective(q_BD, p_PD):
        loss, rep_metrics = self.rep_loss(q_BD, p_PD, batch)
        return l.lambda_rep * loss, (loss, rep_metrics)

      (_, (loss_rep, rep_metrics)), g_rep = gc.gradcache((q_fn, p_fn), params, (q_in, p_in), rep_objective, emb_chunks,
                                                 shards=shards, packed=(q_packed, p_packed),
                                                 constrain=functools.partial(self._chunk_constraint, shards=shards))
      grads = jax.tree.map(jnp.add, grads, g_rep)
      metrics.update(loss_rep=loss_rep, **rep_metrics)
    total = self.total(loss_rep, loss_gen, aux)
    metrics["loss"] = total
    return (total, metrics), grads

  def value_and_grad(self, params, batch, grad_accum: int = 1, gradcache_chunk: int = 0):
    """((objective, metrics), grads) of a batch: plain, accumulated or GradCache'd (see the module doc)."""
    if grad_accum < 1 or gradcache_chunk < 0:
      raise GritJaxError(f"config.train.grad_accum={grad_accum} / gradcache_chunk={gradcache_chunk}: expected "
                         "grad_accum >= 1 and gradcache_chunk >= 0")
    emb_chunks = 1
    if ct.QUERY_IDS in batch:
      num_q = (batch[ct.QUERY_LENGTHS].size if is_packed(batch, ct.QUERY) else batch[ct.QUERY_IDS].shape[0])
      if gradcache_chunk and num_q % gradcache_chunk:
        raise GritJaxError(f"config.train.gradcache_chunk={gradcache_chunk} does not divide the {num_q} queries "
                           "of the batch")
      emb_chunks = num_q // gradcache_chunk if gradcache_chunk else grad_accum
      if num_q % emb_chunks:
        raise GritJaxError(f"config.train.grad_accum={grad_accum}: does not divide the {num_q} queries of the batch")
      for name in ct.EMBEDDING_PASSES:
        rows = batch[ct.key(name, ct.IDS)].shape[1] if is_packed(batch, name) else 0
        if rows % emb_chunks:
          raise GritJaxError(f"packed {name} pass: {rows} rows per unit do not split into the {emb_chunks} "
                             "GradCache chunks (the data iterator rounds rows up to a multiple of them)")
    if ct.GEN_IDS in batch:
      if is_packed(batch, ct.GEN):
        rows, samples = batch[ct.GEN_IDS].shape[1], batch[ct.GEN_LENGTHS].size
        if rows % grad_accum:
          raise GritJaxError(f"config.train.grad_accum={grad_accum}: does not divide the {rows} packed generative "
                             "rows per unit")
      else:
        rows = samples = batch[ct.GEN_IDS].shape[0]
        if rows % grad_accum:
          raise GritJaxError(f"config.train.grad_accum={grad_accum}: does not divide the {rows} generative rows")
      sub = self.loss_cfg.lm_loss_sub_batches
      if self.loss_cfg.lm_loss_mode == "mixed" and (sub < 1 or samples % sub):
        raise GritJaxError(f"config.loss.lm_loss_sub_batches={sub}: must divide the {samples} generative samples")
    if grad_accum == 1 and emb_chunks == 1:
      return jax.value_and_grad(self.loss, has_aux=True)(params, batch)
    return self.chunked_grads(params, batch, grad_accum, emb_chunks)

  def _chunk_constraint(self, x_NC, shards: int):
    """Chunked arrays [n, c, ...]: chunk rows stay split over the batch axes (when chunks span every shard)."""
    if not self.batch_axes or shards != self.shards or x_NC.shape[1] % shards:
      return x_NC
    return jax.lax.with_sharding_constraint(x_NC, NamedSharding(self.mesh, P(None, self.batch_axes)))
