"""Decoder building blocks (Flax Linen): projections, RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP, Mixtral
sparse MoE and the decoder layer. Parameter names mirror Hugging Face (q_proj, gate_proj, block_sparse_moe, ...)
so conversion is a rename table plus transposes; every parameter carries logical axis names.

Letters in names: B batch, T query length, S key length (cache slots), D hidden, H query heads, K kv heads,
R = H // K, Dh head dim, I mlp, E experts, V vocab.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from grit_jax.modeling.attention import attend
from grit_jax.modeling.moe import MOE_EXPERTS
from grit_jax.modeling.platform import target_platform
from grit_jax.modeling.config import ModelConfig

INIT_STD = 0.02  # HF initializer_range
constrain = nn.with_logical_constraint


def _init(axes: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def flat_dot(x, kernel, in_dims: int, out_dtype):
  """x [..., *in] @ kernel [*in, *out] as one 2-D matmul [N, prod(in)] @ [prod(in), prod(out)], whose gradients
  are 2-D matmuls too: dx = dy @ k^T, dk = x^T @ dy.

  Same values as the N-D dot_general. Why it exists: differentiating the N-D dot_general, XLA:CPU feeds each
  weight-gradient matmul operands it first transposes in loop fusions that also recompute the elementwise
  producer (the SwiGLU derivative); at ~125M params those fusions took ~17% of the train step.
  """
  return _flat_dot_fwd(x, kernel, in_dims, out_dtype)[0]


def _flat_dot_fwd(x, kernel, in_dims, out_dtype):
  n_in = math.prod(kernel.shape[:in_dims])
  x_NI, k_IO = x.reshape(-1, n_in), kernel.reshape(n_in, -1)
  # a f32 result, then out_dtype: XLA:CPU has no bf16 -> bf16 dot (it upcasts both operands to f32, weights
  # included), but runs bf16 operands with a f32 result natively (bf16 encode of SmolLM2: 84 -> 50 s, BENCHMARKS.md)
  y_NO = jnp.dot(x_NI, k_IO, preferred_element_type=jnp.float32).astype(out_dtype)
  return y_NO.reshape(x.shape[:x.ndim - in_dims] + kernel.shape[in_dims:]), (x_NI, k_IO, x.shape, kernel.shape)


def _flat_dot_bwd(in_dims, out_dtype, residuals, dy):
  x_NI, k_IO, x_shape, k_shape = residuals
  dy_NO = dy.reshape(x_NI.shape[0], -1)
  f32 = jnp.float32
  dx_NI = jax.lax.dot_general(dy_NO.astype(k_IO.dtype), k_IO, (((1,), (1,)), ((), ())), preferred_element_type=f32)
  dk_IO = jax.lax.dot_general(x_NI, dy_NO.astype(x_NI.dtype), (((0,), (0,)), ((), ())), preferred_element_type=f32)
  return dx_NI.reshape(x_shape).astype(x_NI.dtype), dk_IO.reshape(k_shape).astype(k_IO.dtype)


flat_dot.defvjp(_flat_dot_fwd, _flat_dot_bwd)


def lora_kw(config: ModelConfig, target: str) -> dict:
  """Linear's LoRA arguments for the projection of ModelConfig.lora_targets key `target` (none when not adapted)."""
  if not config.lora_on(target):
    return {}
  return {"lora_rank": config.lora_rank, "lora_scale": config.lora_alpha / config.lora_rank}


def select_matmul_impl(impl: str, platform: str | None = None) -> str:
  """ModelConfig.matmul_impl -> "xla" | "flat" for the platform the trace compiles for (see Linear)."""
  if impl == "auto":
    return "flat" if (platform or target_platform()) == "cpu" else "xla"
  return impl


