"""Transformer (embedding, decoder stack, final norm, LM head) and the KV cache.

One set of weights runs causally (generation) or bidirectionally (embeddings): `causal` is a static argument of
the call, and the mask is built once per call by `attention.make_attention_mask`.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from grit_jax.modeling.attention import SelfAttentionMask, make_attention_mask
from grit_jax.modeling.config import REMAT_POLICIES, ModelConfig
from grit_jax.modeling.layers import INIT_STD, DecoderLayer, Linear, RMSNorm


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer for S slots. A call writes its T tokens at slots [index, index + T); attention
  reads all `valid` slots, with causality decided by the stored `positions` (so rows of different lengths and
  caches made by a bidirectional pass work unchanged)."""
  k: jax.Array          # [L, B, S, K, Dh]
  v: jax.Array          # [L, B, S, K, Dh]
  positions: jax.Array  # [B, S] int32
  valid: jax.Array      # [B, S] bool
  index: jax.Array      # [] int32, next write slot (shared by the batch)

  @classmethod
  def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               positions=jnp.zeros((batch, max_len), jnp.int32), valid=jnp.zeros((batch, max_len), bool),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


@flax.struct.dataclass
class TransformerOutput:
  hidden: jax.Array                 # [B, T, D] final-norm hidden states
  logits: jax.Array | None          # [B, T, V] float32, None when return_logits=False
  aux_loss: jax.Array               # [] Switch load-balancing loss (0 for dense models), unweighted
  cache: KVCache | None


def load_balancing_loss(stats_L2E, num_tokens, num_experts: int):
  """HF `load_balancing_loss_func` from per-layer sums: stats [L, 2, E] = (top-k counts, router prob sums) over
  real tokens. Like HF, the fractions pool all layers' rows (total = L * tokens) before the product:
  E * sum_e (counts_e / total) * (probs_e / total)."""
  total = jnp.maximum(stats_L2E.shape[0] * num_tokens, 1.0)
  counts_E, probs_E = stats_L2E[:, 0].sum(0) / total, stats_L2E[:, 1].sum(0) / total
  return num_experts * jnp.sum(counts_E * probs_E)


def _layer_class(config: ModelConfig):
  saved = REMAT_POLICIES[config.remat_policy]
  if saved is None:
    return DecoderLayer
  if saved == "dots_with_no_batch_dims":
    policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  else:
    policy = jax.checkpoint_policies.save_only_these_names(*saved) if saved else None  # None: keep nothing
  return nn.remat(DecoderLayer, policy=policy, prevent_cse=not config.scan_layers)


def apply_layers(c: ModelConfig, count: int, x_BTD, kv, masks, positions_BT, cache_index, token_mask_BT):
  """Layers 0..count-1 (named layers_{j}, created in the calling compact module: the Transformer unrolled, or one
  scanned LayerBlock) applied in order -> (x, (kv [count, ...] or None, router stats [count, 2, E] or None))."""
  layer_cls = _layer_class(c)
  new_k, new_v, all_stats = [], [], []
  for j in range(count):
    layer_kv = None if kv is None else (kv[0][j], kv[1][j])
    layer = layer_cls(c, c.layer_is_sliding(j), c.layer_is_moe(j), name=f"layers_{j}")
    x_BTD, (layer_kv, s) = layer(x_BTD, layer_kv, masks, positions_BT, cache_index, token_mask_BT)
    if layer_kv is not None:
      new_k.append(layer_kv[0])
      new_v.append(layer_kv[1])
    if s is not None:
      all_stats.append(s)
  kv = None if kv is None else (jnp.stack(new_k), jnp.stack(new_v))
  return x_BTD, (kv, jnp.stack(all_stats) if all_stats else None)


class LayerBlock(nn.Module):
  """`period` consecutive decoder layers `layers_0..layers_{period-1}`, applied in order: the body nn.scan repeats
  when the layer kinds repeat with that period (ModelConfig.scan_period > 1, e.g. Gemma 3's 5 sliding + 1 full).
  Layer j of the block is of layer j's kind; remat (`_layer_class`) applies per layer. Same signature as
  DecoderLayer, with kv [P, B, S, K, Dh] pairs in and out and stats [moe layers of the block, 2, E]."""
  config: ModelConfig
  period: int

  @nn.compact
  def __call__(self, x_BTD, kv, masks, positions_BT, cache_index, token_mask_BT):
    return apply_layers(self.config, self.period, x_BTD, kv, masks, positions_BT, cache_index, token_mask_BT)


