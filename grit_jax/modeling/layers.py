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
  y_NO = jnp.dot(x_NI, k_IO, preferred_element_type=out_dtype)
  return y_NO.reshape(x.shape[:x.ndim - in_dims] + kernel.shape[in_dims:]), (x_NI, k_IO, x.shape, kernel.shape)


def _flat_dot_bwd(in_dims, out_dtype, residuals, dy):
  x_NI, k_IO, x_shape, k_shape = residuals
  dy_NO = dy.reshape(x_NI.shape[0], -1)
  f32 = jnp.float32
  dx_NI = jax.lax.dot_general(dy_NO.astype(k_IO.dtype), k_IO, (((1,), (1,)), ((), ())), preferred_element_type=f32)
  dk_IO = jax.lax.dot_general(x_NI, dy_NO.astype(x_NI.dtype), (((0,), (0,)), ((), ())), preferred_element_type=f32)
  return dx_NI.reshape(x_shape).astype(x_NI.dtype), dk_IO.reshape(k_shape).astype(k_IO.dtype)


flat_dot.defvjp(_flat_dot_fwd, _flat_dot_bwd)


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

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.in_dims:]
    kernel = self.param("kernel", _init(self.axes), tuple(in_shape) + tuple(self.features),
                        jnp.dtype(self.param_dtype))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    out_dtype = jnp.dtype(self.out_dtype or self.dtype)
    if select_matmul_impl(self.impl) == "flat":
      return flat_dot(x, kernel, self.in_dims, out_dtype)
    contract_x = tuple(range(x.ndim - self.in_dims, x.ndim))
    return jax.lax.dot_general(x, kernel, ((contract_x, tuple(range(self.in_dims))), ((), ())),
                               preferred_element_type=out_dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, normalised in float32 (as HF), returned in the compute dtype."""
  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       jnp.dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def apply_rotary(x_BTND, positions_BT, theta: float):
  """RoPE with HF's rotate_half convention: the two halves of each head (not interleaved pairs) form the complex
  pairs; inv_freq and angles in float32."""
  Dh = x_BTND.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))  # [Dh/2]
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles_BTD = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
  cos, sin = jnp.cos(angles_BTD).astype(x_BTND.dtype), jnp.sin(angles_BTD).astype(x_BTND.dtype)
  x1, x2 = jnp.split(x_BTND, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BTND * cos + rotated * sin


class Attention(nn.Module):
  """Grouped-query self-attention. With `kv` (this layer's cache k, v [B, S, K, Dh]) the T new keys/values are
  written at slots [cache_index, cache_index + T) and the queries attend over all S slots under `mask_B1TS`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_B1TS, kv=None, cache_index=None):
    c = self.config
    dense = lambda feats, axes, name, in_dims=1: Linear(feats, axes, in_dims, c.dtype, c.param_dtype,
                                                           impl=c.matmul_impl, name=name)
    q_BTHD = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "q_proj")(x_BTD)
    k_BTKD = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj")(x_BTD)
    v_BTKD = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj")(x_BTD)
    q_BTHD = checkpoint_name(apply_rotary(q_BTHD, positions_BT, c.rope_theta), "query_proj")
    k_BTKD = checkpoint_name(apply_rotary(k_BTKD, positions_BT, c.rope_theta), "key_proj")
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
    out_BTD = dense((c.hidden_size,), ("heads", "head_dim", "embed"), "o_proj", in_dims=2)(out_BTHD)
    return checkpoint_name(out_BTD, "out_proj"), new_kv


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.config
    dense = lambda feats, axes, name: Linear(feats, axes, 1, c.dtype, c.param_dtype, impl=c.matmul_impl,
                                            name=name)
    gate_BTI = dense((c.intermediate_size,), ("embed", "mlp"), "gate_proj")(x_BTD)
    up_BTI = dense((c.intermediate_size,), ("embed", "mlp"), "up_proj")(x_BTD)
    h_BTI = constrain(nn.silu(gate_BTI) * up_BTI, ("batch", "length", "mlp"))
    return dense((c.hidden_size,), ("mlp", "embed"), "down_proj")(h_BTI)


