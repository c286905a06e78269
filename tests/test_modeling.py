"""Model parity with transformers (tiny random Mistral / Mixtral), attention modes, KV cache, scan, MoE aux loss."""
import numpy as np
import pytest

import jax
import torch
import transformers
import jax.numpy as jnp  # noqa: E402

from helpers_hf import make_hf_model, random_batch, torch_logits  # noqa: E402

from grit_jax import GritLM  # noqa: E402
from grit_jax.modeling import KVCache, Transformer, get_config  # noqa: E402
from grit_jax.modeling.attention import make_attention_mask  # noqa: E402
from grit_jax.modeling.layers import select_matmul_impl  # noqa: E402
from grit_jax.modeling.model import scan_params, unscan_params  # noqa: E402

TOL = 1e-4
LENGTHS = [12, 7, 9]  # right-padded batch, T = 12


def _real(x, mask):
  return x[np.asarray(mask, bool)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, request):
  """(transformers model, GritLM) of the same tiny random checkpoint, one per kind."""
  cache = {}

  def get(kind, **overrides):
    key = (kind, tuple(sorted(overrides.items())))
    if key not in cache:
      path = tmp_path_factory.mktemp(f"hf_{kind}")
      hf = make_hf_model(kind, path, **overrides)
      cache[key] = (hf, GritLM.from_pretrained(str(path)))
    return cache[key]

  return get


@pytest.fixture(scope="module")
def batch():
  return random_batch(np.random.RandomState(0), LENGTHS, 256)


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_causal_logits_match_transformers(pair, kind, batch):
  hf, ours = pair(kind)
  ids = batch[0][:1]  # unpadded
  ref, got = torch_logits(hf, ids), ours.logits(ids)
  assert got.shape == ref.shape == (1, 12, 256)
  assert np.abs(ref).max() > 1.0  # O(1) logits: the tolerance is meaningful
  assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_causal_logits_with_right_padding(pair, kind, batch):
  hf, ours = pair(kind)
  ids, mask = batch
  ref, got = torch_logits(hf, ids, mask), ours.logits(ids, mask)
  assert np.abs(_real(got, mask) - _real(ref, mask)).max() <= TOL


def test_sliding_window_shorter_than_sequence(pair, batch):
  hf, ours = pair("mistral", sliding_window=4)
  assert ours.config.sliding_window == 4
  ids, mask = batch
  ref, got = torch_logits(hf, ids, mask), ours.logits(ids, mask)
  assert np.abs(_real(got, mask) - _real(ref, mask)).max() <= TOL
  # The window matters: the same weights without it give different logits late in the sequence.
  no_window = GritLM(ours.config.replace(sliding_window=None), ours.params)
  assert np.abs(no_window.logits(ids, mask)[0, -1] - got[0, -1]).max() > 1e-2


@pytest.mark.parametrize("kv_heads", [4, 1])  # GQA ratio 1 (MHA) and 4
def test_gqa_ratios(pair, kv_heads, batch):
  hf, ours = pair("mistral", num_key_value_heads=kv_heads)
  assert ours.config.num_heads // ours.config.num_kv_heads == 4 // kv_heads
  ids, mask = batch
  ref, got = torch_logits(hf, ids, mask), ours.logits(ids, mask)
  assert np.abs(_real(got, mask) - _real(ref, mask)).max() <= TOL


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_bidirectional_hidden_states_match_transformers_with_padding_only_mask(pair, kind, batch):
  hf, ours = pair(kind)
  ids, mask = batch
  keep = torch.as_tensor(mask, dtype=torch.bool)[:, None, None, :].expand(-1, 1, ids.shape[1], -1)  # [B,1,T,T]
  with torch.no_grad():
    ref = hf.model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=keep).last_hidden_state.numpy()
  got = ours.hidden_states(ids, mask, causal=False)
  assert np.abs(_real(got, mask) - _real(ref, mask)).max() <= TOL
  # and it is not the causal result
  causal = ours.hidden_states(ids, mask, causal=True)
  assert np.abs(_real(causal, mask) - _real(got, mask)).max() > 1e-2


