"""Attention kernels vs the plain path.

Splash (the TPU Pallas kernel) runs here in Pallas interpret mode: same kernel code, block-sparsity tables and
custom backward, executed by the CPU. cuDNN cannot run without an NVIDIA GPU: on CPU we check our call of
jax.nn.dot_product_attention through its XLA implementation (same arguments), and a GPU-only test compares the
cuDNN kernel itself (skipped here).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from grit_jax.modeling import kernels

B, T, H, KVH, DH = 2, 200, 4, 2, 32  # T not a multiple of 128: exercises the kernel's tail padding


def _reference(q, k, v, allowed_BTS):
  """Dense softmax attention with an explicit boolean mask [B, T, S]; GQA by repeating kv heads."""
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
  s = jnp.where(allowed_BTS[:, None], s, -1e30)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))


def _allowed(seg_BT, causal, window=None):
  t = np.arange(seg_BT.shape[1])
  ok = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, :, None] > 0)
  if causal:
    ok &= t[None, :, None] >= t[None, None, :]
    if window:
      ok &= (t[None, :, None] - t[None, None, :]) < window
  return jnp.asarray(ok)


@pytest.fixture(scope="module")
def qkv():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (B, T, H, DH), jnp.float32)
  k = jax.random.normal(kk, (B, T, KVH, DH), jnp.float32)
  v = jax.random.normal(kv, (B, T, KVH, DH), jnp.float32)
  return q, k, v


def _padding_ids():
  lengths = np.array([200, 137])  # row 0 full, row 1 right-padded
  return (np.arange(T)[None] < lengths[:, None]).astype(np.int32)


def _packed_ids():
  ids = np.zeros((B, T), np.int32)
  ids[0, :70], ids[0, 70:150], ids[0, 150:190] = 1, 2, 3  # three packed sequences + padding tail
  ids[1, :120], ids[1, 120:] = 1, 2
  return ids


CASES = {
    "causal_padding": (True, _padding_ids, None),
    "bidirectional_padding": (False, _padding_ids, None),
    "causal_packed": (True, _packed_ids, None),
    "bidirectional_packed": (False, _packed_ids, None),  # packed embedding passes
    "causal_sliding_window": (True, _padding_ids, 48),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_interpret_matches_reference(qkv, case):
  causal, ids_fn, window = CASES[case]
  q, k, v = qkv
  seg = ids_fn()
  allowed = _allowed(seg, causal, window)
  real = jnp.asarray(seg > 0)[:, :, None, None]  # padding query rows are unspecified in both paths

  def loss(fn):
    def f(q, k, v):
      o = fn(q, k, v)
      w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))  # non-uniform cotangent
      return jnp.sum(jnp.where(real, o * w, 0.0)), o
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  splash = lambda q, k, v: kernels.splash_attention(
      q, k, v, causal=causal, segment_ids_q=seg, segment_ids_kv=seg, sliding_window=window, interpret=True)
  (_, out), grads = loss(splash)(q, k, v)
  (_, ref), ref_grads = loss(lambda q, k, v: _reference(q, k, v, allowed))(q, k, v)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=2e-5, rtol=2e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=2e-4, rtol=2e-4)


def test_splash_under_mesh_uses_shard_map(qkv):
  """8 fake devices, batch over fsdp and heads over tensor: the kernel runs per shard, same numbers."""
  q, k, v = qkv
  seg = _padding_ids()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
  f = jax.jit(lambda q, k, v: kernels.splash_attention(q, k, v, causal=True, segment_ids_q=seg, interpret=True))
  with jax.set_mesh(mesh):
    out = f(q, k, v)
    text = f.lower(q, k, v).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  real = (seg > 0)[:, :, None, None]
  ref = _reference(q, k, v, _allowed(seg, True))
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=2e-5, rtol=2e-5)


def test_splash_bfloat16_close_to_float32_reference(qkv):
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv)
  seg = _padding_ids()
  out = jax.jit(lambda q, k, v: kernels.splash_attention(q, k, v, causal=True, segment_ids_q=seg,
                                                         interpret=True))(q, k, v)
  assert out.dtype == jnp.bfloat16 and out.shape == (B, T, H, DH)
  ref = _reference(q, k, v, _allowed(seg, True))
  real = (seg > 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, out.astype(np.float32), 0), np.where(real, ref, 0), atol=3e-2)


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 48)])
def test_cudnn_call_plumbing_via_xla_implementation(qkv, causal, window):
  """Our cudnn_attention arguments (lengths for right padding, window convention, GQA) give the reference result;
  on CPU jax's XLA implementation stands in for the cuDNN kernel."""
  q, k, v = qkv
  seg = _padding_ids()
  lengths = seg.sum(-1)
  out = kernels.cudnn_attention(q, k, v, causal=causal, q_lengths=lengths, kv_lengths=lengths,
                                sliding_window=window, implementation="xla")
  ref = _reference(q, k, v, _allowed(seg, causal, window))
  real = (seg > 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_kernel_matches_reference(qkv):
  q, k, v = (x[:, :192].astype(jnp.bfloat16) for x in qkv)
  seg = _padding_ids()[:, :192]
  lengths = seg.sum(-1)
  out = kernels.cudnn_attention(q, k, v, causal=True, q_lengths=lengths, kv_lengths=lengths)
  ref = _reference(q, k, v, _allowed(seg, True))
  real = (seg > 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, out.astype(np.float32), 0), np.where(real, ref, 0), atol=3e-2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_flat_attention_matches_xla_attention(qkv, case):
  """The CPU layout (attention.flat_attention: heads-major dots, additive mask, softmax division after the PV
  product) gives xla_attention's outputs on every row, padding query rows with no visible key included (both give
  them the uniform average), and its gradients through the rows that see a key (a loss reads nothing else: the
  masked select passes no gradient from a row that sees no key, the additive mask does); float32 and bfloat16."""
  from grit_jax.modeling.attention import flat_attention, xla_attention
  causal, ids_fn, window = CASES[case]
  q, k, v = qkv
  mask = _allowed(ids_fn(), causal, window)[:, None]  # [B, 1, T, S]
  sees_key = np.asarray(mask).any(-1)[:, 0, :, None, None]  # [B, T, 1, 1]
  assert not sees_key.all()

  def loss(fn):
    def f(q, k, v):
      o = fn(q, k, v, mask)
      w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))  # non-uniform cotangent
      return jnp.sum(jnp.where(sees_key, o.astype(jnp.float32) * w, 0.0)), o
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (_, out), grads = loss(flat_attention)(q, k, v)
  (_, ref), ref_grads = loss(xla_attention)(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in qkv)
  out16, ref16 = (jax.jit(f)(q16, k16, v16, mask).astype(jnp.float32) for f in (flat_attention, xla_attention))
  np.testing.assert_allclose(out16, ref16, atol=2e-2)