class Transformer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, *, causal: bool = True, positions=None, segment_ids=None,
               cache: KVCache | None = None, return_logits: bool = True) -> TransformerOutput:
    """input_ids [B, T] int32; attention_mask [B, T] (1 = token, 0 = padding); positions [B, T] int32 (default
    arange(T), offset by cache.index when a cache is given); segment_ids [B, T] (packing, 0 = padding; with a
    cache only a fresh one of T slots, which then holds each packed sequence's keys/values). See docs/DESIGN.md."""
    c = self.config
    B, T = input_ids.shape
    valid_BT = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    if segment_ids is not None:
      valid_BT = valid_BT & (segment_ids != 0)
    if positions is None:
      start = 0 if cache is None else cache.index
      positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    positions_BT = positions.astype(jnp.int32)
    kinds = {c.layer_is_sliding(i) for i in range(c.num_layers)}
    # sliding layers' window: causal (left) or, with bidirectional_window, symmetric (Gemma 3); bidirectional
    # passes of other models see every token (GritLM)
    window = c.sliding_window if causal else (c.sliding_window // 2 if c.bidirectional_window and c.sliding_window
                                               else None)

    def self_mask(w):
      if cache is None:
        dense = make_attention_mask(positions_BT, positions_BT, valid_BT, causal=causal, sliding_window=w,
                                    q_segment_BT=segment_ids, k_segment_BS=segment_ids)
        segments_BT = valid_BT.astype(jnp.int32) if segment_ids is None else jnp.where(valid_BT, segment_ids, 0)
        return SelfAttentionMask(dense=dense, segment_ids=segments_BT.astype(jnp.int32), causal=causal,
                                 sliding_window=w)
      return make_attention_mask(positions_BT, k_pos_BS, k_valid_BS, causal=causal, sliding_window=w,
                                 q_segment_BT=segment_ids, k_segment_BS=segment_ids)

    if cache is None:
      kv, index, k_pos_BS, k_valid_BS = None, None, None, None
    else:
      if segment_ids is not None and cache.max_len != T:  # packed rows fill a fresh cache (packed RAG documents)
        raise ValueError("segment_ids (packing) with a KV cache: only for a fresh cache of the call's length")
      index = cache.index
      k_pos_BS = jax.lax.dynamic_update_slice(cache.positions, positions_BT, (0, index))
      k_valid_BS = jax.lax.dynamic_update_slice(cache.valid, valid_BT, (0, index))
      kv = (cache.k, cache.v)
    # (full-attention mask, sliding-window mask): each built only when a layer reads it
    masks = (self_mask(None) if False in kinds else None, self_mask(window) if True in kinds else None)

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                 ("vocab", "embed")),
                     name="embed_tokens")
    x_BTD = embed(input_ids)
    if c.gemma_norms:  # Gemma scales embeddings by sqrt(D), rounded to the compute dtype as HF does
      x_BTD = x_BTD * jnp.asarray(c.hidden_size ** 0.5, jnp.dtype(c.dtype))
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

    layer_cls = _layer_class(c)
    if c.scan_layers:  # the layer kinds repeat every P layers (ModelConfig refuses scan_layers otherwise)
      P = c.scan_period
      scan = lambda body: nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                                  length=c.num_layers // P, metadata_params={nn.PARTITION_NAME: "layers"})
      if P == 1:  # identical layers: params layers/... [L, ...]
        x_BTD, (kv, stats) = scan(layer_cls)(c, c.layer_is_sliding(0), c.layer_is_moe(0), name="layers")(
            x_BTD, kv, masks, positions_BT, index, valid_BT)
      else:  # blocks of P layers: params layers/layers_{j}/... [L / P, ...] hold layers j, j + P, ...
        # (the cache's [L] <-> [L / P, P] reshapes keep layer i = block i // P, slot i % P: the unrolled order)
        blocks = lambda a: a.reshape((c.num_layers // P, P) + a.shape[1:])
        kv = None if kv is None else (blocks(kv[0]), blocks(kv[1]))
        x_BTD, (kv, stats) = scan(LayerBlock)(c, P, name="layers")(x_BTD, kv, masks, positions_BT, index, valid_BT)
        layers = lambda a: a.reshape((-1,) + a.shape[2:])
        kv = None if kv is None else (layers(kv[0]), layers(kv[1]))
        stats = None if stats is None else layers(stats)
    else:
      x_BTD, (kv, stats) = apply_layers(c, c.num_layers, x_BTD, kv, masks, positions_BT, index, valid_BT)

    hidden_BTD = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.gemma_norms, name="norm")(x_BTD)
    aux = (load_balancing_loss(stats, valid_BT.sum().astype(jnp.float32), c.num_experts) if c.is_moe
           else jnp.zeros((), jnp.float32))

    logits_BTV = None
    if return_logits:
      if c.tie_word_embeddings:
        logits_BTV = embed.attend(hidden_BTD).astype(jnp.float32)
      else:
        logits_BTV = Linear((c.vocab_size,), ("embed", "vocab"), 1, c.dtype, c.param_dtype, out_dtype="float32",
                            impl=c.matmul_impl, name="lm_head")(hidden_BTD)
      if c.final_logit_softcapping is not None:
        cap = c.final_logit_softcapping
        logits_BTV = cap * jnp.tanh(logits_BTV / cap)
      logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))

    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=kv[0], v=kv[1], positions=k_pos_BS, valid=k_valid_BS, index=index + T)
    return TransformerOutput(hidden=hidden_BTD, logits=logits_BTV, aux_loss=aux, cache=new_cache)


# -----------------------------------------------------------------------------------------------------------------
# Scanned <-> unscanned parameter layouts