def test_moe_aux_loss_matches_transformers(pair, batch):
  hf, ours = pair("mixtral")
  ids, mask = batch
  model = Transformer(ours.config)
  for m in (mask, np.ones_like(mask)):
    with torch.no_grad():
      ref = hf(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(m),
               output_router_logits=True).aux_loss.item()
    got = float(model.apply({"params": ours.params}, jnp.asarray(ids), jnp.asarray(m), causal=True).aux_loss)
    assert abs(got - ref) <= 1e-5, (got, ref)
    assert got > 1.0  # E * sum f_e P_e >= 1 with equality only for perfect balance: a real number was computed
  # padding-aware: the padded and unpadded batches give different losses
  dense = float(model.apply({"params": ours.params}, jnp.asarray(ids), jnp.asarray(mask), causal=True).aux_loss)
  full = float(model.apply({"params": ours.params}, jnp.asarray(ids), None, causal=True).aux_loss)
  assert abs(dense - full) > 1e-6


def test_dense_model_aux_loss_is_zero(pair, batch):
  _, ours = pair("mistral")
  out = Transformer(ours.config).apply({"params": ours.params}, jnp.asarray(batch[0]), None, causal=True)
  assert float(out.aux_loss) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# attention modes


def test_sliding_window_mask_hand_worked():
  pos = jnp.arange(5)[None]
  got = np.asarray(make_attention_mask(pos, pos, jnp.ones((1, 5), bool), causal=True, sliding_window=3))[0, 0]
  want = np.array([[1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0],
                   [0, 1, 1, 1, 0],
                   [0, 0, 1, 1, 1]], bool)  # HF: kv_idx <= q_idx and kv_idx > q_idx - 3
  np.testing.assert_array_equal(got, want)
  bidir = np.asarray(make_attention_mask(pos, pos, jnp.array([[1, 1, 1, 0, 1]], bool), causal=False))[0, 0]
  np.testing.assert_array_equal(bidir, np.tile([1, 1, 1, 0, 1], (5, 1)).astype(bool))  # padding only
  sym = np.asarray(make_attention_mask(pos, pos, jnp.array([[1, 1, 1, 0, 1]], bool), causal=False,
                                       sliding_window=1))[0, 0]
  np.testing.assert_array_equal(sym, np.array([[1, 1, 0, 0, 0],
                                               [1, 1, 1, 0, 0],
                                               [0, 1, 1, 0, 0],
                                               [0, 0, 1, 0, 1],
                                               [0, 0, 0, 0, 1]], bool))  # Gemma 3: |q - k| <= 1, padding
  seg = jnp.array([[1, 1, 2, 2, 0]])
  packed = np.asarray(make_attention_mask(pos, pos, seg != 0, causal=True, q_segment_BT=seg, k_segment_BS=seg))
  np.testing.assert_array_equal(packed[0, 0], np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                                        [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool))


def test_causal_prefix_invariance_and_its_failure_when_bidirectional(pair, batch):
  _, ours = pair("mistral")
  ids = batch[0][:1]
  full_c, pre_c = ours.hidden_states(ids, causal=True), ours.hidden_states(ids[:, :8], causal=True)
  assert np.abs(full_c[:, :8] - pre_c).max() <= 1e-5
  full_b, pre_b = ours.hidden_states(ids, causal=False), ours.hidden_states(ids[:, :8], causal=False)
  assert np.abs(full_b[:, :8] - pre_b).max() > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_invariance_to_extra_right_padding(pair, batch, causal):
  _, ours = pair("mixtral")
  ids, mask = batch
  rng = np.random.RandomState(1)
  ids_long = np.concatenate([ids, rng.randint(3, 256, (ids.shape[0], 5))], axis=1).astype(np.int32)
  mask_long = np.concatenate([mask, np.zeros((ids.shape[0], 5), np.int32)], axis=1)
  short = ours.hidden_states(ids, mask, causal=causal)
  long = ours.hidden_states(ids_long, mask_long, causal=causal)[:, :ids.shape[1]]
  assert np.abs(_real(short, mask) - _real(long, mask)).max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# KV cache


def _decode_with_cache(model, params, prompt_ids, prompt_mask, cont, prefill_causal=True):
  """Prefill the right-padded prompts, then feed cont[:, j] one token per step at position len_b + j.
  Returns (prefill logits [B, P, V], step logits [B, C, V])."""
  B, P = prompt_ids.shape
  C = cont.shape[1]
  lens = prompt_mask.sum(-1).astype(np.int32)
  cache = KVCache.init(model.config, B, P + C, jnp.float32)
  prefill = jax.jit(lambda p, i, m, c: model.apply({"params": p}, i, m, causal=prefill_causal, cache=c))
  step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, jnp.ones_like(t), causal=True, positions=pos,
                                                  cache=c))
  out = prefill(params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), cache)
  assert int(out.cache.index) == P
  first, cache, steps = np.asarray(out.logits), out.cache, []
  for j in range(C):
    out = step(params, jnp.asarray(cont[:, j:j + 1]), jnp.asarray(lens[:, None] + j), cache)
    steps.append(np.asarray(out.logits[:, 0]))
    cache = out.cache
  assert int(cache.index) == P + C
  return first, np.stack(steps, axis=1)