def test_select_impl():
  assert kernels.select_impl("auto", "tpu") == "splash"
  assert kernels.select_impl("auto", "gpu") == "cudnn"
  assert kernels.select_impl("auto", "cpu") == "xla"
  assert kernels.select_impl("auto", "tpu", decode=True) == "xla"
  assert kernels.select_impl("splash", "cpu") == "splash"  # explicit choice kept (interpret mode off TPU)
  assert kernels.select_impl("xla", "tpu") == "xla"
  assert kernels.select_impl("auto") == "xla"  # this host
  with pytest.raises(ValueError, match="attention_impl"):
    kernels.select_impl("flash", "tpu")


# ---------------------------------------------------------------------------------------------------------------
# Through the model: attention_impl="splash" vs "xla" on the same params.

from grit_jax.modeling import Transformer, get_config, init_params  # noqa: E402

@pytest.fixture(scope="module")
def tiny_batch():
  cfg = get_config("tiny_mistral", scan_layers=True, sliding_window=24)
  params = init_params(cfg)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 40)), jnp.int32)
  mask = jnp.asarray(np.arange(40)[None] < np.array([[40], [29]]), jnp.int32)
  return cfg, params, ids, mask


@pytest.mark.parametrize("causal", [True, False])
def test_model_splash_matches_xla(tiny_batch, causal):
  cfg, params, ids, mask = tiny_batch

  def loss_fn(impl):
    model = Transformer(cfg.replace(attention_impl=impl))

    def loss(p):
      out = model.apply({"params": p}, ids, mask, causal=causal, return_logits=False)
      w = mask[:, :, None].astype(jnp.float32)
      return jnp.sum(jnp.sin(out.hidden) * w), out.hidden
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (l_s, h_s), g_s = loss_fn("splash")(params)
  (l_x, h_x), g_x = loss_fn("xla")(params)
  real = np.asarray(mask, bool)[:, :, None]
  np.testing.assert_allclose(np.where(real, h_s, 0), np.where(real, h_x, 0), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_s, l_x, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3), g_s, g_x)


def test_model_decode_with_cache_stays_on_xla(tiny_batch):
  """A cached call (dense mask) takes the xla path even with attention_impl="splash" (the kernel covers T == S)."""
  cfg, params, ids, mask = tiny_batch
  from grit_jax.modeling import KVCache

  outs = []
  for impl in ("splash", "xla"):
    model = Transformer(cfg.replace(attention_impl=impl))
    cache = KVCache.init(cfg, 2, 48)
    out = model.apply({"params": params}, ids, mask, causal=True, cache=cache)
    step = model.apply({"params": params}, ids[:, :1], jnp.ones((2, 1), jnp.int32), causal=True, cache=out.cache)
    outs.append(step.logits)
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
