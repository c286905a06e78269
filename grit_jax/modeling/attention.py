"""The attention mask (built in ONE place) and the one dispatch point for attention kernels.

`make_attention_mask` turns (query positions, key positions, key validity, segment ids, causal flag, sliding window)
into a dense boolean mask; `attend` runs grouped-query attention under it. Fused kernels (grit_jax.modeling.kernels)
plug in behind `attend`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def make_attention_mask(q_pos_BT, k_pos_BS, k_valid_BS, *, causal: bool, sliding_window: int | None = None,
                        q_segment_BT=None, k_segment_BS=None):
  """-> [B, 1, T, S] bool, True = query t may attend to key s.

  Keys must be valid (real tokens, not padding or empty cache slots) and, with segment ids (packing), in the
  query's segment. Causal: k_pos <= q_pos and, with a sliding window W, q_pos - k_pos < W (HF Mistral's
  `kv_idx > q_idx - sliding_window`). Bidirectional: no causality and no window. Positions, not slot indices, decide
  causality, so right-padded batches and caches whose rows have different lengths need no special casing.
  """
  mask = k_valid_BS.astype(bool)[:, None, :]  # [B, 1, S]
  if q_segment_BT is not None:
    mask = mask & (q_segment_BT[:, :, None] == k_segment_BS[:, None, :])  # [B, T, S]
  if causal:
    diff = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]  # [B, T, S]
    mask = mask & (diff >= 0)
    if sliding_window is not None:
      mask = mask & (diff < sliding_window)
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


def attend(q, k, v, mask, impl: str = "xla"):
  """q [B, T, H, Dh], k/v [B, S, KVH, Dh], mask [B, 1, T, S] bool -> [B, T, H, Dh] (q's dtype).

  impl: "xla" (and "auto", which is "xla" until fused kernels are wired in here)."""
  if impl in ("xla", "auto"):
    return xla_attention(q, k, v, mask).astype(q.dtype)
  raise ValueError(f"attention_impl={impl!r}: this build only has the 'xla' path")
