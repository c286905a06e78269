"""Routed MoE (moe_impl="ragged") equals the dense reference (every expert on every token) in float32: forward,
gradients w.r.t. parameters and inputs, load-balancing statistics and aux loss; with padding tokens, every token on
one expert, an expert that gets no token; both grouped-matmul backends; under scan + remat; 8-device meshes."""
import re

import flax.linen as nn
import numpy as np
import pytest

import jax
import jax.numpy as jnp  # noqa: E402

from grit_jax.errors import GritJaxError  # noqa: E402
from grit_jax.modeling import ModelConfig, Transformer, get_config  # noqa: E402
from grit_jax.modeling.layers import SparseMoe  # noqa: E402
from grit_jax.modeling.moe import (_megablox_row_tile, _row_tile, dense_experts, routed_experts,  # noqa: E402
                                   select_gmm_impl)
from grit_jax.modeling.model import scan_params  # noqa: E402
from grit_jax import sharding as mesh_lib  # noqa: E402

TOL = 1e-5
E, D, I = 4, 32, 48
CFG = get_config("tiny_mixtral", hidden_size=D, intermediate_size=I, num_experts=E, num_layers=2, vocab_size=128)


def _close(got, ref, tol=TOL):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), np.abs(a - b).max()


def _routing(case, B, T, rng):
  """(top_i [B, T, k], top_w [B, T, k]) for a routing case."""
  if case == "one_expert":  # k = 1, every token on expert 2
    return np.full((B, T, 1), 2, np.int32), np.ones((B, T, 1), np.float32)
  logits = rng.randn(B, T, E)
  if case == "idle_expert":  # expert 1 never in anyone's top 2
    logits[..., 1] = -1e9
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
  top_w, top_i = jax.lax.top_k(probs, 2)
  return np.asarray(top_i), np.asarray(top_w / top_w.sum(-1, keepdims=True))


@pytest.mark.parametrize("gmm", ["tiled", "ragged_dot", "megablox"])
@pytest.mark.parametrize("case", ["random", "one_expert", "idle_expert"])
def test_routed_experts_equal_dense(gmm, case):
  rng = np.random.RandomState(0)
  B, T = 2, 80
  top_i, top_w = _routing(case, B, T, rng)
  counts = np.bincount(top_i.ravel(), minlength=E)
  if case == "idle_expert":
    assert counts[1] == 0 and counts.sum() == B * T * 2
  if case == "one_expert":  # the one expert spans several tiles
    assert counts[2] == B * T and _row_tile(B * T, E) < B * T and _megablox_row_tile(B * T, E) < B * T
  else:  # megablox: 2 * B * T = 320 rows in 3 tiles of 128: groups cross tile edges, 64 rows of padding
    assert _megablox_row_tile(2 * B * T, E) == 128
  x = jnp.asarray(rng.randn(B, T, D), jnp.float32)
  w1, w3 = (jnp.asarray(0.2 * rng.randn(E, D, I), jnp.float32) for _ in range(2))
  w2 = jnp.asarray(0.2 * rng.randn(E, I, D), jnp.float32)
  probe = jnp.asarray(rng.randn(B, T, D), jnp.float32)

  def loss(experts, x, top_w, w1, w3, w2):
    y = experts(x, jnp.asarray(top_i), top_w, w1, w3, w2)
    return jnp.sum(y * probe), y

  grad = lambda experts: jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)(
      experts, x, jnp.asarray(top_w), w1, w3, w2)
  (g_ref, y_ref) = grad(dense_experts)
  (g_got, y_got) = grad(lambda *a: routed_experts(*a, gmm=gmm))
  assert np.abs(np.asarray(y_ref)).max() > 0.5  # O(1) outputs: the tolerance means something
  _close(y_got, y_ref)
  _close(g_got, g_ref)  # d/dx, d/dtop_w, d/dw1, d/dw3, d/dw2
  if case == "idle_expert":
    assert np.abs(np.asarray(g_got[2][1])).max() == 0  # the idle expert gets no gradient


def test_gmm_backend_follows_platform():
  assert (select_gmm_impl("cpu"), select_gmm_impl("tpu"), select_gmm_impl("gpu")) == ("tiled", "megablox",
                                                                                     "ragged_dot")
  assert _row_tile(2, 8) == 8 and _row_tile(8192, 8) == 128  # decode-sized tiles, full-width ones for training
  assert _megablox_row_tile(2, 8) == 128 and _megablox_row_tile(16384, 8) == 512  # Mixtral on v5p-128: 512


@pytest.fixture(scope="module")
def layer_case():
  """SparseMoe params, input [4, 12, D] and a token mask with padding."""
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(4, 12, D), jnp.float32)
  mask = jnp.asarray(np.arange(12)[None, :] < np.array([12, 5, 9, 1])[:, None], jnp.int32)
  params = nn.meta.unbox(SparseMoe(CFG).init(jax.random.PRNGKey(0), x, mask)["params"])
  params = jax.tree.map(lambda p: p * 5.0, params)  # std 0.1: a router that prefers, O(1) outputs
  return params, x, mask


