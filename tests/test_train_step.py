"""The sharded GRIT step: state created sharded; the loss and gradients on a (2 data x 4 fsdp) mesh equal one
device's; `gritlm` gradients are 1/W of the exact ones; gradient accumulation and GradCache equal the plain step; a
tiny model learns synthetic retrieval pairs and a repeating LM pattern."""
import numpy as np
import pytest

import jax
import ml_collections  # noqa: E402
import optax  # noqa: E402

from grit_jax.errors import GritJaxError  # noqa: E402
from grit_jax.modeling import get_config  # noqa: E402
from grit_jax import flops as flops_lib  # noqa: E402
from grit_jax import sharding as mesh_lib  # noqa: E402
from grit_jax.training import optimizer as opt_lib  # noqa: E402
from grit_jax.training import state as state_lib  # noqa: E402
from grit_jax.training import grit_objective  # noqa: E402
from grit_jax.training import step as step_lib  # noqa: E402

V, B, G, BG = 128, 8, 2, 8  # vocab, queries, group size, generative rows
LQ, LP, LG = 12, 16, 16
MODEL = get_config("tiny_mistral", vocab_size=V, num_layers=1)


def loss_cfg(**kw):
  base = dict(pooling="mean", normalize=True, temperature=0.05, lambda_rep=1.0, lambda_gen=1.0,
              lm_loss_mode="mixed", lm_loss_sub_batches=1, lm_token_factor=1.0, contrastive_grad="exact",
              matryoshka_dims=(), matryoshka_weights=(), distill_weight=0.0, distill_temperature=1.0)
  return ml_collections.ConfigDict({**base, **kw})


def opt_cfg(**kw):
  base = dict(lr=3e-3, warmup_ratio=0.05, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
  return ml_collections.ConfigDict({**base, **kw})


def _rows(rng, n, length, min_len):
  """ids and right-padded masks with random lengths."""
  lens = rng.integers(min_len, length + 1, n)
  mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)  # [n, L]
  ids = np.where(mask, rng.integers(3, V, (n, length)), 1).astype(np.int32)
  ids[:, 0] = 1  # BOS
  return ids, mask


def random_batch(seed=0):
  rng = np.random.default_rng(seed)
  q_ids, q_mask = _rows(rng, B, LQ, 5)
  p_ids, p_mask = _rows(rng, B * G, LP, 5)
  g_ids, g_mask = _rows(rng, BG, LG, 3)
  pool = lambda m, instr: m * (np.arange(m.shape[1])[None] >= instr)  # instruction tokens not pooled
  labels = np.where(g_mask, g_ids, -100).astype(np.int32)
  labels[:, :3] = -100  # a "user" prefix without loss
  return dict(query_ids=q_ids, query_mask=q_mask, query_pool_mask=pool(q_mask, 2), passage_ids=p_ids,
              passage_mask=p_mask, passage_pool_mask=pool(p_mask, 1), gen_ids=g_ids, gen_mask=g_mask,
              gen_labels=labels)


@pytest.fixture(scope="module")
def meshes():
  mesh8 = mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1))
  mesh1 = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1), devices=jax.devices()[:1])
  return {"mesh8": mesh8, "mesh1": mesh1}


@pytest.fixture(scope="module")
def states(meshes):
  """The same initial params on both meshes (SGD tx: the states are only used for their params here)."""
  tx = optax.sgd(1.0)
  out = {k: state_lib.create_train_state(MODEL, tx, m, r, jax.random.PRNGKey(0)) for k, (m, r) in meshes.items()}
  return out


@pytest.fixture(scope="module")
def grads_of(meshes, states):
  """grads_of(mesh name, batch, **step options) -> ((loss, metrics), grads) as numpy."""
  cache = {}

  def run(name, batch, cfg=None, **kw):
    cfg = cfg or loss_cfg()
    key = (name, tuple(sorted(batch)), cfg.to_json(), tuple(sorted(kw.items())))
    if key not in cache:
      mesh, rules = meshes[name]
      fn = step_lib.make_grad_fn(MODEL, cfg, mesh, rules, attn="bbcc", **kw)
      cache[key] = fn
    out = cache[key](states[name].params, batch)
    return jax.tree.map(np.asarray, out)

  return run


def assert_tree_close(a, b, rtol=1e-5, atol=1e-7):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    scale = max(np.abs(y).max(), 1e-12)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol + rtol * scale)


# --- sharded state -----------------------------------------------------------------------------------------------

