"""The GRIT objective as pure functions: pooling, the contrastive loss (L_rep) with in-batch negatives gathered
across the mesh, the next-token loss (L_gen) and their combination.

Every function works on plain arrays (float32 math whatever the input dtype) and can be checked with numbers worked
out by hand (grit_reference.md section 10; tests/test_objectives.py).

Cross-device negatives, two gradient semantics (config.loss.contrastive_grad):
- `exact`: the loss is written on the global, batch-sharded arrays inside one `jax.jit`; XLA gathers the passages
  of every device and the gradient is the true gradient of the global loss L_rep.
- `gritlm`: the reference's behaviour. Each of the W batch shards gathers every query/passage *without* gradient,
  puts its own live rows back, computes the (identical) global loss, and the shards' gradients are averaged. The
  applied gradient is therefore (1/W) * grad L_rep while the reported loss is L_rep (`gathered_contrastive_loss`).
  W = the number of shards the batch is split into = the product of the sizes of the mesh axes that shard the
  batch: those of the `batch` logical rule, data x fsdp (x expert with expert parallelism; sharding.batch_axes).
The shipped recipes use `exact` (configs/base.py): it does not depend on the device count, so a recipe behaves the
same on 8 GPUs, a 256-chip pod or a laptop, and loss curves are comparable across meshes. `gritlm` is there to
reproduce the reference's effective weighting of L_rep vs L_gen (1/W), which changes with W; with `exact`, the same
effective weighting is `lambda_rep = 1/W` (see grit_reference.md section 3, "Combination").
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from grit_jax.common_types import IGNORE, TOKEN_POOLINGS as POOLINGS

LM_MODES = ("mixed", "token")
CONTRASTIVE_GRADS = ("exact", "gritlm")


# ---------------------------------------------------------------------------------------------------------------
# Pooling

def l2_normalize(x, eps: float = 1e-12):
  """x / ||x|| over the last axis, in float32 (zero vectors stay zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pool_weights(pool_mask, method: str = "mean"):
  """Token weights of each pooled vector, over the last axis of pool_mask [..., T] (1 = pooled token) -> float32
  [..., T]. mean: m. weightedmean: m * cumsum(m) (1, 2, 3, ... from the first pooled token). lasttoken: one-hot at
  the last position where m = 1 (position 0 if none). The one rule for padded and packed pooling."""
  m = pool_mask.astype(jnp.float32)
  if method == "mean":
    return m
  if method == "weightedmean":
    return m * jnp.cumsum(m, axis=-1)
  if method == "lasttoken":
    T = m.shape[-1]
    last = jnp.max(jnp.where(m > 0, jnp.arange(T), 0), axis=-1)  # [...]
    return jax.nn.one_hot(last, T, dtype=jnp.float32)
  raise ValueError(f"pooling method {method!r}: expected one of {POOLINGS}")


def _weighted_mean(w, h, spec: str):
  out = jnp.einsum(spec, w, h.astype(jnp.float32))
  return out / jnp.maximum(w.sum(axis=-1)[..., None], 1e-9)


def pool(hidden, pool_mask, method: str = "mean", normalize: bool = False):
  """hidden [B, T, D], pool_mask [B, T] (1 = pooled token: the text, not BOS / instruction / format tokens, not
  padding) -> [B, D] float32, weighted by `pool_weights`. Rows with an empty mask give 0 (mean / weightedmean)
  instead of NaN."""
  out_BD = _weighted_mean(pool_weights(pool_mask, method), hidden, "bt,btd->bd")
  return l2_normalize(out_BD) if normalize else out_BD


def pool_packed(hidden_UTD, pool_mask_UT, sequence_UT, num_per_unit: int, method: str = "mean"):
  """Pooling of packed rows: hidden [U, T, D] (the T tokens of each packing unit's rows, concatenated),
  pool_mask [U, T], sequence [U, T] (the token's sequence index in the whole pass, -1 = padding; unit u holds
  sequences [u*n, (u+1)*n), n = num_per_unit) -> [U, n, D] float32, sequence u*n+i at [u, i].

  Each sequence's weights are `pool_weights` of the pool mask restricted to its own tokens, so every pooling equals
  the padded one of that sequence (lasttoken of an empty mask gives 0 here, not position 0). The pooled vectors are
  computed inside their unit: a unit is one device's rows, so nothing crosses devices.
  """
  U = hidden_UTD.shape[0]
  local_UT = sequence_UT - (jnp.arange(U) * num_per_unit)[:, None]  # -1 - u*n for padding: out of range
  own_UNT = (local_UT[:, None, :] == jnp.arange(num_per_unit)[None, :, None])  # [U, n, T]
  m_UNT = jnp.where(own_UNT, pool_mask_UT[:, None, :].astype(jnp.float32), 0.0)
  w_UNT = pool_weights(m_UNT, method) * (m_UNT.sum(-1, keepdims=True) > 0)
  return _weighted_mean(w_UNT, hidden_UTD, "unt,utd->und")


# ---------------------------------------------------------------------------------------------------------------
# Contrastive loss (L_rep)

def contrastive_logits(q, p, temperature: float = 0.02, normalize: bool = True):
  """q [B, D], p [B*g, D] -> similarity / temperature [B, B*g] float32 (cosine when `normalize`, else dot)."""
  q_BD, p_PD = q.astype(jnp.float32), p.astype(jnp.float32)
  if normalize:
    q_BD, p_PD = l2_normalize(q_BD), l2_normalize(p_PD)
  return jnp.einsum("bd,pd->bp", q_BD, p_PD, precision=jax.lax.Precision.HIGHEST) / temperature


def false_negative_mask(pos_key, group_size: int):
  """[B, B*g] bool: True where column j*g (query j's positive) holds the same text as query i's own positive
  (j != i): a duplicate, not a negative. pos_key [B, K] int32: a hash of each query's positive (equal keys = equal
  texts)."""
  B = pos_key.shape[0]
  same_BB = jnp.all(pos_key[:, None, :] == pos_key[None, :, :], axis=-1) & ~jnp.eye(B, dtype=bool)
  hard_BBg = jnp.zeros((B, B, group_size - 1), bool)  # hard negatives are never masked
  return jnp.concatenate([same_BB[:, :, None], hard_BBg], axis=-1).reshape(B, B * group_size)


def own_group_mask(no_in_batch_neg, group_size: int):
  """[B, B*g] bool: True for every column outside row i's own group (its positive and its g-1 hard negatives) where
  no_in_batch_neg[i] [B] is set: such a row (a file of data.no_in_batch_negatives, e.g. classification pairs whose
  'passages' are label texts shared by many rows) is contrasted with its own candidates only. Other rows still
  see its passages as negatives (the mask is per row, as FlagEmbedding's no_in_batch_neg files in their own
  batches)."""
  B = no_in_batch_neg.shape[0]
  outside_BP = jnp.repeat(~jnp.eye(B, dtype=bool), group_size, axis=1)
  return outside_BP & (no_in_batch_neg[:, None] > 0)


def candidate_logits(q, p, temperature: float = 0.02, group_size: int = 2, *, normalize: bool = True, pos_key=None,
                     no_in_batch_neg=None):
  """`contrastive_logits` [B, B*g] with the columns that are no candidate of a row set to -1e9 (exp() = 0): another
  query's positive with the same text (pos_key, `false_negative_mask`) and, for rows with no_in_batch_neg, every
  column outside the row's own group (`own_group_mask`)."""
  logits_BP = contrastive_logits(q, p, temperature, normalize)
  if pos_key is not None:
    logits_BP = jnp.where(false_negative_mask(pos_key, group_size), -1e9, logits_BP)
  if no_in_batch_neg is not None:
    logits_BP = jnp.where(own_group_mask(no_in_batch_neg, group_size), -1e9, logits_BP)
  return logits_BP


def own_group_logits(logits_BP, group_size: int):
  """[B, B*g] -> [B, g]: each row's logits over its own candidates (its positive, then its hard negatives)."""
  B = logits_BP.shape[0]
  return logits_BP.reshape(B, B, group_size)[jnp.arange(B), jnp.arange(B)]


def distill_loss(student_logits_BG, teacher_scores_BG, teacher_temperature: float = 1.0):
  """KL(teacher || student) over each query's own g candidates (positive first, then its hard negatives), mean
  over the rows that have teacher scores (NaN scores = a row without; 0 when no row has any).

  teacher = softmax(scores / teacher_temperature); student = log_softmax(student logits), the logits being the
  contrastive ones (similarity / loss.temperature). FlagEmbedding's `kd_loss` (kl_div) is the cross-entropy
  -sum(teacher * log student) with teacher_temperature 1: the same gradient; this is it minus the teacher's entropy,
  so a student that matches the teacher scores 0."""
  has_B = ~jnp.any(jnp.isnan(teacher_scores_BG), axis=-1)
  scores_BG = jnp.where(has_B[:, None], teacher_scores_BG.astype(jnp.float32), 0.0)
  teacher_BG = jax.nn.softmax(scores_BG / teacher_temperature, axis=-1)
  kl_B = optax.kl_divergence(jax.nn.log_softmax(student_logits_BG.astype(jnp.float32), axis=-1), teacher_BG)
  return jnp.sum(jnp.where(has_B, kl_B, 0.0)) / jnp.maximum(jnp.sum(has_B), 1)


def contrastive_loss(q, p, temperature: float = 0.02, group_size: int = 2, *, normalize: bool = True,
                     return_accuracy: bool = False, pos_key=None, no_in_batch_neg=None):
  """In-batch-negatives InfoNCE: q [B, D] queries, p [B*g, D] passages (query i's positive at row i*g, then its
  g-1 hard negatives). Every passage is a candidate for every query; the target of row i is column i*g; loss =
  mean over rows of the cross-entropy of (cosine / temperature).

  pos_key [B, K] int (optional): a hash of each query's positive; another query's positive with the same key is
  left out of row i's candidates (it is row i's own positive text, not a negative; sentence-transformers' no-
  duplicates sampler keeps such rows out of one batch).
  no_in_batch_neg [B] int (optional): rows whose candidates are their own group only (`own_group_mask`).

  Returns the loss, or (loss, top-1 accuracy) with `return_accuracy`.
  """
  B = q.shape[0]
  if p.shape[0] != B * group_size:
    raise ValueError(f"contrastive_loss: {p.shape[0]} passages for {B} queries x group_size {group_size}")
  logits_BP = candidate_logits(q, p, temperature, group_size, normalize=normalize, pos_key=pos_key,
                               no_in_batch_neg=no_in_batch_neg)
  target_B = jnp.arange(B) * group_size
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BP, target_B).mean()
  if not return_accuracy:
    return loss
  accuracy = jnp.mean((jnp.argmax(logits_BP, axis=-1) == target_B).astype(jnp.float32))
  return loss, accuracy