def _layer_value_and_grad(cfg, params, x, mask):
  layer = SparseMoe(cfg)

  def loss(p, x):
    y, stats = layer.apply({"params": p}, x, mask)
    return jnp.sum(jnp.sin(y) * mask[..., None]), (y, stats)

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, stats, grads


def test_sparse_moe_layer_routed_equals_dense_with_padding(layer_case):
  params, x, mask = layer_case
  y0, s0, g0 = _layer_value_and_grad(CFG.replace(moe_impl="dense"), params, x, mask)
  y1, s1, g1 = _layer_value_and_grad(CFG, params, x, mask)
  assert CFG.moe_impl == "ragged"  # the default
  assert np.abs(np.asarray(y0)).max() > 0.1
  _close(y1, y0)
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s0))  # statistics: same router, same numbers
  assert float(s0[0].sum()) == 2 * int(mask.sum())  # counts are over real tokens only
  _close(g1, g0)  # w.r.t. gate, w1, w2, w3 and the input


def test_model_routed_scanned_remat_on_8_devices_equals_dense_with_padding():
  """Whole model: logits, aux loss and parameter gradients; routed under nn.scan + full remat on the 2 x 4 FSDP test
  mesh (params sharded, batch split) vs dense on one device."""
  cfg = CFG
  ids = jnp.asarray(np.random.RandomState(2).randint(3, 128, size=(8, 10)), jnp.int32)
  mask = jnp.asarray(np.arange(10)[None, :] < np.array([10, 4, 7, 1, 10, 9, 2, 6])[:, None], jnp.int32)
  params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), ids, mask)["params"])
  params = jax.tree.map(lambda p: p * 3.0, params)

  def run(c, p):
    def loss(p):
      out = Transformer(c).apply({"params": p}, ids, mask, causal=True)
      return jnp.sum(out.logits * mask[..., None]) * 1e-2 + out.aux_loss, out

    (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return out.logits, out.aux_loss, g

  l0, a0, g0 = run(cfg.replace(moe_impl="dense"), params)
  scanned = cfg.replace(scan_layers=True, remat_policy="full")
  mesh, rules = mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1))
  boxed = jax.eval_shape(Transformer(scanned).init, jax.random.PRNGKey(0), ids, mask)["params"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    p8 = jax.device_put(scan_params(params, cfg.num_layers),
                        nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))
    l1, a1, g1 = run(scanned, p8)
  _close(l1, l0)
  assert float(a0) > 1.0 and abs(float(a1) - float(a0)) <= TOL
  _close(g1, scan_params(g0, cfg.num_layers))


