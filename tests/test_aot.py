"""Ahead-of-time compilation of the real train step for TPU slices on this CPU host (needs libtpu: installed by
requirements-test.txt, so a missing one fails here), the MFU accounting, and the remat policies."""
import contextlib
import importlib.util
import io
import math
import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from grit_jax.errors import GritJaxError
from grit_jax import flops
from grit_jax.perf import aot, aot_compile, hlo, topologies

def needs_libtpu(fn):
  """libtpu is a test requirement (requirements-test.txt): without it these tests fail, they are never skipped."""
  assert importlib.util.find_spec("libtpu") is not None, "libtpu missing: pip install -r requirements-test.txt"
  return fn


def _tiny(*overrides):
  return aot.parse_args(["--config", "configs/tiny.py", "--topology", "v5e-4", *overrides])[0]


# ---------------------------------------------------------------------------------------------------------------
# Compiling for TPU slices

@pytest.fixture(scope="module")
def compiled_tiny(tmp_path_factory):
  """The tiny recipe (scanned layers, full remat, attention_impl=auto) compiled for a v5e and a v5p slice of 4 chips
  each; the v5p program's HLO text kept, and what the compiles said on stderr."""
  config = _tiny("--config.model.scan_layers=True", "--config.model.remat_policy=full")
  path = tmp_path_factory.mktemp("aot") / "v5p-8.hlo"
  with contextlib.redirect_stderr(io.StringIO()) as err:
    results = {t: aot_compile.compile_for_topology(config, t, hlo_path=str(path) if t == "v5p-8" else None)
               for t in ("v5e-4", "v5p-8")}
  return config, results, path.read_text(), err.getvalue()


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-4", "v5p-8"])
def test_tiny_recipe_compiles_and_shards_state(compiled_tiny, topology):
  config, results, *_ = compiled_tiny
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
  # FSDP over 4 chips: per step each chip receives 3/4 of the weights for the forward, again for the remat'd
  # backward, and 3/4 of their gradients (gathers as all-gathers or collective-matmul permutes, reductions as
  # reduce-scatters, permutes or all-reduces, as the compiler chooses per weight).
  weight_bytes = 4 * res.param_count  # float32 compute
  assert sum(r["bytes"] for r in res.traffic.values()) >= 3 * 0.75 * weight_bytes
  assert res.traffic["all-gather"]["bytes"] > 0
  # the layer stack's gathers run once per layer and pass: more runs than static ops
  assert res.traffic["all-gather"]["runs"] > res.traffic["all-gather"]["ops"] > 0
  assert res.model_flops == pytest.approx(flops.grit_step_flops_from_config(config).total)
  # executed: remat recomputes the forward (> 4/3 x), and the splash kernels run the tiny lengths (64, 96) padded
  # to 128 with every key block counted, which at d=64 is most of the step (test_executed_flops_counts_the_program
  # checks the count itself)
  assert 1.3 * res.model_flops < res.executed_flops < 3 * res.model_flops
  assert 0 < res.est_mfu <= 1


@needs_libtpu
def test_out_of_memory_recipe_is_reported_not_raised():
  # logits alone: 2048 x 4096 x 1024 float32 = 32 GiB per step, 8 GiB per chip, twice over (grad) > 16 GiB HBM
  config = _tiny("--config.data.mode=generative", "--config.data.generative_batch_size=2048",
                 "--config.data.generative_max_len=4096", "--config.model.max_position_embeddings=4096")
  res = aot_compile.compile_for_topology(config, "v5e-4")
  assert not res.fits
  assert "RESOURCE_EXHAUSTED" in res.error or "memory" in res.error.lower()
  assert "DOES NOT FIT" in aot.format_report(config, res)