@pytest.mark.parametrize("kind,overrides", [("mistral", {}), ("mixtral", {}), ("mistral", {"sliding_window": 4})])
def test_kv_cache_decoding_equals_full_forward(pair, batch, kind, overrides):
  _, ours = pair(kind, **overrides)
  ids, mask = batch
  lens = mask.sum(-1)
  C = 5
  cont = np.random.RandomState(2).randint(3, 256, (ids.shape[0], C)).astype(np.int32)
  first, steps = _decode_with_cache(Transformer(ours.config), ours.params, ids, mask, cont)
  # full forward of each row's prompt + continuation, right-padded
  T = ids.shape[1] + C
  full_ids = np.zeros((ids.shape[0], T), np.int32)
  full_mask = np.zeros((ids.shape[0], T), np.int32)
  for b, n in enumerate(lens):
    full_ids[b, :n + C] = np.concatenate([ids[b, :n], cont[b]])
    full_mask[b, :n + C] = 1
  full = ours.logits(full_ids, full_mask)
  for b, n in enumerate(lens):
    assert np.abs(first[b, :n] - full[b, :n]).max() <= 1e-5
    assert np.abs(steps[b] - full[b, n:n + C]).max() <= 1e-5


def test_cache_from_bidirectional_pass_reused_causally(pair, batch):
  """Prefix encoded bidirectionally into the cache, continuation decoded causally: equals transformers run on
  prefix + continuation with the matching 4D mask (prefix block full, continuation rows causal)."""
  hf, ours = pair("mistral")
  ids, mask = batch
  lens = mask.sum(-1)
  C = 4
  cont = np.random.RandomState(3).randint(3, 256, (ids.shape[0], C)).astype(np.int32)
  _, steps = _decode_with_cache(Transformer(ours.config), ours.params, ids, mask, cont, prefill_causal=False)
  B, T = ids.shape[0], ids.shape[1] + C
  full_ids = np.zeros((B, T), np.int64)
  keep = np.zeros((B, 1, T, T), bool)
  for b, n in enumerate(lens):
    full_ids[b, :n + C] = np.concatenate([ids[b, :n], cont[b]])
    keep[b, 0, :n, :n] = True                                               # prefix: bidirectional
    keep[b, 0, n:, :] = np.tril(np.ones((T, T), bool))[n:] & (np.arange(T) < n + C)  # continuation: causal
  with torch.no_grad():
    ref = hf(input_ids=torch.as_tensor(full_ids), attention_mask=torch.as_tensor(keep)).logits.numpy()
  for b, n in enumerate(lens):
    # step j feeds cont[j] at position n + j; its logits are row position n + j
    assert np.abs(steps[b] - ref[b, n:n + C]).max() <= TOL
  # and the bidirectional prefix really changed them (vs a causal prefill)
  _, causal_steps = _decode_with_cache(Transformer(ours.config), ours.params, ids, mask, cont)
  assert np.abs(causal_steps - steps).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# scan, remat, dtypes, logical axes


def _loss_and_grad(config, params, ids, mask, causal):
  """Jitted (logits, aux, grads) of a scalar touching every output, for layout / remat comparisons."""
  model = Transformer(config)

  def loss(p):
    out = model.apply({"params": p}, ids, mask, causal=causal)
    return jnp.sum(out.logits * mask[..., None]) * 1e-3 + out.aux_loss, out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out.logits, out.aux_loss, grads


@pytest.fixture(scope="module")
def unscanned_reference(pair, batch):
  _, ours = pair("mixtral")
  ids, mask = (jnp.asarray(x) for x in batch)
  return {causal: _loss_and_grad(ours.config, ours.params, ids, mask, causal) for causal in (True, False)}