class Linear(nn.Module):
  """x [..., *in] @ kernel [*in, *features] (no bias). `axes` names every kernel dim. `out_dtype` lets matmuls
  with bf16 inputs accumulate and return float32 (LM head, router).

  impl (ModelConfig.matmul_impl): "xla" = one N-D dot_general, differentiated by jax; "flat" = `flat_dot`;
  "auto" = flat when compiling for CPU, else xla (TPU and GPU compilers pick good layouts for the plain form,
  and it is the form the remat policies and sharding rules were checked with)."""
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  in_dims: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  out_dtype: str | None = None
  impl: str = "auto"
  use_bias: bool = False  # a `bias` of shape features (Qwen2's q/k/v, Llama's attention_bias / mlp_bias)
  lora_rank: int = 0      # > 0: y += lora_scale * (x @ lora_a) @ lora_b (grit_jax.modeling.lora)
  lora_scale: float = 0.0

  def _dot(self, x, kernel, in_dims: int, out_dtype):
    if select_matmul_impl(self.impl) == "flat":
      return flat_dot(x, kernel, in_dims, out_dtype)
    contract_x = tuple(range(x.ndim - in_dims, x.ndim))
    return jax.lax.dot_general(x, kernel, ((contract_x, tuple(range(in_dims))), ((), ())),
                               preferred_element_type=out_dtype)

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.in_dims:]
    kernel = self.param("kernel", _init(self.axes), tuple(in_shape) + tuple(self.features),
                        jnp.dtype(self.param_dtype))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    out_dtype = jnp.dtype(self.out_dtype or self.dtype)
    y = self._dot(x, kernel, self.in_dims, out_dtype)
    if self.lora_rank:
      # A [*in, r] sharded like the kernel's input dims, B [r, *out] like its output dims; the rank replicated.
      # A as peft's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)); B zeros, so a fresh adapter is the base.
      in_axes = tuple(range(self.in_dims))
      a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=in_axes, out_axis=-1)
      lora_a = self.param("lora_a", nn.with_logical_partitioning(a_init, self.axes[:self.in_dims] + (None,)),
                          tuple(in_shape) + (self.lora_rank,), jnp.dtype(self.param_dtype))
      lora_b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 (None,) + self.axes[self.in_dims:]),
                          (self.lora_rank,) + tuple(self.features), jnp.dtype(self.param_dtype))
      h_Nr = self._dot(x, lora_a.astype(self.dtype), self.in_dims, out_dtype)
      delta = self._dot(h_Nr.astype(self.dtype), lora_b.astype(self.dtype), 1, out_dtype)
      y = y + (delta * jnp.asarray(self.lora_scale, delta.dtype)).astype(y.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims:]),
                        tuple(self.features), jnp.dtype(self.param_dtype))
      y = y + bias.astype(y.dtype)
    return y


class RMSNorm(nn.Module):
  """x / rms(x) * scale, normalised in float32 (as HF), returned in the compute dtype. plus_one (Gemma): the scale
  is (1 + w), stored as w (zeros at init), and multiplied in float32 before the cast, as HF Gemma does."""
  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  plus_one: bool = False
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (x.shape[-1],),
                       jnp.dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
    return (scale.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(config: ModelConfig, sliding: bool = False):
  """[Dh/2] float32 inverse frequencies of a layer, as transformers' ROPE_INIT_FUNCTIONS compute them: default,
  linear (/ factor) or llama3 (long wavelengths / factor, a smooth blend between). Gemma 3's sliding layers use
  their own base, unscaled."""
  Dh = config.head_dim
  local = sliding and config.rope_local_theta is not None
  theta = config.rope_local_theta if local else config.rope_theta
  inv_freq = 1.0 / (theta ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))
  if local or config.rope_type == "default":
    return inv_freq
  factor = config.rope_factor
  if config.rope_type == "linear":
    return inv_freq / factor
  low, high, old_len = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_max_position
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
  return jnp.where(medium, smoothed, scaled)