def test_compiled_but_over_hbm_does_not_fit():
  # The shape of GritLM-8x7B on v5p-64 (32 chips): the deviceless compile accepted temporaries of 88.69 GiB, but
  # with the 16.31 GiB sharded state the chip would need 105 GiB of its 95.
  gib = 2**30
  res = aot_compile.AotResult(topology="v5p-64", num_chips=32, fits=True, hbm_bytes=95 * gib,
                              argument_bytes=16.31 * gib, output_bytes=16.31 * gib, alias_bytes=16.31 * gib,
                              temp_bytes=88.69 * gib)
  aot_compile.judge_memory(res)
  assert not res.fits and "105.00 GiB per chip > 95.00 GiB" in res.error
  out = aot.format_report(_tiny(), res)
  assert "memory per chip" in out and "RESULT: DOES NOT FIT (compiled, but" in out and "RESULT: FITS" not in out
  ok = aot_compile.AotResult(topology="v5p-64", num_chips=32, fits=True, hbm_bytes=95 * gib,
                             argument_bytes=10 * gib, temp_bytes=84 * gib)
  aot_compile.judge_memory(ok)
  assert ok.fits


@needs_libtpu
def test_auto_attention_compiles_splash_for_tpu(compiled_tiny):
  """attention_impl=auto under the abstract TPU mesh resolves to splash, and the compiled program runs the Pallas
  (Mosaic) kernels: forward and both backward kernels."""
  config, results, text, _ = compiled_tiny
  assert config.model.attention_impl == "auto" and results["v5p-8"].attention_kernel == "splash"
  assert 'custom_call_target="tpu_custom_call"' in text
  for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
    assert kernel in text, kernel
  assert results["v5p-8"].kernel_flops > 0