@pytest.mark.parametrize("remat", ["none", "full", "save_dots_except_mlp"])
def test_scan_equals_no_scan(pair, batch, unscanned_reference, remat):
  _, ours = pair("mixtral")
  ids, mask = (jnp.asarray(x) for x in batch)
  p_scan = scan_params(ours.params, ours.config.num_layers)
  assert p_scan["layers"]["block_sparse_moe"]["w1"].shape == (2, 4, 64, 96)
  assert jax.tree.structure(unscan_params(p_scan)) == jax.tree.structure(ours.params)
  cfg = ours.config.replace(scan_layers=True, remat_policy=remat)
  for causal in ((True, False) if remat == "none" else (True,)):  # remat changes no forward math
    logits0, aux0, g0 = unscanned_reference[causal]
    logits1, aux1, g1 = _loss_and_grad(cfg, p_scan, ids, mask, causal)
    np.testing.assert_allclose(np.asarray(logits1), np.asarray(logits0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(aux1), float(aux0), atol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(unscan_params(g1))):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


# Scanning blocks of P layers when the layer kinds repeat (Gemma 3: 5 sliding + 1 full)
_S, _F = "sliding_attention", "full_attention"
PERIOD_CASES = {  # name -> (ModelConfig fields, the period scan_layers uses)
    "gemma_p2": (dict(num_layers=4, layer_types=(_S, _F) * 2), 2),
    "gemma_p3": (dict(num_layers=6, layer_types=(_S, _S, _F) * 2), 3),
    # experts and dense MLPs mixed in a block (+ Qwen3-MoE's experts): router stats come back in layer order
    "moe_p2": (dict(family="qwen3_moe", num_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                    dense_layers=(1, 3), norm_topk_prob=False, qk_norm=True, router_aux_loss_coef=0.02), 2),
}


def _period_model(name):
  """(unscanned config, its P, perturbed params): tiny, float32, weights ~0.1 so every layer matters."""
  from grit_jax.modeling import ModelConfig, init_params
  fields, P = PERIOD_CASES[name]
  base = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8)
  if "layer_types" in fields:
    base.update(family="gemma3_text", sliding_window=4, gemma_norms=True, qk_norm=True, query_pre_attn_scalar=24.0,
                rope_local_theta=1e4, rope_theta=1e6, bidirectional_window=True, hidden_act="gelu_pytorch_tanh",
                tie_word_embeddings=True, final_logit_softcapping=3.0)
  cfg = ModelConfig(**base, **fields)
  params = init_params(cfg, jax.random.PRNGKey(1))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return cfg, P, params


@pytest.mark.parametrize("name", list(PERIOD_CASES))
def test_scan_over_repeating_layer_blocks_equals_unrolled(batch, name):
  """scan_layers with a period P > 1: nn.scan over num_layers // P blocks of P layers gives the unrolled model's
  logits (causal and bidirectional) and aux loss from the same weights (params_for), the layout init makes, the
  layers axis first in every stacked param, and scan_params / unscan_params invert each other exactly."""
  import flax.linen as nn
  from grit_jax.modeling.model import params_for, scanned_period
  cfg, P, params = _period_model(name)
  scanned = cfg.replace(scan_layers=True)
  assert scanned.scan_period == P and cfg.num_layers // P >= 2
  p_scan = params_for(params, scanned)
  assert scanned_period(p_scan) == P and sorted(p_scan["layers"]) == [f"layers_{j}" for j in range(P)]
  np.testing.assert_array_equal(p_scan["layers"]["layers_1"]["self_attn"]["q_proj"]["kernel"][1],
                                params[f"layers_{P + 1}"]["self_attn"]["q_proj"]["kernel"])
  back = unscan_params(p_scan)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
  again = scan_params(back, cfg.num_layers, P)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(p_scan)))
  assert all(a is b for a, b in zip(jax.tree.leaves(scan_params(p_scan, cfg.num_layers, P)),
                                   jax.tree.leaves(p_scan)))  # idempotent, no copy
  if not cfg.is_moe:  # Gemma's sliding and full layers hold the same params: a period-1 stack is restacked
    restacked = scan_params(scan_params(params, cfg.num_layers), cfg.num_layers, P)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(p_scan)))

  ids = jnp.asarray(batch[0] % cfg.vocab_size)
  mask = jnp.asarray(batch[1])
  abstract = jax.eval_shape(lambda: Transformer(scanned).init(jax.random.PRNGKey(0), ids, causal=True))["params"]
  assert jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract)) == jax.tree.map(lambda x: x.shape, p_scan)
  specs = nn.get_partition_spec(abstract)["layers"]
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert all(s[0] == "layers" for s in jax.tree.leaves(specs, is_leaf=is_spec))
  for causal in (True, False):
    want = Transformer(cfg).apply({"params": params}, ids, mask, causal=causal)
    got = Transformer(scanned).apply({"params": p_scan}, ids, mask, causal=causal)
    assert np.abs(np.asarray(want.logits)).max() > 0.5
    np.testing.assert_allclose(_real(np.asarray(got.logits), mask), _real(np.asarray(want.logits), mask),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(got.aux_loss), float(want.aux_loss), atol=1e-6)
    assert (float(want.aux_loss) > 0) == cfg.is_moe