@pytest.mark.parametrize("axes", [dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2), dict(fsdp=2, expert=4)])
def test_routed_layer_on_8_devices_equals_one_device(layer_case, axes):
  """FSDP (the test mesh), FSDP + tensor (mlp split, partial outputs summed) and an expert axis (tokens split over
  it, experts whole inside the layer): the same outputs and gradients as without a mesh."""
  params, x, mask = layer_case
  x8, mask8 = jnp.concatenate([x, x[::-1]]), jnp.concatenate([mask, mask[::-1]])  # B = 8 splits over 8 devices
  y1, s1, g1 = _layer_value_and_grad(CFG, params, x8, mask8)
  mesh, rules = mesh_lib.make_mesh({**dict(data=1, fsdp=1, tensor=1, expert=1), **axes})
  layer = SparseMoe(CFG)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x8, mask8)["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    p8 = jax.device_put(params, shardings)
    batch = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length", "embed")))
    y8, s8, g8 = _layer_value_and_grad(CFG, p8, jax.device_put(x8, batch), mask8)
    jaxpr = str(jax.make_jaxpr(lambda p, x: SparseMoe(CFG).apply({"params": p}, x, mask8))(p8, x8))
  # Routing is local: the expert sort runs inside the shard_map on each shard's B*T*k / W assignments.
  sorted_sizes = re.findall(r"\w+:i32\[(\d+)\] \w+:i32\[\d+\] = sort\[", jaxpr)
  assert "shard_map" in jaxpr and sorted_sizes == [str(8 * 12 * 2 // mesh_lib.num_batch_shards(mesh, rules))]
  assert p8["w1"].sharding.spec == jax.P(*nn.logical_to_mesh_axes(("exp", "embed", "mlp"), rules))
  assert len(p8["w1"].sharding.device_set) == 8 and not p8["w1"].sharding.is_fully_replicated
  _close(y8, y1)
  _close(s8, s1)
  _close(g8, g1)


def test_moe_impl_is_validated():
  with pytest.raises(GritJaxError, match="moe_impl='sorted'"):
    ModelConfig(num_experts=8, moe_impl="sorted")


@pytest.mark.slow
def test_megablox_backend_compiles_for_tpu_with_local_routing():
  """The TPU backend compiled for a v5p-8 slice on this host, forward + backward under FSDP: the default picks
  megablox under the TPU mesh, whose gmm / tgmm Mosaic kernels do every product (3 x 3: forward, dx, dw), with no
  ragged dot and no convolution (XLA:TPU's masked weight gradient of lax.ragged_dot); the executed FLOPs are the
  grouped ones (3 products x 3 matmuls x 2 M D I, M = B*T*k rows), the ragged dot's dw is E x its share; fewer
  temporaries than the dense reference."""
  from grit_jax import flops
  from grit_jax.perf import topologies
  devices = topologies.get_topology("v5p-8").devices(1)
  mesh, rules = mesh_lib.make_mesh(dict(data=1, fsdp=-1, tensor=1, expert=1), devices)
  B, T, D_, I_, E_ = 8, 256, 256, 896, 8
  shard = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert select_gmm_impl() == "megablox"
    tok = nn.logical_to_mesh_axes(("batch", "length", None))
    args = (jax.ShapeDtypeStruct((B, T, D_), jnp.bfloat16, sharding=shard(tok)),
            jax.ShapeDtypeStruct((B, T, 2), jnp.int32, sharding=shard(tok)),
            jax.ShapeDtypeStruct((B, T, 2), jnp.float32, sharding=shard(tok)),
            *(jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=shard(nn.logical_to_mesh_axes(a)))
              for s, a in (((E_, D_, I_), ("exp", "embed", "mlp")), ((E_, D_, I_), ("exp", "embed", "mlp")),
                           ((E_, I_, D_), ("exp", "mlp", "embed")))))

    def compiled(experts):
      def loss(x, top_i, top_w, *w):
        return jnp.sum(experts(x, top_i, top_w, *w).astype(jnp.float32) ** 2)
      step = jax.jit(jax.grad(loss, argnums=(0, 3, 4, 5)))
      return step.lower(*args).compile(), flops.executed_flops(step.trace(*args).jaxpr)

    (routed, counted), (ragged, ragged_counted) = compiled(routed_experts), compiled(
        lambda *a: routed_experts(*a, gmm="ragged_dot"))
    dense, _ = compiled(dense_experts)
  text = routed.as_text()
  assert len(re.findall(r"%tgmm[.\d]* = bf16\[8,", text)) == 3 and len(re.findall(r"%gmm[.\d]* = bf16", text)) == 6
  assert "ragged-dot" not in text and "convolution(" not in text
  assert "convolution(" in ragged.as_text()  # what megablox replaces: the ragged dot's masked dw
  grouped = 3 * 3 * 2 * (B * T * 2) * D_ * I_
  assert grouped <= counted.total < 1.001 * grouped and counted.uncounted_kernels == 0
  assert ragged_counted.total == pytest.approx(grouped * (2 + E_) / 3, rel=1e-3)
  cost = routed.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] * 4 == pytest.approx(counted.total, rel=0.01)  # XLA costs the kernels by their estimate
  assert routed.memory_analysis().temp_size_in_bytes < dense.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("gmm", ["tiled", "ragged_dot", "megablox"])
def test_routed_experts_bfloat16_close_to_dense(gmm):
  """bf16 compute: the routed path (float32 accumulation in the tiled matmuls) stays within bf16 rounding of the
  dense one, for the output and the weight gradient."""
  rng = np.random.RandomState(3)
  top_i, top_w = _routing("random", 2, 16, rng)
  x = jnp.asarray(rng.randn(2, 16, D), jnp.bfloat16)
  w1, w3 = (jnp.asarray(0.2 * rng.randn(E, D, I), jnp.bfloat16) for _ in range(2))
  w2 = jnp.asarray(0.2 * rng.randn(E, I, D), jnp.bfloat16)
  run = lambda experts: jax.jit(jax.value_and_grad(
      lambda w1: jnp.sum(experts(x, jnp.asarray(top_i), jnp.asarray(top_w), w1, w3, w2).astype(jnp.float32) ** 2)))(w1)
  (l0, g0), (l1, g1) = run(dense_experts), run(lambda *a: routed_experts(*a, gmm=gmm))
  assert g1.dtype == jnp.bfloat16 and abs(float(l1) - float(l0)) <= 2e-2 * abs(float(l0))
  g0, g1 = np.asarray(g0, np.float32), np.asarray(g1, np.float32)
  assert np.abs(g1 - g0).max() <= 3e-2 * np.abs(g0).max()


@pytest.mark.parametrize("transposed", [False, True])
def test_executed_flops_count_megablox_products_by_routed_rows(transposed):
  """grit_jax.flops counts the megablox kernels (which XLA's cost_analysis only sees through their estimate) from the
  routed shapes: forward, dx and dw each 2 x R x K x N, R = rows padded to the row tile, whatever the routing."""
  from grit_jax import flops
  from grit_jax.modeling.moe import _megablox_gmm
  R, K, N = 256, 32, 48
  sizes = jnp.array([100, 0, 56, 100], jnp.int32)
  f = lambda x, w: jnp.sum(_megablox_gmm(x, w, sizes, 128, transposed))
  args = (jnp.ones((R, K)), jnp.ones((E, N, K) if transposed else (E, K, N)))
  got = flops.executed_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args))
  assert got.total == 3 * 2 * R * K * N and got.uncounted_kernels == 0
  assert flops.executed_flops(jax.make_jaxpr(f)(*args)).total == 2 * R * K * N