def _traced_executed_flops(config, topology: str):
  """Executed FLOPs of the recipe's step traced (not compiled) over the topology's abstract mesh, as aot counts them."""
  import flax.linen as nn
  from grit_jax import sharding as mesh_lib

  mesh, rules = mesh_lib.make_mesh(config.mesh, topologies.get_topology(topology).devices())
  step, state, batch = aot_compile.abstract_step(config, aot_compile.model_config_of(config), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return flops.executed_flops(step.trace(state, batch).jaxpr)


@needs_libtpu
def test_routed_moe_compiles_grouped_megablox_for_tpu(tmp_path):
  """moe_impl=ragged (the default) in the real step compiled for a v5p slice: under the abstract TPU mesh the routed
  path picks megablox, whose Mosaic kernels run every expert product of each layer: forward and recompute (gmm),
  dx (gmm) and the weight gradient (tgmm, grouped: no per-expert masked copies of every row fed to a convolution,
  which is what lax.ragged_dot's weight gradient compiles to). Neither a ragged dot nor the CPU path's tile loop is
  left. Executed FLOPs: each token's k=2 of E=4 experts in all four products, about 4/3 x the model FLOPs, well
  below the dense path (every expert in all four)."""
  moe = ["--config.model.num_experts=4", "--config.model.num_experts_per_tok=2",
         "--config.model.router_aux_loss_coef=0.02", "--config.model.scan_layers=True",
         "--config.model.remat_policy=full",
         "--config.model.intermediate_size=2048"]  # experts dominate the step, as in Mixtral
  config = aot.parse_args(["--config", "configs/tiny.py", "--topology", "v5p-8", *moe])[0]
  assert config.model.moe_impl == "ragged"
  path = tmp_path / "moe.hlo"
  res = aot_compile.compile_for_topology(config, "v5p-8", hlo_path=str(path))
  text = path.read_text()
  assert res.fits
  # per pass (query, passage, generative) and layer stack: 3 gmm forward, 3 recompute, 3 dx; 3 tgmm dw [E=4, ...]
  tgmm = re.findall(r"%tgmm[.\d]* = f32\[4,", text)
  assert len(tgmm) == 9 and len(re.findall(r"%gmm[.\d]* = f32", text)) == 27, (len(tgmm),)
  assert "ragged-dot" not in text
  moe_convolutions = [line for line in text.splitlines()
                      if "convolution(" in line and "block_sparse_moe" in line and "block_sparse_moe/gate" not in line]
  assert not moe_convolutions, moe_convolutions[:2]
  assert "block_sparse_moe/shard_map/while" not in text  # the tiled gmm's fori_loop
  ratio = res.executed_flops / res.model_flops
  assert 1.3 < ratio < 1.6, ratio  # the grouped products (remat: 4/3) plus the splash kernels' full key blocks
  dense = _traced_executed_flops(aot.parse_args(["--config", "configs/tiny.py", "--topology", "v5p-8", *moe,
                                                 "--config.model.moe_impl=dense"])[0], "v5p-8")
  assert dense.total > 1.6 * res.executed_flops  # dense: every expert, E/k = 2x the routed expert FLOPs


@needs_libtpu
def test_target_platform_of_a_tpu_topology_mesh():
  from grit_jax.modeling import kernels
  from grit_jax.modeling.platform import target_platform
  from grit_jax import sharding as mesh_lib

  mesh, _ = mesh_lib.make_mesh(dict(fsdp=-1), topologies.get_topology("v5p-8").devices())
  assert target_platform() == "cpu"
  with jax.set_mesh(mesh):
    assert target_platform() == "tpu" and kernels.select_impl("auto") == "splash"


@needs_libtpu
def test_report_names_every_number(compiled_tiny):
  config, results, *_ = compiled_tiny
  out = aot.format_report(config, results["v5p-8"])
  for needle in ("memory per chip", "model FLOPs per step", "executed FLOPs per chip", "attention kernel splash",
                 "collectives per chip per step", "all-gather", "estimated step time", "MFU at most", "RESULT: FITS"):
    assert needle in out


@needs_libtpu
def test_each_stage_is_reported_as_it_goes(compiled_tiny):
  """`grit-jax aot` on a 7B recipe runs for minutes: every stage says when it starts and how long it took."""
  *_, err = compiled_tiny
  lines = [line for line in err.splitlines() if line.startswith("aot v5p-8: ")]
  stages = ("building the abstract state and batch", "tracing and lowering the train step", "compiling for 4 chips",
            "analysing memory, FLOPs and collectives")
  assert len(lines) == 2 * len(stages), err
  for i, stage in enumerate(stages):
    assert lines[2 * i] == f"aot v5p-8: {stage} ..."
    assert re.fullmatch(rf"aot v5p-8: {stage} done in \d+\.\d s \(elapsed \d+\.\d s\)", lines[2 * i + 1])


@needs_libtpu
def test_multislice_only_the_gradient_reduction_crosses_slices():
  """2 x v5p-8, data parallel across slices (config.mesh.dcn_data=-1): FSDP gathers stay inside a slice; what
  crosses the data-center network is the all-reduce of each chip's gradient shard (float32 here: the tiny recipe
  computes in float32; 2 slices: 2 x (2-1)/2 = the shard's bytes, in TPU tiles, which pad the tiny norms), plus the
  loss's batch statistics (the LM token weights of the global batch: a few KiB)."""
  config = _tiny("--config.data.mode=generative", "--config.data.embedding_batch_size=0",
                 "--config.model.hidden_size=128", "--config.model.intermediate_size=256",
                 "--config.model.head_dim=32", "--config.model.vocab_size=1024")
  res = aot_compile.compile_for_topology(config, "v5p-8", num_slices=2)
  assert res.fits and res.num_chips == 8 and res.num_slices == 2
  for kind in ("all-gather", "reduce-scatter"):  # the FSDP traffic
    assert res.traffic[kind]["bytes"] > res.traffic[kind]["cross_slice_bytes"]
  shard_bytes = 4 * res.param_count / 4  # float32 gradient, FSDP over the 4 chips of a slice
  grads = sum(c.bytes_per_chip for c in res.cross_slice if c.kind == "all-reduce")
  other = sum(c.bytes_per_chip for c in res.cross_slice if c.kind != "all-reduce")
  assert shard_bytes <= grads < 2 * shard_bytes, (grads, shard_bytes)
  assert other < 0.05 * grads, [c for c in res.cross_slice if c.kind != "all-reduce"]
  assert "across the 2 slices" in aot.format_report(config, res)


def test_hybrid_mesh_shape():
  from grit_jax import sharding as mesh_lib

  cfg = dict(data=1, fsdp=-1, tensor=1, expert=1, dcn_data=-1, dcn_fsdp=1, dcn_tensor=1, dcn_expert=1)
  assert mesh_lib.hybrid_shape(cfg, 64, 2) == ((1, 32, 1, 1), (2, 1, 1, 1))
  assert mesh_lib.mesh_shape(cfg, 64, 2) == (2, 32, 1, 1)
  assert mesh_lib.hybrid_shape(dict(cfg, dcn_data=1, dcn_fsdp=-1), 64, 2) == ((1, 32, 1, 1), (1, 2, 1, 1))
  assert mesh_lib.hybrid_shape(cfg, 8, 1) == ((1, 8, 1, 1), (1, 1, 1, 1))  # one slice: dcn_data=-1 -> 1
  with pytest.raises(GritJaxError, match="dcn_data=0"):
    mesh_lib.hybrid_shape(dict(cfg, dcn_data=0), 8, 1)
  with pytest.raises(GritJaxError, match="across-slice"):
    mesh_lib.hybrid_shape(dict(cfg, dcn_data=3), 64, 2)
  with pytest.raises(GritJaxError, match="across-slice"):
    mesh_lib.hybrid_shape(dict(cfg, dcn_data=-1, dcn_fsdp=-1), 64, 2)


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


def test_collectives_bytes_per_chip():
  """Hand-worked: a scanned loop of 3 iterations runs its ops 3 times; the TPU's reduce-scatter fusion (an
  all-reduce inside `all-reduce-scatter`) counts as a reduce-scatter; a megascale send is a cross-slice collective."""
  hlo_text = """HloModule m, num_partitions=4

%all-reduce-scatter (input: f32[16]) -> f32[4] {
  %ar = f32[16]{0} all-reduce(f32[16]{0} %input), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[4]{0} dynamic-slice(%ar, %i), dynamic_slice_sizes={4}
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %ag = bf16[16]{0} all-gather(bf16[4]{0} %x), replica_groups=[1,4]<=[4], dimensions={0}
  %cp-start = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%y), source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[4]) tuple(%next, %ds)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[16]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
  %f = f32[4]{0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %g), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, dimensions={0}
  %ar2 = f32[]{:T(128)} all-reduce(%l), replica_groups={}, to_apply=%add
  %send = (f32[64]{0}, u32[], token[]) send(%z, %tok), frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
}
"""
  colls, unknown = hlo.collectives(hlo_text, num_slices=2)
  assert unknown == 0
  got = {(c.kind, c.result): (c.group_size, c.runs, c.bytes_per_chip, c.cross_slice) for c in colls}
  assert got == {
      ("reduce-scatter", "f32[16]"): (4, 1.0, 64 * 3 / 4, False),            # 64 bytes in, 3/4 from the others
      ("all-gather", "bf16[16]"): (4, 3.0, 3 * 32 * 3 / 4, False),           # in the loop: 3 runs
      ("collective-permute", "(f32[8], f32[8], u32[], u32[])"): (2, 3.0, 3 * 32.0, False),
      ("reduce-scatter", "f32[2]"): (2, 1.0, 8.0, False),                     # native: result x (n - 1)
      ("all-reduce", "f32[]"): (4, 1.0, 4 * 2 * 3 / 4, False),               # {} = all 4 devices
      ("all-reduce", "(f32[64], u32[], token[])"): (2, 1.0, 256.0, True),    # 2 slices: 2 x 1/2 x 256 bytes
  }
  table = hlo.summarize(colls)
  assert table["all-reduce"]["cross_slice_bytes"] == 256.0 and table["reduce-scatter"]["ops"] == 2
  # a loop XLA unrolled by 2 (counter + 2, bound 16): 8 runs
  cond = ["%i = u32[] get-tuple-element(%p), index=4", "%c = u32[]{:T(128)} constant(16)",
          "ROOT %lt = pred[] compare(%i, %c), direction=LT"]
  body = ["%i = u32[] get-tuple-element(%p), index=4", "%two = u32[] constant(2)", "%n = u32[] add(%i, %two)",
          "ROOT %t = (f32[4], u32[]) tuple(%a, %b, %c, %d, %n)"]
  assert hlo._trip_count(cond, body) == 8
  # groups over a mesh whose devices are listed in transposed order (a [2, 2] mesh of ids 0 2 / 1 3)
  line = "x all-reduce(%a), replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, to_apply"
  assert hlo._groups(line, 4) == [[0, 2], [1, 3]]


# ---------------------------------------------------------------------------------------------------------------
# MFU accounting (hand-worked numbers)

def test_flops_hand_worked():
  cfg = dict(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
             vocab_size=10, num_experts=0, sliding_window=None)
  # per layer: q 8*8 + k,v 2*8*4 + o 8*8 = 192; mlp 3*8*16 = 384 -> 576 params
  assert flops.matmul_params_per_layer(cfg) == 576
  # bidirectional [1, 4]: dense 2*4*2*576 = 9216; attention 4 * 4 tokens * 2 layers * 4 keys * 2 heads * 4 = 1024
  assert flops.forward_flops(cfg, 1, 4, causal=False, lm_head=False) == 9216 + 1024
  # causal: mean visible keys (1+2+3+4)/4 = 2.5 -> attention 640; LM head 2*4*8*10 = 640
  assert flops.forward_flops(cfg, 1, 4, causal=True, lm_head=True) == 9216 + 640 + 640
  # sliding window 2: keys seen 1,2,2,2 -> mean 1.75 -> attention 448
  assert flops.forward_flops(dict(cfg, sliding_window=2), 1, 4, causal=True, lm_head=False) == 9216 + 448
  f = flops.grit_step_flops(cfg, query_batch=1, query_len=4, passage_batch=2, passage_len=4, gen_batch=1, gen_len=4)
  assert f.query == 3 * (9216 + 1024) and f.passage == 2 * f.query
  assert f.generative == 3 * (9216 + 640 + 640) and f.total == f.embedding + f.generative
  # "cccc": causal embedding passes are cheaper by the masked half of attention
  assert flops.grit_step_flops(cfg, query_batch=1, query_len=4, attn="cccc").query == 3 * (9216 + 640)
  # MoE: router 8*4 + top-2 of 4 experts' MLPs
  moe = dict(cfg, num_experts=4, num_experts_per_tok=2)
  assert flops.matmul_params_per_layer(moe) == 192 + 2 * 384 + 32
  # Qwen3-MoE: the experts' own width (moe_intermediate_size 4: 2 x 3*8*4 = 192), layer 1 dense (576)
  qwen = dict(moe, moe_intermediate_size=4, dense_layers=(1,))
  assert flops.matmul_params_per_layer(qwen) == (192 + 192 + 32 + 576) / 2
  # Gemma: layer 0 sliding (W = 2), layer 1 global. Causal: 1.75 and 2.5 keys -> 224 + 320. Bidirectional: the
  # sliding layer sees |q - k| <= 1 (2, 3, 3, 2 keys: 2.5 -> 320), the global one all 4 (512)
  gemma = dict(cfg, sliding_window=2, layer_types=("sliding_attention", "full_attention"), bidirectional_window=True)
  assert flops.forward_flops(gemma, 1, 4, causal=True, lm_head=False) == 9216 + 224 + 320
  assert flops.forward_flops(gemma, 1, 4, causal=False, lm_head=False) == 9216 + 320 + 512
  assert flops.mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.125)
  # a CPU host's peak follows the compute dtype (bf16 dots run at twice the f32 rate), so a bf16 step's MFU is not
  # read against the f32 figure
  cpu = jax.devices("cpu")
  assert flops.peak_flops(cpu, "bfloat16") == 2 * flops.peak_flops(cpu, "float32") == 2 * 100e9 * os.cpu_count()