@pytest.mark.parametrize("name", ["gemma_p3", "moe_p2"])
def test_scan_over_repeating_layer_blocks_kv_cache_and_remat_grads(batch, name):
  """With a KV cache, the scanned blocks' prefill and decode steps give the unrolled model's logits and the same
  cache, layer for layer ([L, ...] in layer order); per-layer remat in the blocks leaves the gradients unchanged."""
  cfg, P, params = _period_model(name)
  scanned = cfg.replace(scan_layers=True, remat_policy="full")
  p_scan = scan_params(params, cfg.num_layers, P)
  ids, mask = batch[0] % cfg.vocab_size, batch[1]
  cont = np.random.RandomState(2).randint(3, cfg.vocab_size, (ids.shape[0], 2)).astype(np.int32)
  runs = {}
  for c, p in ((cfg, params), (scanned, p_scan)):
    model = Transformer(c)
    first, steps = _decode_with_cache(model, p, ids, mask, cont)
    cache = KVCache.init(c, ids.shape[0], ids.shape[1], jnp.float32)
    k = model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask), causal=True, cache=cache).cache.k
    runs[c.scan_layers] = (first, steps, np.asarray(k), _loss_and_grad(c, p, jnp.asarray(ids), jnp.asarray(mask),
                                                                       True)[2])
  (f0, s0, k0, g0), (f1, s1, k1, g1) = runs[False], runs[True]
  np.testing.assert_allclose(_real(f1, mask), _real(f0, mask), atol=1e-5, rtol=0)
  np.testing.assert_allclose(s1, s0, atol=1e-5, rtol=0)
  assert k1.shape == (cfg.num_layers,) + k0.shape[1:]
  np.testing.assert_allclose(k1, k0, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(unscan_params(g1))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides,causal", [({}, True), ({}, False),
                                              (dict(scan_layers=True, remat_policy="minimal"), True),
                                              (dict(dtype="bfloat16"), True), (dict(dtype="bfloat16"), False)])
def test_flat_matmul_equals_dot_general(pair, batch, overrides, causal):
  """matmul_impl="flat" (2-D matmuls with their own VJP, and attention.flat_attention for self-attention; what
  "auto" picks on CPU) gives the logits and gradients of the plain N-D dot_general that jax differentiates, o_proj's
  two contracted dims and the LM head included; causal and bidirectional, right-padded rows. In bfloat16 the two
  round differently (each ~2% of the gradients' scale from float32): both are held to the float32 dot_general."""
  _, ours = pair("mistral")
  ids, mask = (jnp.asarray(x) for x in batch)
  params = scan_params(ours.params, ours.config.num_layers) if overrides.get("scan_layers") else ours.params
  run = lambda impl, **o: _loss_and_grad(ours.config.replace(matmul_impl=impl, **o), params, ids, mask, causal)
  out = {impl: run(impl, **overrides) for impl in ("xla", "flat")}
  bf16 = overrides.get("dtype") == "bfloat16"
  logits0, _, g0 = run("xla", **{k: v for k, v in overrides.items() if k != "dtype"}) if bf16 else out["xla"]
  scale = lambda x: float(np.abs(np.asarray(x, np.float32)).max())
  tol = (lambda x: 4e-2 * scale(x)) if bf16 else (lambda x: 1e-5 * max(scale(x), 1.0))
  for impl in ("flat", "xla") if bf16 else ("flat",):
    logits1, _, g1 = out[impl]
    assert np.abs(np.asarray(logits1) - np.asarray(logits0)).max() <= tol(logits0)
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      assert a.dtype == b.dtype and a.shape == b.shape
      assert np.abs(np.asarray(b, np.float32) - np.asarray(a, np.float32)).max() <= tol(a)