def apply_rotary(x_BTND, positions_BT, rope, table_len: int | None = None):
  """RoPE with HF's rotate_half convention: the two halves of each head (not interleaved pairs) form the complex
  pairs; inv_freq and angles in float32. rope: the base theta (default RoPE) or the [Dh/2] inv_freq
  (`rope_inv_freq`).

  table_len (the CPU layout): cos/sin of positions 0..table_len-1 are computed once and gathered per token, the
  same values bit for bit. XLA:CPU otherwise fuses the [B, T, Dh] cos/sin into every head's multiply and evaluates
  them once per head (12% of the tiny model's embedding pass, BENCHMARKS.md); the gather stops that fusion. A
  position outside the table gives NaN, never a clamped angle."""
  Dh = x_BTND.shape[-1]
  inv_freq = (1.0 / (rope ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh)) if isinstance(rope, (int, float))
              else rope)  # [Dh/2]
  if table_len is None:
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles_BTD = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    cos, sin = jnp.cos(angles_BTD), jnp.sin(angles_BTD)
  else:
    angles_PF = jnp.arange(table_len, dtype=jnp.float32)[:, None] * inv_freq  # [P, Dh/2]
    angles_PD = jnp.concatenate([angles_PF, angles_PF], axis=-1)
    gather = lambda t: jnp.take(t, positions_BT, axis=0, mode="fill", fill_value=jnp.nan)[:, :, None, :]
    cos, sin = gather(jnp.cos(angles_PD)), gather(jnp.sin(angles_PD))
  cos, sin = cos.astype(x_BTND.dtype), sin.astype(x_BTND.dtype)
  x1, x2 = jnp.split(x_BTND, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BTND * cos + rotated * sin


class Attention(nn.Module):
  """Grouped-query self-attention. With `kv` (this layer's cache k, v [B, S, K, Dh]) the T new keys/values are
  written at slots [cache_index, cache_index + T) and the queries attend over all S slots under `mask_B1TS`.
  `sliding` selects the layer's RoPE (Gemma 3's local base); the mask already carries its window."""
  config: ModelConfig
  sliding: bool = False

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_B1TS, kv=None, cache_index=None):
    c = self.config
    dense = lambda feats, axes, name, in_dims=1, bias=False: Linear(feats, axes, in_dims, c.dtype, c.param_dtype,
                                                                    impl=c.matmul_impl, use_bias=bias, name=name,
                                                                    **lora_kw(c, name.removesuffix("_proj")))
    q_BTHD = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "q_proj", bias=c.qkv_bias)(x_BTD)
    k_BTKD = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj", bias=c.qkv_bias)(x_BTD)
    v_BTKD = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj", bias=c.qkv_bias)(x_BTD)
    if c.qk_norm:  # Qwen3 / Gemma 3: RMSNorm over each head's Dh, before RoPE
      head_norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.gemma_norms, "head_dim", name=name)
      q_BTHD, k_BTKD = head_norm("q_norm")(q_BTHD), head_norm("k_norm")(k_BTKD)
    if c.query_pre_attn_scalar is not None:  # attend() scales by Dh ** -0.5; Gemma wants scalar ** -0.5
      q_BTHD = q_BTHD * jnp.asarray(math.sqrt(c.head_dim / c.query_pre_attn_scalar), q_BTHD.dtype)
    table = c.max_position_embeddings if select_matmul_impl(c.matmul_impl) == "flat" else None
    inv_freq = rope_inv_freq(c, self.sliding)
    q_BTHD = checkpoint_name(apply_rotary(q_BTHD, positions_BT, inv_freq, table), "query_proj")
    k_BTKD = checkpoint_name(apply_rotary(k_BTKD, positions_BT, inv_freq, table), "key_proj")
    v_BTKD = checkpoint_name(v_BTKD, "value_proj")
    q_BTHD = constrain(q_BTHD, ("batch", "length", "heads", "head_dim"))
    k_BTKD = constrain(k_BTKD, ("batch", "length", "kv_heads", "head_dim"))
    v_BTKD = constrain(v_BTKD, ("batch", "length", "kv_heads", "head_dim"))
    new_kv = None
    if kv is not None:
      cache_k, cache_v = kv  # [B, S, K, Dh]
      start = (0, cache_index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k_BTKD.astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v_BTKD.astype(cache_v.dtype), start)
      new_kv = (cache_k, cache_v)
      k_BTKD, v_BTKD = cache_k.astype(c.dtype), cache_v.astype(c.dtype)
    out_BTHD = attend(q_BTHD, k_BTKD, v_BTKD, mask_B1TS, impl=c.attention_impl,
                      matmul=select_matmul_impl(c.matmul_impl))
    out_BTHD = constrain(out_BTHD, ("batch", "length", "heads", "head_dim"))
    out_BTD = dense((c.hidden_size,), ("heads", "head_dim", "embed"), "o_proj", in_dims=2, bias=c.o_bias)(out_BTHD)
    return checkpoint_name(out_BTD, "out_proj"), new_kv


ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}