def representation_loss(q, p, temperature: float = 0.02, group_size: int = 2, *, normalize: bool = True,
                        dims: Sequence[int] = (), dim_weights: Sequence[float] = (), distill_weight: float = 0.0,
                        distill_temperature: float = 1.0, pos_key=None, no_in_batch_neg=None, teacher_scores=None):
  """The embedding objective L_rep over the global batch -> {"loss", "contrastive", "distill", "accuracy"}.

  loss = sum_k w_k * (contrastive_k + distill_weight * distill_k), k over the Matryoshka `dims` (prefixes
  q[:, :k], p[:, :k], normalised inside the logits when `normalize`; weights `dim_weights`, default 1 each, as
  sentence-transformers' MatryoshkaLoss; the full dimension counts only when listed). dims=() = the full
  dimension alone, weight 1: plain `contrastive_loss`. contrastive_k: `contrastive_loss` (pos_key,
  no_in_batch_neg masks); distill_k: `distill_loss` of the row's own-group logits against teacher_scores [B, g]
  (NaN = no scores; only computed when distill_weight > 0). "contrastive" / "distill" are the weighted sums over
  the dims; "accuracy" is top-1 at the largest dim.
  """
  B, D = q.shape
  if p.shape[0] != B * group_size:
    raise ValueError(f"representation_loss: {p.shape[0]} passages for {B} queries x group_size {group_size}")
  dims = tuple(dims) or (D,)
  weights = tuple(dim_weights) or (1.0,) * len(dims)
  if max(dims) > D or len(weights) != len(dims):
    raise ValueError(f"representation_loss: dims {dims} (weights {weights}) for {D}-dimensional representations")
  target_B = jnp.arange(B) * group_size
  out = {"contrastive": jnp.zeros((), jnp.float32), "distill": jnp.zeros((), jnp.float32)}
  for k, w in zip(dims, weights):
    logits_BP = candidate_logits(q[:, :k], p[:, :k], temperature, group_size, normalize=normalize,
                                 pos_key=pos_key, no_in_batch_neg=no_in_batch_neg)
    out["contrastive"] += w * optax.softmax_cross_entropy_with_integer_labels(logits_BP, target_B).mean()
    if distill_weight and teacher_scores is not None:
      out["distill"] += w * distill_loss(own_group_logits(logits_BP, group_size), teacher_scores,
                                         distill_temperature)
  out["loss"] = out["contrastive"] + distill_weight * out["distill"]
  out["accuracy"] = jnp.mean((jnp.argmax(logits_BP, axis=-1) == target_B).astype(jnp.float32))  # largest dim
  return out