def test_executed_flops_of_ragged_dot_and_its_gradients():
  """A routed matmul x [M, K] by groups of w [G, K, N]: each row meets one group, forward 2MKN, and dx (a ragged
  dot with w^T) the same; dw (a ragged-contracting dot into [G, K, N]) XLA:TPU computes as a product masked per
  group over all M rows: 2GMKN (the compiled 8x7B step's cost_analysis agrees, docs/performance.md)."""
  M, K, N, G = 16, 8, 32, 4
  sizes = jnp.array([5, 0, 3, 8], jnp.int32)
  f = lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes))
  args = (jnp.ones((M, K)), jnp.ones((G, K, N)))
  assert flops.executed_flops(jax.make_jaxpr(f)(*args)).total == 2 * M * K * N
  assert flops.executed_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args)).total == (2 + G) * 2 * M * K * N
  assert flops.executed_flops(jax.make_jaxpr(jax.grad(f, argnums=0))(*args)).total == 2 * 2 * M * K * N


def test_flops_7b_recipe_is_about_6ND():
  """Sanity at scale: 7B dense weights dominate, 6 * N * tokens within the attention/LM-head share."""
  config = aot.parse_args(["--config", "configs/gritlm_7b.py", "--topology", "v5p-64"])[0]
  f = flops.grit_step_flops_from_config(config)
  d = config.data
  emb_tokens = d.embedding_batch_size * (d.query_max_len + d.train_group_size * d.passage_max_len)
  gen_tokens = d.generative_batch_size * d.generative_max_len
  n_layers = 32 * flops.matmul_params_per_layer(config.model)  # ~6.98e9 without embeddings
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
  for policy in ("none", "full", "minimal", "save_dots_except_mlp", "save_qkv_gate_up"):
    model = Transformer(base.replace(remat_policy=policy))

    def loss(p, model=model):
      logits = model.apply({"params": p}, ids, mask, causal=True).logits
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    out[policy] = (compiled(params), compiled.memory_analysis().temp_size_in_bytes)
  return out