def _stack(xs):
  return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def scanned_period(params: dict) -> int:
  """The layout of `params`: 0 = unscanned (layers_{i}/...), 1 = identical layers stacked (layers/... [L, ...]),
  P > 1 = blocks of P layers stacked (layers/layers_{j}/... [L / P, ...], layer i = block i // P, slot i % P)."""
  if "layers" not in params:
    return 0
  inner = params["layers"]
  keys = set(inner.keys()) if hasattr(inner, "keys") else set()
  P = len(keys)
  return P if P and keys == {f"layers_{j}" for j in range(P)} else 1  # a DecoderLayer holds no layers_{j}


def stacked_ref(params: dict, i: int):
  """(subtree, index tuple) of layer i in `params` of any layout (`scanned_period`): the layer's leaves are
  leaf[index] for each leaf of the subtree."""
  P = scanned_period(params)
  if P == 0:
    return params[f"layers_{i}"], ()
  if P == 1:
    return params["layers"], (i,)
  return params["layers"][f"layers_{i % P}"], (i // P,)


def scan_params(params: dict, num_layers: int, period: int = 1) -> dict:
  """layers_{i}/... (unscanned) -> the scan_layers=True layout of a model whose layer kinds repeat every `period`
  layers (ModelConfig.scan_period): period 1 stacks layers/... [L, ...]; period P > 1 stacks layers/layers_{j}/...
  [L / P, ...] from layers j, j + P, j + 2P, ... (`scanned_period`). Idempotent; params stacked with another period
  are restacked."""
  params = nn.meta.unbox(params)
  if num_layers % period:
    raise ValueError(f"scan_params: period {period} does not divide num_layers={num_layers}")
  have = scanned_period(params)
  if have == period:
    return params
  if have:
    params = unscan_params(params)
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stack = lambda idx: jax.tree.map(lambda *xs: _stack(xs), *[params[f"layers_{i}"] for i in idx])
  if period == 1:
    out["layers"] = stack(range(num_layers))
  else:
    out["layers"] = {f"layers_{j}": stack(range(j, num_layers, period)) for j in range(period)}
  return out


def unscan_params(params: dict) -> dict:
  """Stacked (either `scanned_period` layout) -> layers_{i}/... Idempotent."""
  params = nn.meta.unbox(params)
  P = scanned_period(params)
  if not P:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0] * P
  for i in range(num_layers):
    node, idx = stacked_ref(params, i)
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[idx], node)
  return out


def params_for(params: dict, config: ModelConfig) -> dict:
  """`params` in the layout `config.scan_layers` asks for."""
  return scan_params(params, config.num_layers, config.scan_period) if config.scan_layers else unscan_params(params)


def param_shardings(config: ModelConfig, mesh, rules):
  """(abstract params, their NamedShardings on `mesh` under `rules`), from the shapes alone (nothing allocated)."""
  from grit_jax import sharding as mesh_lib
  ids = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda r: Transformer(config).init(r, ids, jnp.ones_like(ids), causal=True)["params"],
                         jax.random.PRNGKey(0))
  return mesh_lib.logical_shardings(boxed, mesh, rules)


def init_params(config: ModelConfig, rng=None, batch: int = 1, length: int = 8):
  """Random params (unboxed) for `config`."""
  ids = jnp.zeros((batch, length), jnp.int32)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return nn.meta.unbox(Transformer(config).init(rng, ids, jnp.ones_like(ids), causal=True)["params"])


def embed_packed(module: Transformer, variables, ids_URL, segment_ids_URL, positions_URL, pool_mask_URL, *,
                 num_per_unit: int, causal: bool, pooling: str, cache=None):
  """The packed embedding pass, the one the train step (GritObjective.embed_packed) and encode
  (inference.encode.packed_embed_fn) both run: packed rows [U, R, L] x4 (segment id s+1 = sequence s of the pass,
  0 = padding; positions restart per sequence) -> (pooled [U, n, D] float32, sequence u*n+i at [u, i], empty
  slots 0; the KVCache of the pass when `cache` is given, else None). Tokens attend only inside their own sequence;
  each sequence is pooled on its own text tokens (objectives.pool_packed); `cls` pools each sequence's first token.
  `variables`: the module's ({"params": ...}, plus a LoRA run's frozen base). With a subset of each unit's rows
  (GradCache chunks), the other rows' sequences come out as 0."""
  from grit_jax import objectives
  U, R, L = ids_URL.shape
  flat = lambda x: x.reshape(U * R, L)
  out = module.apply(variables, flat(ids_URL), None, causal=causal, positions=flat(positions_URL),
                     segment_ids=flat(segment_ids_URL), cache=cache, return_logits=False)
  if pooling == "cls":  # the mean over one token: each text's first (BOS)
    pool_mask_URL, pooling = (positions_URL == 0) & (segment_ids_URL > 0), "mean"
  pooled_UND = objectives.pool_packed(out.hidden.reshape(U, R * L, -1), pool_mask_URL.reshape(U, R * L),
                                      segment_ids_URL.reshape(U, R * L) - 1, num_per_unit, pooling)
  return pooled_UND, out.cache