def dense_experts(x_BTD, top_i_BTk, top_w_BTk, w1_EDI, w3_EDI, w2_EID):
  """moe_impl="dense", the reference: every expert runs on every token (einsums over the `exp` axis) and the router
  weights, zero outside each token's top k, combine them. Exact and dropless; E / k times the active FLOPs."""
  E = w1_EDI.shape[0]
  combine_BTE = jnp.einsum("btk,btke->bte", top_w_BTk, jax.nn.one_hot(top_i_BTk, E, dtype=jnp.float32))
  gate_BTEI = jnp.einsum("btd,edi->btei", x_BTD, w1_EDI)
  up_BTEI = jnp.einsum("btd,edi->btei", x_BTD, w3_EDI)
  h_BTEI = nn.silu(gate_BTEI) * up_BTEI
  h_BTEI = h_BTEI * combine_BTE.astype(x_BTD.dtype)[..., None]
  h_BTEI = constrain(h_BTEI, ("batch", "length", "exp", "mlp"))
  return jnp.einsum("btei,eid->btd", h_BTEI, w2_EID)


# -- routed experts: sort the (token, expert) assignments by expert, grouped matmuls, unsort -----------------------
#
# Grouped matmul backends (`select_gmm_impl`):
# - "ragged_dot": jax.lax.ragged_dot, on TPU and GPU. jax lowers it to XLA's native ragged dot there, and its
#   differentiation rules (dx a ragged dot with w^T, dw a ragged-contracting dot) come with the primitive, so remat
#   and the aot compile see one ordinary op. Chosen over the megablox gmm Pallas kernel (tile sizes to tune, and a
#   Mosaic kernel the CPU tests could only run in interpret mode) and over tokamax (one more dependency, whose TPU
#   ragged dot is that same kernel family); either would slot in where `_routed_local` picks its matmul.
# - "tiled": on CPU, where jax lowers ragged_dot to a dense masked product over all groups (E times the FLOPs of
#   the dense path's matmuls). Each expert's rows are padded to a multiple of a row tile, and a loop runs one
#   [tile, in] @ [in, out] matmul per used tile with that tile's expert weights; a custom VJP does the same for dx
#   and accumulates dw per expert in place.
GMM_IMPLS = ("ragged_dot", "tiled")


def select_gmm_impl(platform: str | None = None) -> str:
  return "tiled" if (platform or target_platform()) == "cpu" else "ragged_dot"


