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


def contrastive_loss(q, p, temperature: float = 0.02, group_size: int = 2, *, normalize: bool = True,
                     return_accuracy: bool = False, pos_key=None):
  """In-batch-negatives InfoNCE: q [B, D] queries, p [B*g, D] passages (query i's positive at row i*g, then its
  g-1 hard negatives). Every passage is a candidate for every query; the target of row i is column i*g; loss =
  mean over rows of the cross-entropy of (cosine / temperature).

  pos_key [B, K] int (optional): a hash of each query's positive; another query's positive with the same key is
  left out of row i's candidates (it is row i's own positive text, not a negative; sentence-transformers' no-
  duplicates sampler keeps such rows out of one batch).

  Returns the loss, or (loss, top-1 accuracy) with `return_accuracy`.
  """
  B = q.shape[0]
  if p.shape[0] != B * group_size:
    raise ValueError(f"contrastive_loss: {p.shape[0]} passages for {B} queries x group_size {group_size}")
  logits_BP = contrastive_logits(q, p, temperature, normalize)
  if pos_key is not None:
    logits_BP = jnp.where(false_negative_mask(pos_key, group_size), -1e9, logits_BP)  # exp() = 0: no candidate
  target_B = jnp.arange(B) * group_size
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BP, target_B).mean()
  if not return_accuracy:
    return loss
  accuracy = jnp.mean((jnp.argmax(logits_BP, axis=-1) == target_B).astype(jnp.float32))
  return loss, accuracy


def _live_gathered(x_local, axes: tuple[str, ...], grad: str):
  """Inside shard_map: every shard's rows [W * b, D] in global order. `gritlm`: the other shards' rows are
  constants (no gradient flows back to them), only this shard's own rows are live."""
  if grad == "exact":
    return jax.lax.all_gather(x_local, axes, axis=0, tiled=True)
  gathered = jax.lax.all_gather(jax.lax.stop_gradient(x_local), axes, axis=0, tiled=True)
  start = jax.lax.axis_index(axes) * x_local.shape[0]
  return jax.lax.dynamic_update_slice_in_dim(gathered, x_local, start, axis=0)


def gathered_contrastive_loss(q, p, mesh, batch_axes: Sequence[str], temperature: float = 0.02,
                              group_size: int = 2, *, normalize: bool = True, grad: str = "gritlm", pos_key=None):
  """`contrastive_loss` over the global batch, computed per batch shard with explicit all-gathers, as the reference
  does with `dist.all_gather` + `--negatives_cross_device`.

  q [B, D], p [B*g, D]: global arrays (any sharding); `batch_axes`: the mesh axes the batch is split over
  (W = product of their sizes). Each shard gathers all rows, computes the global loss L, and the W per-shard values
  are averaged. grad="gritlm": gathered copies carry no gradient, so the gradient is (1/W) * grad L (the
  reference's). grad="exact": the gathers are differentiated (transpose = reduce-scatter), giving grad L.
  Returns (loss, top-1 accuracy); the loss value is L either way.
  """
  if grad not in CONTRASTIVE_GRADS:
    raise ValueError(f"contrastive_grad {grad!r}: expected one of {CONTRASTIVE_GRADS}")
  axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes:
    return contrastive_loss(q, p, temperature, group_size, normalize=normalize, return_accuracy=True,
                            pos_key=pos_key)
  P = jax.sharding.PartitionSpec

  def per_shard(q_local, p_local, *key_local):
    q_all = _live_gathered(q_local.astype(jnp.float32), axes, grad)
    p_all = _live_gathered(p_local.astype(jnp.float32), axes, grad)
    key_all = jax.lax.all_gather(key_local[0], axes, axis=0, tiled=True) if key_local else None
    loss, acc = contrastive_loss(q_all, p_all, temperature, group_size, normalize=normalize, return_accuracy=True,
                                 pos_key=key_all)
    return loss[None], acc[None]  # one value per shard: [1] each

  keys = () if pos_key is None else (pos_key,)
  loss_W, acc_W = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(axes),) * (2 + len(keys)),
                                out_specs=(P(axes), P(axes)))(q, p, *keys)
  return loss_W.mean(), jax.lax.stop_gradient(acc_W.mean())


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