def test_remat_policies_same_loss_and_grads(remat_runs):
  (l0, g0), _ = remat_runs["none"]
  for policy in ("full", "minimal", "save_dots_except_mlp", "save_qkv_gate_up"):
    (l, g), _ = remat_runs[policy]
    np.testing.assert_allclose(l, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g, g0)


def test_remat_full_saves_activation_memory(remat_runs):
  temp = {p: t for p, (_, t) in remat_runs.items()}
  assert temp["full"] < temp["none"], temp
  assert temp["full"] <= temp["save_dots_except_mlp"] <= temp["none"], temp
  assert temp["full"] <= temp["save_qkv_gate_up"] <= temp["none"], temp
  assert math.isfinite(temp["minimal"])


def test_executed_flops_counts_the_program():
  """Executed FLOPs from the traced step: without remat, a bidirectional embedding step executes the model FLOPs
  plus the contrastive score matmul and the pooling einsum (hand-counted); a scan over layers counts its body once
  per layer (same total as unrolled); full remat adds the recomputed forward."""
  from configs import tiny
  from grit_jax.modeling import ModelConfig
  from grit_jax import sharding as mesh_lib

  config = tiny.get_config()
  d = config.data
  d.mode, d.generative_batch_size, d.embedding_batch_size = "embedding", 0, 4
  mesh, rules = mesh_lib.make_mesh(dict(fsdp=1), jax.devices()[:1])

  def executed(**model):
    model_config = ModelConfig(**dict(config.model.to_dict(), **model))
    step, state, batch = aot_compile.abstract_step(config, model_config, mesh, rules)
    return flops.executed_flops(step.trace(state, batch).jaxpr)

  model = flops.grit_step_flops_from_config(config).total
  q, p, D = d.embedding_batch_size, d.embedding_batch_size * d.train_group_size, config.model.hidden_size
  scores = 3 * 2 * q * p * D  # forward + its two gradient matmuls
  pooling = 2 * 2 * (q * d.query_max_len + p * d.passage_max_len) * D  # mean pooling's einsum and its gradient
  plain = executed(remat_policy="none", scan_layers=False)
  assert plain.total == pytest.approx(model + scores + pooling, rel=1e-9) and plain.unknown_loops == 0
  scanned = executed(remat_policy="none", scan_layers=True)
  assert scanned.total == pytest.approx(plain.total, rel=1e-9)
  # cost_analysis's convention (a loop body once): unrolled it is the total; the 2-layer scan drops one layer
  assert plain.loops_once == plain.total and config.model.num_layers == 2
  assert scanned.loops_once == pytest.approx(plain.total - model / 2, rel=1e-9)
  # Full remat recomputes each layer's forward in the backward, except down_proj: the backward needs its input and
  # the incoming gradient, never its output (jax drops it from the recomputation).
  remat = executed(remat_policy="full", scan_layers=True)
  layers_forward = flops.grit_step_flops_from_config(config).embedding / 3  # no LM head on embedding passes
  tokens = q * d.query_max_len + p * d.passage_max_len
  down_proj = 2 * tokens * config.model.num_layers * D * config.model.intermediate_size
  assert remat.total == pytest.approx(plain.total + layers_forward - down_proj, rel=1e-9)