def _row_tile(num_rows: int, num_experts: int) -> int:
  """Rows per tile of the tiled gmm: 128 (a full-width CPU matmul), smaller when experts get few rows (decode),
  since every used tile pads its expert's rows up to a multiple of it."""
  per_expert = max(1, -(-num_rows // num_experts))
  return min(128, max(8, 1 << (per_expert - 1).bit_length()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_gmm(x_RI, w_EIO, tile_expert_G, num_tiles, tile: int):
  """y[g-th tile] = x[g-th tile] @ w[tile_expert[g]] for the first `num_tiles` tiles of `tile` rows; 0 after."""
  return _tiled_gmm_fwd(x_RI, w_EIO, tile_expert_G, num_tiles, tile)[0]


def _tiled_gmm_fwd(x_RI, w_EIO, tile_expert_G, num_tiles, tile):
  def body(g, y_RO):
    x_tI = jax.lax.dynamic_slice_in_dim(x_RI, g * tile, tile)
    y_tO = jnp.dot(x_tI, w_EIO[tile_expert_G[g]], preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(y_RO, y_tO.astype(y_RO.dtype), g * tile, 0)

  y_RO = jax.lax.fori_loop(0, num_tiles, body, jnp.zeros((x_RI.shape[0], w_EIO.shape[2]), x_RI.dtype))
  return y_RO, (x_RI, w_EIO, tile_expert_G, num_tiles)


def _tiled_gmm_bwd(tile, residuals, dy_RO):
  x_RI, w_EIO, tile_expert_G, num_tiles = residuals

  def body(g, carry):
    dx_RI, dw_EIO = carry
    e = tile_expert_G[g]
    x_tI = jax.lax.dynamic_slice_in_dim(x_RI, g * tile, tile)
    dy_tO = jax.lax.dynamic_slice_in_dim(dy_RO, g * tile, tile).astype(x_RI.dtype)
    dx_tI = jax.lax.dot_general(dy_tO, w_EIO[e], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw_IO = jax.lax.dot_general(x_tI, dy_tO, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dx_RI = jax.lax.dynamic_update_slice_in_dim(dx_RI, dx_tI.astype(dx_RI.dtype), g * tile, 0)
    return dx_RI, dw_EIO.at[e].add(dw_IO)

  init = (jnp.zeros_like(x_RI), jnp.zeros(w_EIO.shape, jnp.float32))
  dx_RI, dw_EIO = jax.lax.fori_loop(0, num_tiles, body, init)  # dw accumulated per expert in place
  return dx_RI, dw_EIO.astype(w_EIO.dtype), None, None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


def _routed_local(x_BTD, top_i_BTk, top_w_BTk, w1_EDI, w3_EDI, w2_EID, *, gmm: str, psum_axes=()):
  """Routed experts over the tokens at hand (one shard's under a mesh). M = B*T*k (token, expert) assignments,
  R rows in the grouped layout (M for ragged_dot; each expert's rows padded to whole tiles for tiled)."""
  B, T, D = x_BTD.shape
  k, E = top_i_BTk.shape[-1], w1_EDI.shape[0]
  M = B * T * k
  e_M = top_i_BTk.reshape(M)  # assignment j belongs to token j // k
  sizes_E = jnp.bincount(e_M, length=E).astype(jnp.int32)
  order_M = jnp.argsort(e_M, stable=True)  # sorted slot s holds assignment order[s]
  tile = 1 if gmm == "ragged_dot" else _row_tile(M, E)
  num_tiles = (M + E * (tile - 1)) // tile  # enough for any routing: sum_e ceil(size_e / tile)
  tiles_E = -(-sizes_E // tile)
  ends_E = jnp.cumsum(tiles_E * tile)
  starts_E = ends_E - tiles_E * tile  # first layout row of each expert
  sorted_starts_E = jnp.cumsum(sizes_E) - sizes_E  # first sorted slot of each expert
  e_sorted_M = e_M[order_M]
  row_sorted_M = jnp.arange(M, dtype=jnp.int32) - sorted_starts_E[e_sorted_M] + starts_E[e_sorted_M]
  R = num_tiles * tile
  row_M = jnp.zeros((M,), jnp.int32).at[order_M].set(row_sorted_M, unique_indices=True)  # assignment -> row
  src_R = jnp.full((R,), M, jnp.int32).at[row_sorted_M].set(order_M, unique_indices=True)  # row -> assignment

  x_MD = jnp.broadcast_to(x_BTD.reshape(B * T, 1, D), (B * T, k, D)).reshape(M, D)
  xs_RD = x_MD.at[src_R].get(mode="fill", fill_value=0, unique_indices=True)  # padding rows (src M) are 0
  if gmm == "ragged_dot":
    mm = lambda a, w: jax.lax.ragged_dot(a, w, sizes_E)
  else:
    tile_expert_G = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(num_tiles) * tile, side="right"), E - 1)
    used_tiles = jnp.sum(tiles_E)
    mm = lambda a, w: _tiled_gmm(a, w, tile_expert_G.astype(jnp.int32), used_tiles, tile)
  h_RI = nn.silu(mm(xs_RD, w1_EDI)) * mm(xs_RD, w3_EDI)
  ys_RD = mm(h_RI, w2_EID)
  y_BTkD = ys_RD.at[row_M].get(unique_indices=True).reshape(B, T, k, D)
  y_BTD = jnp.einsum("btkd,btk->btd", y_BTkD, top_w_BTk.astype(y_BTkD.dtype))
  return jax.lax.psum(y_BTD, psum_axes) if psum_axes else y_BTD


def routed_experts(x_BTD, top_i_BTk, top_w_BTk, w1_EDI, w3_EDI, w2_EID, *, gmm: str | None = None):
  """moe_impl="ragged": each token runs only its k experts. The (token, expert) assignments are sorted by expert,
  each expert multiplies its contiguous group of rows (grouped matmuls, `select_gmm_impl`), and the rows go back
  to their tokens, weighted by the router. Dropless: no capacity, every assignment is computed.

  Under a context mesh the routing is local: a shard_map over the mesh axes that split the batch (and length)
  of activations, by the current logical-axis rules, so tokens never move between devices; the expert weights
  enter whole (XLA gathers the FSDP shards, as for any layer), split on `mlp` where the rules shard it (tensor
  parallelism; the partial outputs are summed). Expert parallelism (experts split over `expert`, tokens exchanged
  by all-to-all) is not implemented: with mesh.expert > 1 every device holds every expert inside this layer.
  """
  gmm = gmm or select_gmm_impl()
  if gmm not in GMM_IMPLS:
    raise ValueError(f"gmm={gmm!r}: expected one of {GMM_IMPLS}")
  body = functools.partial(_routed_local, gmm=gmm)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    tok_spec, w_in_spec, w_out_spec, psum_axes = _routed_specs(mesh, x_BTD.shape, w1_EDI.shape[2])
    body = jax.shard_map(functools.partial(body, psum_axes=psum_axes), mesh=mesh,
                         in_specs=(tok_spec, tok_spec, tok_spec, w_in_spec, w_in_spec, w_out_spec),
                         out_specs=tok_spec, check_vma=False)
  return body(x_BTD, top_i_BTk, top_w_BTk, w1_EDI, w3_EDI, w2_EID)


def _mesh_axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _routed_specs(mesh, shape_BTD, I: int):
  """shard_map specs of `routed_experts` from the logical-axis rules in effect: tokens [B, T, *] split like the
  activations' batch and length (keeping only the mesh axes that divide them); w1/w3 [E, D, I] and w2 [E, I, D]
  whole except `mlp`. Returns (token spec, w1/w3 spec, w2 spec, mesh axes to sum the output over)."""
  rules_spec = nn.logical_to_mesh_axes(("batch", "length", "mlp"))

  def dividing(entry, size):
    kept, prod = [], 1
    for a in _mesh_axes(entry):
      if mesh.shape.get(a, 1) > 1 and size % (prod * mesh.shape[a]) == 0:
        kept.append(a)
        prod *= mesh.shape[a]
    return tuple(kept) or None

  b, t, mlp = (dividing(rules_spec[i], n) for i, n in enumerate((shape_BTD[0], shape_BTD[1], I)))
  return jax.P(b, t, None), jax.P(None, None, mlp), jax.P(None, mlp, None), _mesh_axes(mlp)


MOE_EXPERTS = {"dense": dense_experts, "ragged": routed_experts}  # ModelConfig.moe_impl -> expert computation


class SparseMoe(nn.Module):
  """Mixtral's sparse MoE block (HF MixtralSparseMoeBlock): router softmax over all experts in float32, top-k,
  renormalise the k weights, y = sum_k w_k * SwiGLU_{e_k}(x). The experts run as ModelConfig.moe_impl says:
  "ragged" (`routed_experts`, the default) or "dense" (`dense_experts`, the reference); both are dropless.

  Also returns the layer's load-balancing statistics over real tokens (token_mask): [2, E] = (top-k assignment
  counts, summed router probabilities), and the number of real tokens.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, token_mask_BT):
    c = self.config
    E, D, I = c.num_experts, c.hidden_size, c.intermediate_size
    logits_BTE = Linear((E,), ("embed", "exp"), 1, c.dtype, c.param_dtype, out_dtype="float32", name="gate")(x_BTD)
    probs_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    top_w_BTk, top_i_BTk = jax.lax.top_k(probs_BTE, c.num_experts_per_tok)
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
  """Pre-norm decoder block. Signature suits nn.scan: (carry x, scanned kv, broadcast rest) -> (x, (kv, stats))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, kv, mask_B1TS, positions_BT, cache_index, token_mask_BT):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    attn_BTD, kv = Attention(c, name="self_attn")(norm("input_layernorm")(x_BTD), positions_BT, mask_B1TS, kv,
                                                  cache_index)
    x_BTD = x_BTD + attn_BTD
    h_BTD = norm("post_attention_layernorm")(x_BTD)
    if c.is_moe:
      mlp_BTD, stats = SparseMoe(c, name="block_sparse_moe")(h_BTD, token_mask_BT)
    else:
      mlp_BTD, stats = Mlp(c, name="mlp")(h_BTD), None
    x_BTD = constrain((x_BTD + mlp_BTD).astype(c.dtype), ("batch", "length", "embed"))
    return x_BTD, (kv, stats)