def _live_gathered(x_local, axes: tuple[str, ...], grad: str):
  """Inside shard_map: every shard's rows [W * b, D] in global order. `gritlm`: the other shards' rows are
  constants (no gradient flows back to them), only this shard's own rows are live."""
  if grad == "exact":
    return jax.lax.all_gather(x_local, axes, axis=0, tiled=True)
  gathered = jax.lax.all_gather(jax.lax.stop_gradient(x_local), axes, axis=0, tiled=True)
  start = jax.lax.axis_index(axes) * x_local.shape[0]
  return jax.lax.dynamic_update_slice_in_dim(gathered, x_local, start, axis=0)


def gathered_representation_loss(q, p, mesh, batch_axes: Sequence[str], temperature: float = 0.02,
                                 group_size: int = 2, *, grad: str = "gritlm", rows: dict | None = None, **loss_kw):
  """`representation_loss` over the global batch, computed per batch shard with explicit all-gathers, as the
  reference does with `dist.all_gather` + `--negatives_cross_device`.

  q [B, D], p [B*g, D]: global arrays (any sharding); rows: the per-query arrays of the batch (pos_key,
  no_in_batch_neg, teacher_scores; [B, ...], gathered whole, no gradient); loss_kw: the rest of
  representation_loss's arguments. `batch_axes`: the mesh axes the batch is split over (W = product of their
  sizes). Each shard gathers all rows, computes the global loss L, and the W per-shard values are averaged.
  grad="gritlm": gathered copies carry no gradient, so the gradient is (1/W) * grad L (the reference's).
  grad="exact": the gathers are differentiated (transpose = reduce-scatter), giving grad L. Returns
  representation_loss's dict; its values are those of the global batch either way.
  """
  if grad not in CONTRASTIVE_GRADS:
    raise ValueError(f"contrastive_grad {grad!r}: expected one of {CONTRASTIVE_GRADS}")
  rows = {k: v for k, v in (rows or {}).items() if v is not None}
  axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes:
    return representation_loss(q, p, temperature, group_size, **rows, **loss_kw)
  P = jax.sharding.PartitionSpec
  names = tuple(rows)

  def per_shard(q_local, p_local, *rows_local):
    q_all = _live_gathered(q_local.astype(jnp.float32), axes, grad)
    p_all = _live_gathered(p_local.astype(jnp.float32), axes, grad)
    rows_all = {k: jax.lax.all_gather(v, axes, axis=0, tiled=True) for k, v in zip(names, rows_local)}
    out = representation_loss(q_all, p_all, temperature, group_size, **rows_all, **loss_kw)
    return {k: v[None] for k, v in out.items()}  # one value per shard: [1] each

  out_W = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(axes),) * (2 + len(names)),
                        out_specs=P(axes))(q, p, *(rows[k] for k in names))
  return {k: v.mean() if k == "loss" else jax.lax.stop_gradient(v.mean()) for k, v in out_W.items()}