class Mlp(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); act = silu (SwiGLU) or tanh-approximated gelu (Gemma's GeGLU)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.config
    dense = lambda feats, axes, name: Linear(feats, axes, 1, c.dtype, c.param_dtype, impl=c.matmul_impl,
                                            use_bias=c.mlp_bias, name=name, **lora_kw(c, name.removesuffix("_proj")))
    gate_BTI = checkpoint_name(dense((c.intermediate_size,), ("embed", "mlp"), "gate_proj")(x_BTD), "mlp_gate")
    up_BTI = checkpoint_name(dense((c.intermediate_size,), ("embed", "mlp"), "up_proj")(x_BTD), "mlp_up")
    h_BTI = constrain(ACTIVATIONS[c.hidden_act](gate_BTI) * up_BTI, ("batch", "length", "mlp"))
    return dense((c.hidden_size,), ("mlp", "embed"), "down_proj")(h_BTI)


class SparseMoe(nn.Module):
  """Mixtral's / Qwen3-MoE's sparse MoE block (HF MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock): router softmax
  over all experts in float32, top-k, renormalise the k weights (Qwen3-MoE: only with norm_topk_prob),
  y = sum_k w_k * SwiGLU_{e_k}(x). The experts run as ModelConfig.moe_impl says:
  "ragged" (`moe.routed_experts`, the default) or "dense" (`moe.dense_experts`, the reference); both are dropless.

  Also returns the layer's load-balancing statistics over real tokens (token_mask): [2, E] = (top-k assignment
  counts, summed router probabilities), and the number of real tokens.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, token_mask_BT):
    c = self.config
    E, D, I = c.num_experts, c.hidden_size, c.expert_size
    logits_BTE = Linear((E,), ("embed", "exp"), 1, c.dtype, c.param_dtype, out_dtype="float32", name="gate")(x_BTD)
    probs_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    top_w_BTk, top_i_BTk = jax.lax.top_k(probs_BTE, c.num_experts_per_tok)
    if c.norm_topk_prob:
      top_w_BTk = top_w_BTk / jnp.sum(top_w_BTk, axis=-1, keepdims=True)

    param = lambda name, shape, axes: self.param(name, _init(axes), shape, jnp.dtype(c.param_dtype)).astype(c.dtype)
    w1_EDI = param("w1", (E, D, I), ("exp", "embed", "mlp"))
    w3_EDI = param("w3", (E, D, I), ("exp", "embed", "mlp"))
    w2_EID = param("w2", (E, I, D), ("exp", "mlp", "embed"))
    y_BTD = MOE_EXPERTS[c.moe_impl](x_BTD.astype(c.dtype), top_i_BTk, top_w_BTk, w1_EDI, w3_EDI, w2_EID)

    m_BT = token_mask_BT.astype(jnp.float32)
    counts_E = jnp.einsum("btke,bt->e", jax.nn.one_hot(top_i_BTk, E, dtype=jnp.float32), m_BT)
    prob_sum_E = jnp.einsum("bte,bt->e", probs_BTE, m_BT)
    return y_BTD, jnp.stack([counts_E, prob_sum_E])


class DecoderLayer(nn.Module):
  """Pre-norm decoder block (Gemma: with norms after attention and MLP too). Signature suits nn.scan: (carry x,
  scanned kv, broadcast rest) -> (x, (kv, stats)). masks: (full-attention mask, sliding-window mask or None); the
  layer reads the one of its kind. Parameter names are each family's HF names (the MoE block is Mixtral's
  `block_sparse_moe` or Qwen3-MoE's `mlp`)."""
  config: ModelConfig
  sliding: bool = False
  moe: bool = False

  @nn.compact
  def __call__(self, x_BTD, kv, masks, positions_BT, cache_index, token_mask_BT):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.gemma_norms, name=name)
    mask = masks[1] if self.sliding else masks[0]
    attn_BTD, kv = Attention(c, self.sliding, name="self_attn")(norm("input_layernorm")(x_BTD), positions_BT, mask,
                                                                kv, cache_index)
    if c.gemma_norms:
      attn_BTD = norm("post_attention_layernorm")(attn_BTD)
    x_BTD = x_BTD + attn_BTD
    h_BTD = norm("pre_feedforward_layernorm" if c.gemma_norms else "post_attention_layernorm")(x_BTD)
    if self.moe:
      mlp_BTD, stats = SparseMoe(c, name="block_sparse_moe" if c.family == "mixtral" else "mlp")(h_BTD, token_mask_BT)
    else:
      mlp_BTD, stats = Mlp(c, name="mlp")(h_BTD), None
    if c.gemma_norms:
      mlp_BTD = norm("post_feedforward_layernorm")(mlp_BTD)
    x_BTD = constrain((x_BTD + mlp_BTD).astype(c.dtype), ("batch", "length", "embed"))
    return x_BTD, (kv, stats)
