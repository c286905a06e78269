"""Ahead-of-time compilation of the real train step for TPU slices on this CPU host (needs libtpu: installed by
requirements-test.txt, so a missing one fails here), the MFU accounting, and the remat policies."""
import importlib.util
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from grit_jax.errors import GritJaxError
from grit_jax.perf import aot, mfu, topologies

def needs_libtpu(fn):
  """libtpu is a test requirement (requirements-test.txt): without it these tests fail, they are never skipped."""
  assert importlib.util.find_spec("libtpu") is not None, "libtpu missing: pip install -r requirements-test.txt"
  return fn


def _tiny(*overrides):
  return aot.parse_args(["--config", "configs/tiny.py", "--topology", "v5e-4", *overrides])[0]


# ---------------------------------------------------------------------------------------------------------------
# Compiling for TPU slices

@pytest.fixture(scope="module")
def compiled_tiny():
  """The tiny recipe (scanned layers, full remat) compiled for a v5e and a v5p slice of 4 chips each."""
  config = _tiny("--config.model.scan_layers=True", "--config.model.remat_policy=full")
  return config, {t: aot.compile_for_topology(config, t) for t in ("v5e-4", "v5p-8")}


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-4", "v5p-8"])
def test_tiny_recipe_compiles_and_shards_state(compiled_tiny, topology):
  config, results = compiled_tiny
  res = results[topology]
  assert res.fits and res.num_chips == 4
  # FSDP over 4 chips: each holds a quarter of params + Adam moments (3 x float32 per param) and of the batch.
  state_bytes = 3 * 4 * res.param_count
  d = config.data
  batch_ints = 3 * (d.embedding_batch_size * d.query_max_len
                    + d.embedding_batch_size * d.train_group_size * d.passage_max_len
                    + d.generative_batch_size * d.generative_max_len)
  unsharded = state_bytes + 4 * batch_ints
  # TPU layouts pad small minor dims to 128-lane tiles, so a shard of the tiny model is up to ~2x its raw size;
  # unsharded it would be 4x.
  assert unsharded / 4 <= res.argument_bytes < unsharded / 2, (res.argument_bytes, unsharded)
  assert res.alias_bytes > 0.9 * state_bytes / 4  # the state is donated: updated in place
  assert 0 < res.total_bytes < res.hbm_bytes
  # FSDP: weights all-gathered, gradients reduce-scattered (or all-reduced then sliced) across the 4 chips
  assert res.collectives["all-gather"] > 0
  assert res.collectives["reduce-scatter"] + res.collectives["all-reduce"] > 0
  assert res.model_flops == pytest.approx(mfu.grit_step_flops_from_config(config).total)
  assert 0 < res.est_mfu <= 1


@needs_libtpu
def test_out_of_memory_recipe_is_reported_not_raised():
  # logits alone: 2048 x 4096 x 1024 float32 = 32 GiB per step, 8 GiB per chip, twice over (grad) > 16 GiB HBM
  config = _tiny("--config.data.mode=generative", "--config.data.generative_batch_size=2048",
                 "--config.data.generative_max_len=4096", "--config.model.max_position_embeddings=4096")
  res = aot.compile_for_topology(config, "v5e-4")
  assert not res.fits
  assert "RESOURCE_EXHAUSTED" in res.error or "memory" in res.error.lower()
  assert "DOES NOT FIT" in aot.format_report(config, res)


def test_compiled_but_over_hbm_does_not_fit():
  # The shape of GritLM-8x7B on v5p-64 (32 chips): the deviceless compile accepted temporaries of 88.69 GiB, but
  # with the 16.31 GiB sharded state the chip would need 105 GiB of its 95.
  gib = 2**30
  res = aot.AotResult(topology="v5p-64", num_chips=32, fits=True, hbm_bytes=95 * gib, argument_bytes=16.31 * gib,
                      output_bytes=16.31 * gib, alias_bytes=16.31 * gib, temp_bytes=88.69 * gib)
  aot.judge_memory(res)
  assert not res.fits and "105.00 GiB per chip > 95.00 GiB" in res.error
  out = aot.format_report(_tiny(), res)
  assert "memory per chip" in out and "RESULT: DOES NOT FIT (compiled, but" in out and "RESULT: FITS" not in out
  ok = aot.AotResult(topology="v5p-64", num_chips=32, fits=True, hbm_bytes=95 * gib, argument_bytes=10 * gib,
                     temp_bytes=84 * gib)
  aot.judge_memory(ok)
  assert ok.fits


@needs_libtpu
def test_report_names_every_number(compiled_tiny):
  config, results = compiled_tiny
  out = aot.format_report(config, results["v5p-8"])
  for needle in ("memory per chip", "model FLOPs per step", "collectives", "all-gather", "estimated step time",
                 "MFU at most", "RESULT: FITS"):
    assert needle in out


def test_bad_arguments_name_the_flag():
  with pytest.raises(GritJaxError, match="unknown TPU slice"):
    topologies.get_topology("v5p-7")
  with pytest.raises(GritJaxError, match="--topology is required"):
    aot.parse_args(["--config", "configs/tiny.py"])
  with pytest.raises(GritJaxError, match="no such file"):
    aot.parse_args(["--config", "configs/nope.py", "--topology", "v5e-4"])
  with pytest.raises(GritJaxError):
    aot.parse_args(["--config", "configs/tiny.py", "--topology", "v5e-4", "--config.model.remat_polcy=full"])