def gathered_contrastive_loss(q, p, mesh, batch_axes: Sequence[str], temperature: float = 0.02,
                              group_size: int = 2, *, normalize: bool = True, grad: str = "gritlm", pos_key=None):
  """(loss, top-1 accuracy) of `contrastive_loss` over the global batch with explicit all-gathers
  (`gathered_representation_loss` with neither Matryoshka dims nor distillation)."""
  out = gathered_representation_loss(q, p, mesh, batch_axes, temperature, group_size, grad=grad,
                                     rows={"pos_key": pos_key}, normalize=normalize)
  return out["loss"], out["accuracy"]


# ---------------------------------------------------------------------------------------------------------------
# Language-model loss (L_gen)

def lm_token_weights(labels, mode: str = "mixed", num_sub_batches: int = 1, token_factor: float = 1.0, *,
                     target_samples=None, num_samples: int | None = None):
  """Per-target weights w [..., T-1] float32 such that lm_loss = sum(w * CE) over the shifted targets.

  Weights depend only on the labels, so a loss split into micro-batches (gradient accumulation) with weights taken
  from the full batch adds up exactly to the full-batch loss.
  - mixed: the samples are split into `num_sub_batches` equal contiguous sub-batches; token mean inside each, then
    mean over sub-batches (an empty sub-batch contributes 0).
  - token: sum over tokens / number of samples, times `token_factor`.
  Padded rows (labels [B, T]): one sample per row. Packed rows (labels [..., T]): `target_samples` [..., T-1] is the
  sample index (0..num_samples-1, in batch order) of each target token, so sub-batches are groups of samples,
  never of rows, and both modes mean exactly what they mean unpadded.
  """
  valid = (labels[..., 1:] != IGNORE).astype(jnp.float32)  # [..., T-1]
  if target_samples is None:
    num_samples = labels.shape[0]
    target_samples = jnp.broadcast_to(jnp.arange(num_samples)[:, None], valid.shape)
  if mode == "token":
    return valid * (token_factor / num_samples)
  if mode != "mixed":
    raise ValueError(f"lm loss mode {mode!r}: expected one of {LM_MODES}")
  if num_samples % num_sub_batches:
    raise ValueError(f"lm loss: {num_samples} generative samples do not split into {num_sub_batches} sub-batches")
  sub = jnp.clip(target_samples, 0) // (num_samples // num_sub_batches)  # [..., T-1] (padding: valid = 0)
  one_hot = jax.nn.one_hot(sub, num_sub_batches, dtype=jnp.float32)  # [..., T-1, S]
  count_S = jnp.sum(one_hot * valid[..., None], axis=tuple(range(valid.ndim)))  # [S] (exact in float32)
  return valid * (1.0 / (jnp.maximum(count_S, 1.0) * num_sub_batches))[sub]


