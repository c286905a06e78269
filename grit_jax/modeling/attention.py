"""The attention mask (built in ONE place) and the one dispatch point for attention kernels.

`make_attention_mask` turns (query positions, key positions, key validity, segment ids, causal flag, sliding window)
into a dense boolean mask; `attend` runs grouped-query attention under it. Fused kernels (grit_jax.modeling.kernels)
plug in behind `attend`.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp


def make_attention_mask(q_pos_BT, k_pos_BS, k_valid_BS, *, causal: bool, sliding_window: int | None = None,
                        q_segment_BT=None, k_segment_BS=None):
  """-> [B, 1, T, S] bool, True = query t may attend to key s.

  Keys must be valid (real tokens, not padding or empty cache slots) and, with segment ids (packing), in the
  query's segment. Causal: k_pos <= q_pos and, with a sliding window W, q_pos - k_pos < W (HF Mistral's
  `kv_idx > q_idx - sliding_window`). Bidirectional: no causality; with a window W, |q_pos - k_pos| <= W (HF
  Gemma 3's bidirectional sliding layers, whose W is half the causal window). Positions, not slot indices, decide
  causality, so right-padded batches and caches whose rows have different lengths need no special casing.
  """
  mask = k_valid_BS.astype(bool)[:, None, :]  # [B, 1, S]
  if q_segment_BT is not None:
    mask = mask & (q_segment_BT[:, :, None] == k_segment_BS[:, None, :])  # [B, T, S]
  diff = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]  # [B, T, S]
  if causal:
    mask = mask & (diff >= 0)
    if sliding_window is not None:
      mask = mask & (diff < sliding_window)
  elif sliding_window is not None:
    mask = mask & (jnp.abs(diff) <= sliding_window)
  mask = jnp.broadcast_to(mask, (q_pos_BT.shape[0], q_pos_BT.shape[1], k_pos_BS.shape[1]))
  return mask[:, None]  # [B, 1, T, S]


def xla_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS):
  """Plain dot-product attention with GQA (query head h reads kv head h // (H // KVH), as HF's repeat_kv).
  Scores and softmax in float32. Rows whose mask is all False get a uniform average instead of NaN."""
  B, T, H, Dh = q_BTHD.shape
  KVH = k_BSKD.shape[2]
  q_BTKRD = q_BTHD.reshape(B, T, KVH, H // KVH, Dh)
  scores_BKRTS = jnp.einsum("btkrd,bskd->bkrts", q_BTKRD, k_BSKD, preferred_element_type=jnp.float32)
  scores_BKRTS = scores_BKRTS * (1.0 / math.sqrt(Dh))
  scores_BKRTS = jnp.where(mask_B1TS[:, :, None], scores_BKRTS, jnp.finfo(jnp.float32).min)
  probs_BKRTS = jax.nn.softmax(scores_BKRTS, axis=-1).astype(v_BSKD.dtype)
  out_BTKRD = jnp.einsum("bkrts,bskd->btkrd", probs_BKRTS, v_BSKD)
  return out_BTKRD.reshape(B, T, H, Dh)


def flat_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS):
  """`xla_attention`'s values laid out for XLA:CPU (ModelConfig.matmul_impl "flat"; self-attention only, see
  `attend`).

  Heads-major batch matmuls ([B, H, T, Dh] x [B, H, S, Dh] -> [B, H, T, S], the softmax over the last axis; the kv
  heads repeated to the query heads, as HF's repeat_kv), the mask as an additive bias, 1/sqrt(Dh) folded into q,
  and the softmax's division applied after the PV product (out = exp(s - max) @ v / sum): so XLA:CPU compiles both
  dots, the bias, the exponential and both reductions into one YNNPACK fusion, and the scores are never transposed
  or written between passes. As written in `xla_attention` (embedding pass, tiny Mistral, 64 x 128 tokens, head_dim
  16) the scores went through a dot, a transposing select, the softmax and another transposing copy: 60-70% of the
  forward. Here only q/k/v and the output ([B, T, *, Dh]: Dh/S the size of the scores) are transposed. A masked
  key's bias is float32's lowest value, so a row with no visible key gets the uniform average, as in
  `xla_attention`."""
  Dh, R = q_BTHD.shape[-1], q_BTHD.shape[2] // k_BSKD.shape[2]
  q_BHTD = (q_BTHD * jnp.asarray(1.0 / math.sqrt(Dh), q_BTHD.dtype)).transpose(0, 2, 1, 3)
  k_BHSD, v_BHSD = (jnp.repeat(x.transpose(0, 2, 1, 3), R, axis=1) for x in (k_BSKD, v_BSKD))
  bias_B1TS = jnp.where(mask_B1TS, 0.0, jnp.finfo(jnp.float32).min)
  scores_BHTS = jnp.einsum("bhtd,bhsd->bhts", q_BHTD, k_BHSD, preferred_element_type=jnp.float32) + bias_B1TS
  # the max only keeps exp in range; the result does not depend on it (no gradient through it)
  exp_BHTS = jnp.exp(scores_BHTS - jax.lax.stop_gradient(jnp.max(scores_BHTS, axis=-1, keepdims=True)))
  out_BHTD = jnp.einsum("bhts,bhsd->bhtd", exp_BHTS.astype(v_BSKD.dtype), v_BHSD, preferred_element_type=jnp.float32)
  return (out_BHTD / jnp.sum(exp_BHTS, axis=-1, keepdims=True)).transpose(0, 2, 1, 3)


@flax.struct.dataclass
class SelfAttentionMask:
  """A self-attention mask (no KV cache, T == S) together with its structure, which fused kernels use instead of
  the dense array (they skip masked blocks). Under jit the dense mask is dropped when a kernel does not read it."""
  dense: jax.Array                # [B, 1, T, T] bool, from make_attention_mask
  segment_ids: jax.Array          # [B, T] int32: 0 = padding, else the packing segment (1 without packing)
  causal: bool = flax.struct.field(pytree_node=False)
  sliding_window: int | None = flax.struct.field(pytree_node=False, default=None)  # as make_attention_mask


def attend(q, k, v, mask, impl: str = "xla", matmul: str = "xla"):
  """q [B, T, H, Dh], k/v [B, S, KVH, Dh], mask [B, 1, T, S] bool or a SelfAttentionMask -> [B, T, H, Dh] (q's
  dtype).

  impl (ModelConfig.attention_impl): "xla" | "splash" (TPU Pallas kernel) | "cudnn" (GPU) | "auto" (splash on TPU,
  cudnn on GPU, xla on CPU). Calls with a dense mask (KV cache: decode, cached prefill) always take the xla path.
  matmul: ModelConfig.matmul_impl as resolved for the platform ("xla" | "flat", layers.select_matmul_impl); "flat"
  lays the xla path's self-attention out for XLA:CPU (`flat_attention`). Cached calls keep `xla_attention`: there
  the heads-major copy of the whole cache per step would cost more than it saves (decode, batch 1: +30%)."""
  from grit_jax.modeling import kernels  # the Pallas import is only paid by models that get here

  structured = isinstance(mask, SelfAttentionMask)
  impl = kernels.select_impl(impl, decode=not structured)
  if impl == "splash":
    return kernels.splash_attention(q, k, v, causal=mask.causal, segment_ids_q=mask.segment_ids,
                                    sliding_window=mask.sliding_window).astype(q.dtype)
  if impl == "cudnn":
    return kernels.cudnn_attention(q, k, v, causal=mask.causal, mask=mask.dense,
                                   sliding_window=mask.sliding_window).astype(q.dtype)
  if structured and matmul == "flat":
    return flat_attention(q, k, v, mask.dense).astype(q.dtype)
  dense = mask.dense if structured else mask
  return xla_attention(q, k, v, dense).astype(q.dtype)