def test_topology_table_follows_slice_naming():
  # v5p/v4 names count TensorCores (2 per chip), v5e/v6e names count chips
  assert topologies.get_topology("v5p-64").num_chips == 32
  assert topologies.get_topology("v5p-512").num_chips == 256
  assert topologies.get_topology("v5e-256").num_chips == 256
  assert topologies.get_topology("v5p-128").topology_name == "v5:4x4x4"


@needs_libtpu
def test_topology_devices():
  devs = topologies.get_topology("v5p-128").devices()
  assert len(devs) == 64 and devs[0].platform == "tpu"


def test_count_collectives():
  hlo = """
  %all-gather-start.1 = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %p), replica_groups={}
  %all-gather-done.1 = f32[16]{0} all-gather-done(%all-gather-start.1)
  %rs = f32[4]{0} reduce-scatter(f32[16]{0} %g), dimensions={0}
  %ar.2 = f32[] all-reduce(f32[] %x), to_apply=%add
  %cp = f32[4]{0} collective-permute(f32[4]{0} %y), source_target_pairs={{0,1}}
  %fusion = f32[4]{0} fusion(f32[4]{0} %all-gather.9), kind=kLoop
  """
  assert aot.count_collectives(hlo) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
                                        "collective-permute": 1}


# ---------------------------------------------------------------------------------------------------------------
# MFU accounting (hand-worked numbers)

def test_flops_hand_worked():
  cfg = dict(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
             vocab_size=10, num_experts=0, sliding_window=None)
  # per layer: q 8*8 + k,v 2*8*4 + o 8*8 = 192; mlp 3*8*16 = 384 -> 576 params
  assert mfu.matmul_params_per_layer(cfg) == 576
  # bidirectional [1, 4]: dense 2*4*2*576 = 9216; attention 4 * 4 tokens * 2 layers * 4 keys * 2 heads * 4 = 1024
  assert mfu.forward_flops(cfg, 1, 4, causal=False, lm_head=False) == 9216 + 1024
  # causal: mean visible keys (1+2+3+4)/4 = 2.5 -> attention 640; LM head 2*4*8*10 = 640
  assert mfu.forward_flops(cfg, 1, 4, causal=True, lm_head=True) == 9216 + 640 + 640
  # sliding window 2: keys seen 1,2,2,2 -> mean 1.75 -> attention 448
  assert mfu.forward_flops(dict(cfg, sliding_window=2), 1, 4, causal=True, lm_head=False) == 9216 + 448
  f = mfu.grit_step_flops(cfg, query_batch=1, query_len=4, passage_batch=2, passage_len=4, gen_batch=1, gen_len=4)
  assert f.query == 3 * (9216 + 1024) and f.passage == 2 * f.query
  assert f.generative == 3 * (9216 + 640 + 640) and f.total == f.embedding + f.generative
  # "cccc": causal embedding passes are cheaper by the masked half of attention
  assert mfu.grit_step_flops(cfg, query_batch=1, query_len=4, attn="cccc").query == 3 * (9216 + 640)
  # MoE: router 8*4 + top-2 of 4 experts' MLPs
  moe = dict(cfg, num_experts=4, num_experts_per_tok=2)
  assert mfu.matmul_params_per_layer(moe) == 192 + 2 * 384 + 32
  assert mfu.mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.125)


def test_flops_7b_recipe_is_about_6ND():
  """Sanity at scale: 7B dense weights dominate, 6 * N * tokens within the attention/LM-head share."""
  config = aot.parse_args(["--config", "configs/gritlm_7b.py", "--topology", "v5p-64"])[0]
  f = mfu.grit_step_flops_from_config(config)
  d = config.data
  emb_tokens = d.embedding_batch_size * (d.query_max_len + d.train_group_size * d.passage_max_len)
  gen_tokens = d.generative_batch_size * d.generative_max_len
  n_layers = 32 * mfu.matmul_params_per_layer(config.model)  # ~6.98e9 without embeddings
  assert 6.9e9 < n_layers < 7.0e9
  assert f.embedding == pytest.approx(6 * n_layers * emb_tokens, rel=0.15)
  assert f.generative == pytest.approx(6 * (n_layers + 4096 * 32000) * gen_tokens, rel=0.15)


# ---------------------------------------------------------------------------------------------------------------
# Remat policies on the scanned layer stack

@pytest.fixture(scope="module")
def remat_runs():
  from grit_jax.modeling import Transformer, get_config, init_params

  base = get_config("tiny_mistral", scan_layers=True, num_layers=4)
  params = init_params(base)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, base.vocab_size, (4, 64)), jnp.int32)
  mask = jnp.ones_like(ids)
  out = {}
  for policy in ("none", "full", "minimal", "save_dots_except_mlp"):
    model = Transformer(base.replace(remat_policy=policy))

    def loss(p, model=model):
      logits = model.apply({"params": p}, ids, mask, causal=True).logits
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    out[policy] = (compiled(params), compiled.memory_analysis().temp_size_in_bytes)
  return out


def test_remat_policies_same_loss_and_grads(remat_runs):
  (l0, g0), _ = remat_runs["none"]
  for policy in ("full", "minimal", "save_dots_except_mlp"):
    (l, g), _ = remat_runs[policy]
    np.testing.assert_allclose(l, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g, g0)


def test_remat_full_saves_activation_memory(remat_runs):
  temp = {p: t for p, (_, t) in remat_runs.items()}
  assert temp["full"] < temp["none"], temp
  assert temp["full"] <= temp["save_dots_except_mlp"] <= temp["none"], temp
  assert math.isfinite(temp["minimal"])