def token_cross_entropy(logits, labels):
  """Next-token CE [B, T-1] float32 of logits [B, T, V] against labels [B, T] (unshifted, HF convention);
  ignored positions (IGNORE) give 0."""
  targets_BT = labels[:, 1:]
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                          jnp.where(targets_BT == IGNORE, 0, targets_BT))
  return jnp.where(targets_BT == IGNORE, 0.0, ce_BT)


def lm_loss(logits, labels, mode: str = "mixed", num_sub_batches: int = 1, token_factor: float = 1.0, *,
            weights=None):
  """Shifted next-token loss: logits [B, T, V], labels [B, T] aligned with the inputs (IGNORE = ignored).
  See `lm_token_weights` for the modes; `weights` [B, T-1] overrides them (e.g. taken from a larger batch)."""
  if weights is None:
    weights = lm_token_weights(labels, mode, num_sub_batches, token_factor)
  return jnp.sum(token_cross_entropy(logits, labels) * weights)


# ---------------------------------------------------------------------------------------------------------------
# GRIT

def grit_loss(loss_rep=None, loss_gen=None, aux_loss=None, *, lambda_rep: float = 1.0, lambda_gen: float = 1.0,
              router_aux_coef: float = 0.0):
  """lambda_rep * L_rep + lambda_gen * L_gen + router_aux_coef * aux (the MoE load-balancing loss of the
  generative pass). Missing terms (None: embedding-only / generative-only batches, dense models) count 0."""
  total = jnp.zeros((), jnp.float32)
  if loss_rep is not None:
    total = total + lambda_rep * loss_rep
  if loss_gen is not None:
    total = total + lambda_gen * loss_gen
  if aux_loss is not None and router_aux_coef:
    total = total + router_aux_coef * aux_loss
  return total


# ---------------------------------------------------------------------------------------------------------------
# Retrieval metrics (evaluation, not a loss: `grit-jax eval`, the demo, and the trainer's eval top-1 / top-5)

RETRIEVAL_KS = (1, 5, 10)
RETRIEVAL_CUTOFF = 10  # nDCG@10, MRR@10


def retrieval_metrics(scores_QD, relevant: Sequence[set[int]]) -> dict[str, float]:
  """Mean nDCG@10, recall@k (k in RETRIEVAL_KS) and MRR@10 of `scores_QD` (higher = better) against binary
  relevance sets, by pytrec_eval (trec_eval, as MTEB; ties in its order). Each query's run is its top 10 documents,
  so trec_eval's uncut recip_rank is MRR@10; recall's denominators come from the relevance sets."""
  import numpy as np
  import pytrec_eval

  scores_QD = np.asarray(scores_QD, np.float64)
  top_QK = np.argsort(-scores_QD, axis=1, kind="stable")[:, :RETRIEVAL_CUTOFF]
  run = {str(q): {str(d): float(scores_QD[q, d]) for d in top_K} for q, top_K in enumerate(top_QK)}
  qrels = {str(q): {str(d): 1 for d in rel} for q, rel in enumerate(relevant)}
  ks = ",".join(map(str, RETRIEVAL_KS))
  per_query = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{RETRIEVAL_CUTOFF}", f"recall.{ks}", "recip_rank"}
                                             ).evaluate(run)
  names = {f"ndcg_cut_{RETRIEVAL_CUTOFF}": f"ndcg@{RETRIEVAL_CUTOFF}", "recip_rank": f"mrr@{RETRIEVAL_CUTOFF}",
           **{f"recall_{k}": f"recall@{k}" for k in RETRIEVAL_KS}}
  return {ours: float(np.mean([per_query[str(q)][theirs] for q in range(len(relevant))]))
          for theirs, ours in names.items()}