def test_matmul_impl_auto_is_flat_on_cpu_only(pair, batch):
  """"auto" traces the flat custom-VJP matmul when compiling for CPU and the plain dot_general for TPU / GPU."""
  _, ours = pair("mistral")
  ids, mask = (jnp.asarray(x) for x in batch)
  jaxpr = lambda impl: str(jax.make_jaxpr(lambda p: Transformer(ours.config.replace(matmul_impl=impl)).apply(
      {"params": p}, ids, mask).logits)(ours.params))
  assert "custom_vjp_call" in jaxpr("auto") and "custom_vjp_call" not in jaxpr("xla")
  assert [select_matmul_impl("auto", p) for p in ("cpu", "tpu", "gpu")] == ["flat", "xla", "xla"]
  assert select_matmul_impl("flat", "tpu") == "flat"


def test_scanned_model_from_pretrained_matches(pair, batch, tmp_path_factory):
  hf, ours = pair("mistral")
  path = tmp_path_factory.mktemp("scan_reload")
  ours.save_pretrained(str(path))
  scanned = GritLM.from_pretrained(str(path), scan_layers=True)
  assert "layers" in scanned.params and "layers_0" not in scanned.params
  ids, mask = batch
  assert np.abs(_real(scanned.logits(ids, mask), mask) - _real(torch_logits(hf, ids, mask), mask)).max() <= TOL


def test_bfloat16_compute(pair, batch):
  _, ours = pair("mistral")
  cfg = ours.config.replace(dtype="bfloat16")
  out = Transformer(cfg).apply({"params": ours.params}, jnp.asarray(batch[0]), jnp.asarray(batch[1]), causal=True)
  assert out.hidden.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
  assert jax.tree.leaves(ours.params)[0].dtype == jnp.float32
  ref = ours.logits(*batch)
  err = np.abs(_real(np.asarray(out.logits), batch[1]) - _real(ref, batch[1])).max()
  assert 0 < err < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("preset", ["tiny_mistral", "tiny_mixtral"])
def test_every_param_has_logical_axes(preset):
  import flax.linen as nn
  names = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "exp", "layers"}
  for scan in (False, True):
    cfg = get_config(preset, scan_layers=scan)
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), ids, causal=True))["params"]
    specs = nn.get_partition_spec(abstract)
    shapes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for box, spec in zip(shapes, jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
      assert isinstance(box, nn.Partitioned), box
      assert len(spec) == box.value.ndim and set(spec) <= names, spec
    if scan:
      assert all(s[0] == "layers" for s in jax.tree.leaves(
          specs["layers"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))


def test_presets():
  m7 = get_config("mistral_7b")
  assert (m7.num_layers, m7.hidden_size, m7.num_heads, m7.num_kv_heads, m7.head_dim, m7.intermediate_size,
          m7.vocab_size, m7.rope_theta, m7.sliding_window, m7.rms_norm_eps) == (
              32, 4096, 32, 8, 128, 14336, 32000, 1e4, 4096, 1e-5)
  mx = get_config("mixtral_8x7b")
  assert (mx.num_experts, mx.num_experts_per_tok, mx.rope_theta, mx.sliding_window, mx.router_aux_loss_coef) == (
      8, 2, 1e6, None, 0.02)
  assert get_config("tiny_mistral").vocab_size == 1024 and get_config("tiny_mixtral").num_experts == 4
  assert hash(get_config("tiny_mistral")) == hash(get_config("tiny_mistral"))
  from grit_jax.errors import GritJaxError
  with pytest.raises(GritJaxError, match="num_heads"):
    get_config("tiny_mistral", num_kv_heads=3)
  with pytest.raises(GritJaxError, match="nope"):
    get_config("tiny_mistral", nope=1)


def test_rotary_table_equals_direct_angles_and_is_nan_outside():
  """The CPU layout's RoPE gathers cos/sin from a table of positions: the same values bit for bit (float32 and
  bf16), and a position past the table is NaN, not a clamped angle."""
  from grit_jax.modeling.layers import apply_rotary
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 16), jnp.float32)
  pos = jnp.array([[0, 1, 2, 3, 2047], [7, 0, 1, 500, 1000]], jnp.int32)
  for dtype in (jnp.float32, jnp.bfloat16):
    np.testing.assert_array_equal(apply_rotary(x.astype(dtype), pos, 1e4, table_len=2048),
                                  apply_rotary(x.astype(dtype), pos, 1e4))
  out = apply_rotary(x, pos.at[0, 4].set(2048), 1e4, table_len=2048)
  assert np.isnan(out[0, 4]).all() and not np.isnan(out[0, :4]).any()