def test_pack_level_picks_the_compiled_step_shape():
  """A packed recipe compiles one of its step shapes: the most used (typical FLOPs) or the largest packed level
  (the memory every packed step fits in); levels are shared by the passes; the fallback is never compiled."""
  from grit_jax.data.packing import PassLayout
  layouts = {"query": PassLayout("query", 2, 8, [(1, 256), (2, 256), (8, 256)], [0.7, 0.3, 0.0], True, 300.0),
             "passage": PassLayout("passage", 2, 16, [(4, 512), (3, 1024), (16, 1024)], [0.7, 0.3, 0.0], True, 3e3)}
  for level, k in (("primary", 0), ("top", 1), ("0", 0), ("1", 1)):
    out, line = aot_compile.at_pack_level(layouts, level)
    assert {n: (lay.rows, lay.row_len) for n, lay in out.items()} == {n: lay.shapes[k] for n, lay in layouts.items()}
    assert f"level {k} of 2" in line and "fallback" in line
  assert "7168 token slots" in aot_compile.at_pack_level(layouts, "top")[1]  # 2 units x (2 x 256 + 3 x 1024)
  with pytest.raises(GritJaxError, match="levels 0..1"):
    aot_compile.at_pack_level(layouts, "2")
  with pytest.raises(GritJaxError, match="packs no pass"):
    aot_compile.at_pack_level({}, "top")
  assert aot_compile.at_pack_level({}, "primary") == aot_compile.at_pack_level({}, "0") == ({}, "")
  with pytest.raises(GritJaxError, match="--pack_level='big'"):
    aot.parse_args(["--config", "configs/tiny.py", "--topology", "v5e-4", "--pack_level", "big"])


def test_pack_level_all_compiles_every_packed_level(monkeypatch, capsys):
  """--pack_level all: one compile per packed level; the run fits only when every level does (memory is not
  monotonic in token slots: the 8x7B recipe's most used level needs more temporaries than its largest)."""
  seen = []

  def fake_compile(config, topology, num_slices=1, *, hlo_path=None, pack_level="primary"):
    seen.append(pack_level)
    temp = {"0": 10, "1": 99, "2": 20}[pack_level] * 2**30
    return aot_compile.AotResult(topology=topology, num_chips=4, fits=temp < 95 * 2**30, hbm_bytes=95 * 2**30,
                                 temp_bytes=temp, pack_levels=3, error="" if temp < 95 * 2**30 else "too big")

  monkeypatch.setattr(aot, "compile_for_topology", fake_compile)
  monkeypatch.setattr(aot, "format_report", lambda config, res: f"level report {res.temp_bytes >> 30}")
  assert aot.main(["--config", "configs/tiny.py", "--topology", "v5e-4", "--pack_level", "all"]) == 1
  assert seen == ["0", "1", "2"]
  out = capsys.readouterr().out
  assert "RESULT over 3 step shape(s): DOES NOT FIT; largest total per chip 99.00 GiB" in out
