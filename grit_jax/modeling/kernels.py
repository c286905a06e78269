"""Fused attention kernels behind the one dispatch point `grit_jax.modeling.attention.attend`.

- `splash_attention`: Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for TPU; runs on
  CPU in Pallas interpret mode (slow; used by the tests).
- `cudnn_attention`: `jax.nn.dot_product_attention(implementation="cudnn")` for NVIDIA GPUs.
- `select_impl`: "auto" -> splash on TPU, cudnn on GPU, plain XLA on CPU and for decode / cached calls.

Both kernels take the structure of the mask (causal flag, padding or segment ids, sliding window) rather than a
dense [B, 1, T, S] mask: that structure is what lets them skip masked blocks. They cover self-attention without a
KV cache (training and prefill of a fresh sequence: T == S); everything else goes through the plain XLA path.
Layouts follow `attend`: q [B, T, H, Dh], k/v [B, S, KVH, Dh] with H a multiple of KVH (GQA), output [B, T, H, Dh].
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from grit_jax import sharding
from grit_jax.modeling.config import ATTENTION_IMPLS
from grit_jax.modeling.platform import target_platform

# The Pallas kernel cannot be partitioned by XLA, so under a mesh it runs inside a shard_map whose specs come from
# the logical-axis rules: the batch split like the activations' `batch`, the heads like `heads`.
_LANES = 128  # splash tiles the sequence in multiples of the TPU lane width


def select_impl(config_impl: str, platform: str | None = None, *, decode: bool = False) -> str:
  """Kernel for one attention call. `config_impl` is ModelConfig.attention_impl; `decode` = the call has a KV cache
  or T != S (the fused kernels only cover self-attention over the same positions)."""
  if config_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={config_impl!r}: expected one of {ATTENTION_IMPLS}")
  if decode or config_impl == "xla":
    return "xla"
  platform = platform or target_platform()
  if config_impl == "auto":
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")
  return config_impl


def _block_size(length: int, preferred: int = 512) -> int:
  """Largest of 512/256/128 dividing `length` (a multiple of 128)."""
  for b in (preferred, 256, _LANES):
    if b <= length and length % b == 0:
      return b
  return _LANES


def _make_kernel(num_heads: int, length: int, causal: bool, sliding_window: int | None, block: int,
                 interpret: bool):
  """A splash kernel for one shape (jax caches the numpy block-sparsity tables per mask and block size)."""
  shape = (length, length)
  if not causal and sliding_window:
    # bidirectional sliding layer (Gemma 3): |i - j| <= sliding_window (attention.make_attention_mask)
    head_mask = splash_mask.LocalMask(shape, window_size=(sliding_window, sliding_window), offset=0)
  elif not causal:
    head_mask = splash_mask.FullMask(shape)
  elif sliding_window:
    # key j visible from query i iff 0 <= i - j < sliding_window (Mistral's convention).
    head_mask = splash_mask.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
  else:
    head_mask = splash_mask.CausalMask(shape)
  sizes = splash_kernel.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return splash_kernel.make_splash_mha(
      splash_mask.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
      interpret=interpret)


def _splash_local(q_BHTD, k_BKTD, v_BKTD, segq_BT, segkv_BT, *, causal, sliding_window, interpret):
  """Splash on the local shard: heads-major layout, batch vmapped."""
  num_heads, length = q_BHTD.shape[1], q_BHTD.shape[2]
  kernel = _make_kernel(num_heads, length, causal, sliding_window, _block_size(length), interpret)
  one = lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=sq, kv=skv))
  return jax.vmap(one)(q_BHTD, k_BKTD, v_BKTD, segq_BT, segkv_BT)


def _mesh_spec(mesh, batch: int, heads: int, kv_heads: int):
  """shard_map specs from the logical-axis rules in effect (with none, sharding.make_rules with every
  parallelism): the batch over the mesh axes of `batch` that divide it, the heads over those of `heads` that divide
  both head counts (sharding.dividing_axes)."""
  rules = nn.get_logical_axis_rules() or sharding.make_rules(tensor=True, expert=True)
  batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "heads"), rules)
  b = sharding.dividing_axes(mesh, batch_axes, batch)
  h = sharding.dividing_axes(mesh, head_axes, math.gcd(heads, kv_heads))
  return jax.P(b, h, None, None), jax.P(b, None)  # q/k/v [B, H, T, Dh], segment ids [B, T]


def splash_attention(q, k, v, *, causal: bool, segment_ids_q=None, segment_ids_kv=None,
                     sliding_window: int | None = None, interpret: bool | None = None):
  """Splash attention. q [B, T, H, Dh], k/v [B, T, KVH, Dh] -> [B, T, H, Dh].

  segment_ids_q / segment_ids_kv [B, T] int32: tokens attend only within equal ids; 0 marks padding (pass the
  attention mask itself for plain right padding, the packing segment ids for packed rows). Rows of padding
  queries hold unspecified values (the plain path's do too). `interpret=None` -> Pallas interpret mode unless
  compiling for TPU. Under a context mesh (`jax.set_mesh`) the kernel runs in a shard_map (`_mesh_spec`): batch over the data/fsdp/
  expert axes, heads over `tensor`.
  """
  B, T, H, Dh = q.shape
  KVH = k.shape[2]
  if k.shape[1] != T:
    raise ValueError(f"splash_attention covers self-attention only (T={T}, S={k.shape[1]}); use the xla path")
  if segment_ids_q is None:
    segment_ids_q = jnp.ones((B, T), jnp.int32)
  if segment_ids_kv is None:
    segment_ids_kv = segment_ids_q
  if interpret is None:
    interpret = target_platform() != "tpu"
  # Splash takes no softmax scale: fold 1/sqrt(Dh) into q (in float32, then back to the compute dtype).
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(Dh))).astype(q.dtype)
  pad = -T % _LANES
  q_BHTD, k_BKTD, v_BKTD = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  seg_q, seg_kv = segment_ids_q.astype(jnp.int32), segment_ids_kv.astype(jnp.int32)
  if pad:  # padded tail = segment 0 (padding): no real query sees it
    q_BHTD, k_BKTD, v_BKTD = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q_BHTD, k_BKTD, v_BKTD))
    seg_q, seg_kv = (jnp.pad(s, ((0, 0), (0, pad))) for s in (seg_q, seg_kv))
  body = functools.partial(_splash_local, causal=causal, sliding_window=sliding_window, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    qkv_spec, seg_spec = _mesh_spec(mesh, B, H, KVH)
    body = jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2, out_specs=qkv_spec,
                         check_vma=False)
  out_BHTD = body(q_BHTD, k_BKTD, v_BKTD, seg_q, seg_kv)
  return jnp.swapaxes(out_BHTD[:, :, :T], 1, 2)


def cudnn_attention(q, k, v, *, causal: bool, q_lengths=None, kv_lengths=None, mask=None,
                    sliding_window: int | None = None, implementation: str = "cudnn"):
  """cuDNN flash attention through `jax.nn.dot_product_attention`. q [B, T, H, Dh], k/v [B, S, KVH, Dh].

  Right padding -> q_lengths / kv_lengths [B] int32 (cuDNN's padding mask, no dense mask materialised); packing
  or any other pattern -> `mask` [B, 1, T, S] bool (turned into a bias by jax). `implementation="xla"` runs the
  same call through jax's XLA reference (the tests use it to check the argument plumbing on CPU).
  """
  window = None if not sliding_window else (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
  as_len = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal, query_seq_lengths=as_len(q_lengths),
      key_value_seq_lengths=as_len(kv_lengths), local_window_size=window, implementation=implementation)