def test_state_is_sharded(meshes):
  mesh, rules = meshes["mesh8"]
  tx = opt_lib.make_optimizer(opt_cfg(), 100)
  state = state_lib.create_train_state(MODEL, tx, mesh, rules, jax.random.PRNGKey(0))
  emb = state.params["embed_tokens"]["embedding"]  # [V, D] ("vocab", "embed")
  assert emb.sharding.spec == jax.P(None, "fsdp")
  assert emb.addressable_shards[0].data.shape == (V, MODEL.hidden_size // 4)  # split over fsdp=4
  q = state.params["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [D, H, Dh]
  assert q.sharding.spec == jax.P("fsdp", None, None)
  mu = state.opt_state[1].inner_state[0].mu["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert mu.sharding == q.sharding  # Adam moments follow the params
  # tensor parallelism: heads and mlp split over `tensor`, embed over fsdp
  mesh_tp, rules_tp = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=2, expert=1))
  _, sh = state_lib.state_shardings(MODEL, tx, mesh_tp, rules_tp)
  assert sh.params["layers_0"]["self_attn"]["q_proj"]["kernel"].spec == jax.P("fsdp", "tensor", None)
  assert sh.params["layers_0"]["mlp"]["down_proj"]["kernel"].spec == jax.P("tensor", "fsdp")
  assert sh.params["lm_head"]["kernel"].spec == jax.P("fsdp", "tensor")
  from grit_jax.modeling.model import param_shardings  # inference's: the same, without an optimizer state
  assert param_shardings(MODEL, mesh_tp, rules_tp)[1] == sh.params
  # expert parallelism on Mixtral: experts over `expert`
  mesh_ep, rules_ep = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=1, expert=4))
  _, sh = state_lib.state_shardings(get_config("tiny_mixtral", vocab_size=V), tx, mesh_ep, rules_ep)
  assert sh.params["layers_0"]["block_sparse_moe"]["w1"].spec == jax.P("expert", "fsdp", None)
  assert mesh_lib.num_batch_shards(mesh_ep, rules_ep) == 8


def test_mesh_config_errors():
  with pytest.raises(GritJaxError, match="config.mesh"):
    mesh_lib.make_mesh(dict(data=3, fsdp=-1, tensor=1, expert=1))
  with pytest.raises(GritJaxError, match="config.mesh.fsdp"):
    mesh_lib.make_mesh(dict(data=1, fsdp=0, tensor=1, expert=1))


