"""Mixtral's expert computation behind `ModelConfig.moe_impl` (`MOE_EXPERTS`), called by `layers.SparseMoe` after
the router: "dense" (every expert on every token, the reference) and "ragged" (routed: each token's k experts as
grouped matmuls, the kernel per target platform chosen by `select_gmm_impl`, the one dispatch point).

Letters in names: B batch, T length, D hidden, I mlp, E experts, k experts per token, M = B*T*k (token, expert)
assignments, R rows of the grouped layout, G tiles.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
# the kernels, not the package's `gmm` (their custom VJP with one tiling for all three products)
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as megablox_gmm, tgmm as megablox_tgmm

from grit_jax import sharding
from grit_jax.modeling.platform import target_platform

constrain = nn.with_logical_constraint


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
# - "megablox": on TPU, the megablox Pallas kernels (jax.experimental.pallas.ops.tpu.megablox): `gmm` for the
#   forward and dx, `tgmm` for the weight gradient, each visiting only the row tiles of each expert's group. Chosen
#   because XLA:TPU (libtpu 0.0.42.1) groups lax.ragged_dot's forward and dx but compiles its weight gradient (a
#   ragged-contracting dot) as per-expert masked copies of every row fed to one convolution: E x the grouped FLOPs
#   (docs/performance.md "Routed MoE"); a custom VJP whose dw is a ragged_dot_general with the ragged dimension
#   contracted is that same op. tokamax's TPU ragged dot is this kernel family behind one more dependency.
# - "ragged_dot": jax.lax.ragged_dot, on GPU: XLA's native ragged dot, differentiated by jax's own rules.
# - "tiled": on CPU, where jax lowers ragged_dot to a dense masked product over all groups (E times the FLOPs of
#   the dense path's matmuls). Each expert's rows are padded to a multiple of a row tile, and a loop runs one
#   [tile, in] @ [in, out] matmul per used tile with that tile's expert weights; a custom VJP does the same for dx
#   and accumulates dw per expert in place.
GMM_IMPLS = ("megablox", "ragged_dot", "tiled")


def select_gmm_impl(platform: str | None = None) -> str:
  platform = platform or target_platform()
  return {"tpu": "megablox", "cpu": "tiled"}.get(platform, "ragged_dot")


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


def _megablox_row_tile(num_rows: int, num_experts: int) -> int:
  """Rows per megablox tile: 512 for training batches (MaxText's tile), down to 128 when experts get few rows. A
  multiple of 128 because tgmm reads the rows as the lane (minor) dim of the transposed input."""
  per_expert = max(1, -(-num_rows // num_experts))
  return min(512, max(128, 1 << (per_expert - 1).bit_length()))


def _megablox_dim_tile(n: int) -> int:
  """Tile of a contracted or output dim: 1024 where it divides (Mixtral's 4096 and 14336; MaxText's tile), else
  512 / 256 / 128, else the whole dim (a Mosaic block may equal the array's dim)."""
  return next((t for t in (1024, 512, 256, 128) if n % t == 0), n)


def _megablox_tiling(row_tile: int, contracted: int, out: int) -> tuple[int, int, int]:
  return row_tile, _megablox_dim_tile(contracted), _megablox_dim_tile(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _megablox_gmm(x_RI, w, sizes_E, row_tile: int, transposed: bool):
  """y[r] = x[r] @ w[e] for the rows r of expert e's contiguous group (sizes_E [E] int32, summing to R: the kernels
  leave rows outside every group unwritten). R a multiple of row_tile. w [E, I, O], or [E, O, I] if `transposed`
  (the kernel reads it transposed)."""
  return _megablox_gmm_fwd(x_RI, w, sizes_E, row_tile, transposed)[0]


def _megablox_interpret() -> bool:
  return target_platform() != "tpu"  # Pallas interpret mode off TPU (the CPU tests)


def _megablox_gmm_fwd(x_RI, w, sizes_E, row_tile, transposed):
  I = x_RI.shape[1]
  O = w.shape[1] if transposed else w.shape[2]
  y_RO = megablox_gmm(x_RI, w, sizes_E, x_RI.dtype, _megablox_tiling(row_tile, I, O), transpose_rhs=transposed,
                      interpret=_megablox_interpret())
  return y_RO, (x_RI, w, sizes_E)


def _megablox_gmm_bwd(row_tile, transposed, residuals, dy_RO):
  """dx = dy @ w[e]^T (gmm, the kernel reading w the other way round); dw[e] = x[group e]^T @ dy[group e] (tgmm:
  only the row tiles of each group; an expert without rows gets zeros), or its transpose dy^T @ x."""
  x_RI, w, sizes_E = residuals
  I, O = x_RI.shape[1], dy_RO.shape[1]
  dy_RO = dy_RO.astype(x_RI.dtype)
  interpret = _megablox_interpret()
  dx_RI = megablox_gmm(dy_RO, w, sizes_E, x_RI.dtype, _megablox_tiling(row_tile, O, I), transpose_rhs=not transposed,
                       interpret=interpret)
  if transposed:
    dw = megablox_tgmm(dy_RO.swapaxes(0, 1), x_RI, sizes_E, w.dtype, _megablox_tiling(row_tile, O, I),
                       interpret=interpret)
  else:
    dw = megablox_tgmm(x_RI.swapaxes(0, 1), dy_RO, sizes_E, w.dtype, _megablox_tiling(row_tile, I, O),
                       interpret=interpret)
  return dx_RI, dw, None


_megablox_gmm.defvjp(_megablox_gmm_fwd, _megablox_gmm_bwd)


def _routed_local(x_BTD, top_i_BTk, top_w_BTk, w1_EDI, w3_EDI, w2, *, gmm: str, psum_axes=(),
                  w2_transposed: bool = False):
  """Routed experts over the tokens at hand (one shard's under a mesh). M = B*T*k (token, expert) assignments,
  R rows in the grouped layout (M for ragged_dot; rounded up to whole megablox row tiles, the zero padding rows at
  the end; each expert's rows padded to whole tiles for tiled). w2 [E, I, D], or [E, D, I] if `w2_transposed`."""
  B, T, D = x_BTD.shape
  k, E = top_i_BTk.shape[-1], w1_EDI.shape[0]
  M = B * T * k
  e_M = top_i_BTk.reshape(M)  # assignment j belongs to token j // k
  sizes_E = jnp.bincount(e_M, length=E).astype(jnp.int32)
  order_M = jnp.argsort(e_M, stable=True)  # sorted slot s holds assignment order[s]
  tile = _row_tile(M, E) if gmm == "tiled" else 1
  num_tiles = (M + E * (tile - 1)) // tile  # enough for any routing: sum_e ceil(size_e / tile)
  tiles_E = -(-sizes_E // tile)
  ends_E = jnp.cumsum(tiles_E * tile)
  starts_E = ends_E - tiles_E * tile  # first layout row of each expert
  sorted_starts_E = jnp.cumsum(sizes_E) - sizes_E  # first sorted slot of each expert
  e_sorted_M = e_M[order_M]
  row_sorted_M = jnp.arange(M, dtype=jnp.int32) - sorted_starts_E[e_sorted_M] + starts_E[e_sorted_M]
  R = num_tiles * tile
  if gmm == "megablox":
    row_tile = _megablox_row_tile(M, E)
    R = -(-M // row_tile) * row_tile
  row_M = jnp.zeros((M,), jnp.int32).at[order_M].set(row_sorted_M, unique_indices=True)  # assignment -> row
  src_R = jnp.full((R,), M, jnp.int32).at[row_sorted_M].set(order_M, unique_indices=True)  # row -> assignment

  x_MD = jnp.broadcast_to(x_BTD.reshape(B * T, 1, D), (B * T, k, D)).reshape(M, D)
  xs_RD = x_MD.at[src_R].get(mode="fill", fill_value=0, unique_indices=True)  # padding rows (src M) are 0
  if gmm == "ragged_dot":
    mm = lambda a, w: jax.lax.ragged_dot(a, w, sizes_E)
  elif gmm == "megablox":
    padded_E = sizes_E.at[E - 1].add(R - M)  # the zero padding rows join the last group: 0 in, 0 out, 0 to dw
    mm = lambda a, w, transposed=False: _megablox_gmm(a, w, padded_E, row_tile, transposed)
  else:
    tile_expert_G = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(num_tiles) * tile, side="right"), E - 1)
    used_tiles = jnp.sum(tiles_E)
    mm = lambda a, w: _tiled_gmm(a, w, tile_expert_G.astype(jnp.int32), used_tiles, tile)
  h_RI = nn.silu(mm(xs_RD, w1_EDI)) * mm(xs_RD, w3_EDI)
  ys_RD = mm(h_RI, w2, transposed=True) if w2_transposed else mm(h_RI, w2)
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
  # megablox takes w2 as [E, D, I], the layout of w1/w3: its FSDP-sharded `embed` dim then is not the minor (lane)
  # dim, so the gathered weight needs no relayout copy before the kernel (the transpose happens on the local shard)
  transposed = gmm == "megablox"
  w2 = jnp.swapaxes(w2_EID, 1, 2) if transposed else w2_EID
  body = functools.partial(_routed_local, gmm=gmm, w2_transposed=transposed)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    tok_spec, w_in_spec, w_out_spec, psum_axes = _routed_specs(mesh, x_BTD.shape, w1_EDI.shape[2])
    body = jax.shard_map(functools.partial(body, psum_axes=psum_axes), mesh=mesh,
                         in_specs=(tok_spec, tok_spec, tok_spec, w_in_spec, w_in_spec,
                                   w_in_spec if transposed else w_out_spec),
                         out_specs=tok_spec, check_vma=False)
  return body(x_BTD, top_i_BTk, top_w_BTk, w1_EDI, w3_EDI, w2)


def _routed_specs(mesh, shape_BTD, I: int):
  """shard_map specs of `routed_experts` from the logical-axis rules in effect: tokens [B, T, *] split like the
  activations' batch and length (keeping only the mesh axes that divide them); w1/w3 [E, D, I] and w2 [E, I, D]
  whole except `mlp`. Returns (token spec, w1/w3 spec, w2 spec, mesh axes to sum the output over)."""
  rules_spec = nn.logical_to_mesh_axes(("batch", "length", "mlp"))
  b, t, mlp = (sharding.dividing_axes(mesh, rules_spec[i], n) for i, n in enumerate((shape_BTD[0], shape_BTD[1], I)))
  return jax.P(b, t, None), jax.P(None, None, mlp), jax.P(None, mlp, None), sharding.mesh_axes_of(mlp)


MOE_EXPERTS = {"dense": dense_experts, "ragged": routed_experts}  # ModelConfig.moe_impl -> expert computation