def test_schedule_warmup_then_linear_decay():
  sched = opt_lib.make_schedule(opt_cfg(lr=1.0, warmup_ratio=0.03), 1253)
  assert opt_lib.warmup_steps(opt_cfg(warmup_ratio=0.03), 1253) == 38  # ceil(37.59), as HF
  np.testing.assert_allclose([float(sched(s)) for s in (0, 19, 38, 1253)], [0.0, 0.5, 1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(float(sched(38 + 1215 // 2)), 1 - (1215 // 2) / 1215, rtol=1e-5)


# --- one device vs the mesh ------------------------------------------------------------------------------------

def test_mesh_loss_and_grads_equal_single_device(grads_of):
  batch = random_batch(0)
  (l1, m1), g1 = grads_of("mesh1", batch)
  (l8, m8), g8 = grads_of("mesh8", batch)
  for k in ("loss", "loss_rep", "loss_gen", "accuracy"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  np.testing.assert_allclose(l1, m1["loss_rep"] + m1["loss_gen"], rtol=1e-6)  # lambdas 1, dense model: no aux
  assert_tree_close(g8, g1)


def test_gritlm_grads_are_one_over_w(grads_of, meshes):
  batch = {k: v for k, v in random_batch(1).items() if not k.startswith("gen_")}  # embedding-only
  W = mesh_lib.num_batch_shards(*meshes["mesh8"])
  assert W == 8  # the batch is split over data (2) x fsdp (4)
  (_, m_exact), g_exact = grads_of("mesh8", batch)
  (_, m_grit), g_grit = grads_of("mesh8", batch, loss_cfg(contrastive_grad="gritlm"))
  np.testing.assert_allclose(m_grit["loss"], m_exact["loss"], rtol=1e-5)  # same value, different gradient
  assert "loss_gen" not in m_grit
  assert_tree_close(g_grit, jax.tree.map(lambda g: g / W, g_exact))


@pytest.mark.parametrize("kw", [dict(grad_accum=2), dict(gradcache_chunk=2)], ids=["grad_accum", "gradcache"])
def test_chunked_equals_plain(grads_of, kw):
  batch = random_batch(2)
  (l_plain, m_plain), g_plain = grads_of("mesh8", batch)
  (l_chunk, m_chunk), g_chunk = grads_of("mesh8", batch, **kw)
  for k in ("loss", "loss_rep", "loss_gen", "accuracy"):
    np.testing.assert_allclose(m_chunk[k], m_plain[k], rtol=1e-5, err_msg=k)
  assert_tree_close(g_chunk, g_plain)


def test_shared_positives_are_masked_plain_and_gradcache(grads_of):
  batch = {k: v for k, v in random_batch(2).items() if not k.startswith("gen_")}
  keyed = dict(batch, pos_key=np.stack([np.arange(B) % 3, np.zeros(B)], 1).astype(np.int32))  # 3 positive texts
  (_, m_plain), g_plain = grads_of("mesh8", keyed)
  (_, m_cache), g_cache = grads_of("mesh8", keyed, gradcache_chunk=2)
  np.testing.assert_allclose(m_cache["loss_rep"], m_plain["loss_rep"], rtol=1e-5)
  assert_tree_close(g_cache, g_plain)
  (_, m_unkeyed), _ = grads_of("mesh8", batch)
  assert m_plain["loss_rep"] < m_unkeyed["loss_rep"] - 1e-4  # fewer negatives: a lower loss


def test_matryoshka_distill_own_group_rows_mesh_and_gradcache(grads_of, meshes):
  """Issue 24's terms in the step: Matryoshka dims + distillation + own-group rows + shared positives give the same
  loss on one device and on the 8-device mesh with GradCache and the gathered (gritlm) loss, whose gradients are
  1/W of the one-device ones (the exact gradient's mesh and GradCache paths share every line with it)."""
  batch = {k: v for k, v in random_batch(4).items() if not k.startswith("gen_")}
  rng = np.random.default_rng(4)
  rows = dict(pos_key=np.stack([np.arange(B) % 3, np.zeros(B)], 1).astype(np.int32),
              no_in_batch_neg=(np.arange(B) % 2).astype(np.int32),
              teacher_scores=np.where((np.arange(B) == 3)[:, None], np.nan, rng.normal(size=(B, G))).astype(np.float32))
  cfg = dict(matryoshka_dims=(16, MODEL.hidden_size), matryoshka_weights=(1.0, 0.5), distill_weight=0.5,
             distill_temperature=0.5)
  full = dict(batch, **rows)
  (_, m1), g1 = grads_of("mesh1", full, loss_cfg(**cfg))
  (_, mg), gg = grads_of("mesh8", full, loss_cfg(contrastive_grad="gritlm", **cfg), gradcache_chunk=2)
  for k in ("loss_rep", "loss_distill", "loss_contrastive", "accuracy"):
    np.testing.assert_allclose(mg[k], m1[k], rtol=1e-5, err_msg=k)
  assert m1["loss_distill"] > 0 and m1["loss_rep"] > m1["loss_contrastive"]
  assert_tree_close(gg, jax.tree.map(lambda g: g / mesh_lib.num_batch_shards(*meshes["mesh8"]), g1))


def test_generative_only_batch_and_token_mode(grads_of):
  full = random_batch(3)
  gen = {k: v for k, v in full.items() if k.startswith("gen_")}
  (loss, m), _ = grads_of("mesh1", gen)
  assert "loss_rep" not in m and "accuracy" not in m
  (_, m_full), _ = grads_of("mesh1", full)
  np.testing.assert_allclose(loss, m_full["loss_gen"], rtol=1e-6)
  # token mode: 0.5 * (sum of CE) / rows; mixed: (sum of CE) / tokens
  (loss_token, _), _ = grads_of("mesh1", gen, loss_cfg(lm_loss_mode="token", lm_token_factor=0.5))
  n_tokens = (full["gen_labels"][:, 1:] != -100).sum()
  np.testing.assert_allclose(loss_token, loss * 0.5 * n_tokens / BG, rtol=1e-5)


def test_bad_attn_and_chunk():
  mesh, rules = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1), devices=jax.devices()[:1])
  with pytest.raises(GritJaxError, match="config.attn"):
    step_lib.make_train_step(MODEL, loss_cfg(), mesh, rules, attn="bbbb")
  with pytest.raises(GritJaxError, match="contrastive_grad"):
    step_lib.make_train_step(MODEL, loss_cfg(contrastive_grad="sum"), mesh, rules)


def test_step_flops_counts_passes():
  f = flops_lib.step_flops(MODEL, {k: v.shape for k, v in random_batch(0).items()})
  D, I, L = MODEL.hidden_size, MODEL.intermediate_size, MODEL.num_layers
  per_tok = 2 * L * (D * 4 * 16 * 2 + 2 * D * 2 * 16 + 3 * D * I)  # q, o, k, v, mlp matmuls (fwd)
  attn_q = 2 * 2 * L * LQ * 4 * 16  # bidirectional: all LQ keys
  np.testing.assert_allclose(f.query, 3 * B * LQ * (per_tok + attn_q), rtol=1e-9)
  head = 2 * D * V
  attn_g = 2 * 2 * L * (LG + 1) / 2 * 4 * 16  # causal: (T + 1) / 2 keys on average
  np.testing.assert_allclose(f.generative, 3 * BG * LG * (per_tok + attn_g + head), rtol=1e-9)
  assert f.total == f.query + f.passage + f.generative


# --- training ----------------------------------------------------------------------------------------------------

def synthetic_batch(rng, n_q=B):
  """Retrieval pairs the untrained model cannot solve: a query is a bag of tokens from [3, 65); its positive is
  the same bag shuffled and mapped t -> t + 62 (so the model must learn which tokens correspond); the hard negative
  is a random bag from [65, 127). Generative rows repeat a period-4 pattern from a random phase."""
  H = 62
  q = rng.integers(3, 3 + H, (n_q, LQ)).astype(np.int32)
  pad = np.ones((n_q, LP - LQ), np.int32)
  pos = np.concatenate([np.stack([rng.permutation(r) for r in q]) + H, pad], 1)  # [n_q, LP] right-padded
  pos_mask = np.concatenate([np.ones((n_q, LQ), np.int32), np.zeros((n_q, LP - LQ), np.int32)], 1)
  neg = rng.integers(3 + H, 3 + 2 * H, (n_q, LP)).astype(np.int32)
  passages = np.stack([pos, neg], 1).reshape(n_q * G, LP)  # each query's positive, then its negative
  p_mask = np.stack([pos_mask, np.ones((n_q, LP), np.int32)], 1).reshape(n_q * G, LP)
  pattern = np.array([10, 20, 30, 40])
  phase = rng.integers(0, 4, BG)
  gen = pattern[(np.arange(LG)[None] + phase[:, None]) % 4].astype(np.int32)
  ones = np.ones_like
  return dict(query_ids=q, query_mask=ones(q), query_pool_mask=ones(q), passage_ids=passages, passage_mask=p_mask,
              passage_pool_mask=p_mask, gen_ids=gen, gen_mask=ones(gen), gen_labels=gen.copy())


def test_tiny_model_learns(meshes):
  mesh, rules = meshes["mesh8"]
  steps = 80
  tx = opt_lib.make_optimizer(opt_cfg(lr=3e-3), steps)
  state = state_lib.create_train_state(MODEL, tx, mesh, rules, jax.random.PRNGKey(1))
  train_step = step_lib.make_train_step(MODEL, loss_cfg(), mesh, rules, attn="bbcc")
  grad_fn = step_lib.make_grad_fn(MODEL, loss_cfg(), mesh, rules, attn="bbcc")
  eval_step = lambda params, batch: grad_fn(params, batch)[0][1]  # the metrics (loss_rep, accuracy, loss_gen)
  rng = np.random.default_rng(0)
  held_out = synthetic_batch(np.random.default_rng(123))
  before = jax.device_get(eval_step(state.params, held_out))
  history = []
  for _ in range(steps):
    state, metrics = train_step(state, synthetic_batch(rng))
    history.append(metrics)
  history = jax.device_get(history)
  after = jax.device_get(eval_step(state.params, held_out))
  assert int(state.step) == steps
  first, last = history[0], history[-1]
  assert set(first) >= {"loss", "loss_rep", "loss_gen", "aux_loss", "accuracy", "grad_norm", "lr", "tokens"}
  assert first["tokens"] == B * LQ + B * LQ + B * LP + BG * LG  # non-padding: queries, positives, negatives, gen
  assert first["lr"] == 0.0 and 0 < history[10]["lr"] <= 3e-3  # warmup from 0
  assert np.isfinite(last["loss"])
  chance = 1 / (B * G)
  assert before["accuracy"] <= 0.25, before
  assert after["loss_rep"] < 0.25 * before["loss_rep"], (before, after)
  assert after["loss_gen"] < 0.25 * before["loss_gen"], (before, after)
  assert after["accuracy"] >= 0.75 > 10 * chance, (before, after)


def test_indivisible_chunks_are_config_errors(meshes, states):
  mesh, rules = meshes["mesh1"]
  batch = random_batch(0)
  obj = grit_objective.GritObjective(MODEL, loss_cfg(lm_loss_sub_batches=3), mesh, rules)
  with pytest.raises(GritJaxError, match="lm_loss_sub_batches"):
    obj.value_and_grad(states["mesh1"].params, batch)
  obj = grit_objective.GritObjective(MODEL, loss_cfg(), mesh, rules)
  with pytest.raises(GritJaxError, match="gradcache_chunk"):
    obj.value_and_grad(states["mesh1"].params, batch, gradcache_chunk=3)
  with pytest.raises(GritJaxError, match="grad_accum"):
    obj.value_and_grad(states["mesh1"].params, batch, grad_accum=3)
