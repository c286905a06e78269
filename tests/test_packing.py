"""Packed passes (several whole sequences per row, segment ids, restarting positions) against the padded ones:
the same examples give the same loss, metrics and gradients (float32, 1e-5) for bbcc and cccc, every pooling, both
LM loss modes, with GradCache / gradient accumulation and on the (2 data x 4 fsdp) mesh; one packed sequence's
tokens never reach another sequence's representation or loss term; padding gets no attention or pooling weight."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from grit_jax.data import packing
from grit_jax.training import grit_objective
from grit_jax.training import step as step_lib
from test_train_step import B, G, LG, LP, LQ, MODEL, assert_tree_close, loss_cfg, meshes, random_batch, states  # noqa: F401

PAD = 0


def _sequences(batch, name, keys):
  """The unpadded sequences of a padded pass: [{key: 1-D array}] in batch order."""
  mask = batch[f"{name}_mask"]
  return [{k: batch[f"{name}_{k}"][i, :int(mask[i].sum())] for k in keys} for i in range(mask.shape[0])]


def pack_like(batch, units=1, extra_rows=1, row_lens=(2 * LQ, 2 * LP, 2 * LG), chunks=(1, 1)):
  """The packed batch holding exactly the padded batch's sequences (rows: the fewest that fit + extra_rows,
  rounded up to the chunk counts: embedding GradCache chunks, generative micro-batches)."""
  out = {}
  specs = (("query", ("ids", "pool_mask"), row_lens[0], chunks[0]),
           ("passage", ("ids", "pool_mask"), row_lens[1], chunks[0]),
           ("gen", ("ids", "labels"), row_lens[2], chunks[1]))
  for name, keys, row_len, mult in specs:
    if f"{name}_ids" not in batch:
      continue
    seqs = _sequences(batch, name, keys)
    lengths = [len(s["ids"]) for s in seqs]
    rows = packing.rows_needed(lengths, units, row_len) + extra_rows
    rows = -(-rows // mult) * mult
    plan = packing.pack_plan(lengths, units, rows, row_len)
    pad = {"ids": PAD, "pool_mask": 0} if name != "gen" else {"ids": PAD, "labels": -100}
    out.update(packing.pack_sequences(seqs, plan, units, rows, row_len, pad, prefix=f"{name}_"))
  return out


@pytest.fixture(scope="module")
def fns(meshes, states):  # noqa: F811
  """fns(mesh name, batch, cfg, attn, **step options) -> ((loss, metrics), grads) as numpy (compiled once per key)."""
  cache = {}

  def run(name, batch, cfg=None, attn="bbcc", **kw):
    cfg = cfg or loss_cfg()
    shapes = tuple(sorted((k, v.shape) for k, v in batch.items()))
    key = (name, shapes, cfg.to_json(), attn, tuple(sorted(kw.items())))
    if key not in cache:
      mesh, rules = meshes[name]
      cache[key] = step_lib.make_grad_fn(MODEL, cfg, mesh, rules, attn=attn, **kw)
    return jax.tree.map(np.asarray, cache[key](states[name].params, batch))

  return run


def assert_same_step(a, b, keys=("loss", "loss_rep", "accuracy", "loss_gen")):
  (la, ma), ga = a
  (lb, mb), gb = b
  for k in keys:
    if k in mb:
      np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  assert_tree_close(ga, gb)


@pytest.mark.parametrize("attn,pooling", [("bbcc", "mean"), ("bbcc", "weightedmean"), ("bbcc", "lasttoken"),
                                          ("cccc", "mean"), ("cccc", "weightedmean"), ("cccc", "lasttoken")])
def test_packed_step_equals_padded(fns, attn, pooling):
  padded = random_batch(10)
  packed = pack_like(padded)
  assert packed["passage_ids"].shape[1] < B * G  # really packed: fewer rows than sequences
  cfg = loss_cfg(pooling=pooling)
  assert_same_step(fns("mesh1", packed, cfg, attn), fns("mesh1", padded, cfg, attn))


def test_packed_token_mode_and_sub_batches_count_samples(fns):
  """`token` divides by samples and `mixed` sub-batches are groups of samples, never of rows."""
  padded = {k: v for k, v in random_batch(11).items() if k.startswith("gen_")}
  packed = pack_like(padded)
  assert packed["gen_ids"].shape[1] < padded["gen_ids"].shape[0]
  for cfg in (loss_cfg(lm_loss_mode="token", lm_token_factor=0.5), loss_cfg(lm_loss_sub_batches=4)):
    assert_same_step(fns("mesh1", packed, cfg), fns("mesh1", padded, cfg))


@pytest.mark.parametrize("kw", [dict(gradcache_chunk=4), dict(grad_accum=2)], ids=["gradcache", "grad_accum"])
def test_packed_mesh_chunked_equals_padded_single_device(fns, kw):
  """8 devices, one packing unit per device, GradCache row chunks / generative micro-batches of rows."""
  padded = random_batch(12)
  packed = pack_like(padded, units=8, row_lens=(LQ, LP, LG), chunks=(2, 2))
  assert packed["query_ids"].shape[0] == 8
  reference = fns("mesh1", padded)
  assert_same_step(fns("mesh8", packed), reference)
  assert_same_step(fns("mesh8", packed, **kw), reference)


@pytest.fixture(scope="module")
def embed(meshes, states):  # noqa: F811
  mesh, rules = meshes["mesh1"]
  obj = grit_objective.GritObjective(MODEL, loss_cfg(), mesh, rules, "bbcc")
  params = states["mesh1"].params

  @jax.jit
  def reps_and_ce(batch):
    q = obj.embed_packed(params, *(batch[f"passage_{k}"] for k in ("ids", "segment_ids", "positions", "pool_mask")),
                         num_per_unit=batch["passage_lengths"].shape[1], causal=False)
    L = batch["gen_ids"].shape[-1]
    out = obj.model.apply({"params": params}, batch["gen_ids"].reshape(-1, L), None, causal=True,
                          positions=batch["gen_positions"].reshape(-1, L),
                          segment_ids=batch["gen_segment_ids"].reshape(-1, L))
    from grit_jax import objectives
    ce = objectives.token_cross_entropy(out.logits, batch["gen_labels"].reshape(-1, L))  # [rows, L-1]
    return q, ce

  return lambda b: jax.tree.map(np.asarray, reps_and_ce(b))


def test_isolation_positions_and_padding(embed):
  packed = pack_like(random_batch(13), units=2, extra_rows=1)
  seg, pos = packed["passage_segment_ids"], packed["passage_positions"]
  # positions restart at 0 in every sequence; several sequences share a row
  for s in np.unique(seg[seg > 0]):
    np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
  assert max(len(np.unique(r[r > 0])) for r in seg.reshape(-1, seg.shape[-1])) > 1
  reps, ce = embed(packed)

  # Isolation: new tokens in passage 5 and generative sample 3 change only their own representation / CE terms.
  changed = {k: v.copy() for k, v in packed.items()}
  for name, s in (("passage", 5), ("gen", 3)):
    where = changed[f"{name}_segment_ids"] == s + 1
    changed[f"{name}_ids"][where] = (changed[f"{name}_ids"][where] * 7 + 11) % MODEL.vocab_size
  reps2, ce2 = embed(changed)
  moved = np.abs(reps2 - reps).max(-1) > 1e-6
  assert moved[5] and moved.sum() == 1
  g_seg = packed["gen_segment_ids"].reshape(ce.shape[0], -1)[:, 1:]  # the sample of each target token
  diff = np.abs(ce2 - ce) > 1e-6
  assert diff.any() and np.all(g_seg[diff] == 4)

  # Padding: arbitrary ids in the padding slots change nothing (no attention to them, no pooling weight).
  garbage = {k: v.copy() for k, v in packed.items()}
  for name in ("passage", "gen"):
    pad = garbage[f"{name}_segment_ids"] == 0
    assert pad.any()
    garbage[f"{name}_ids"][pad] = np.arange(pad.sum()) % MODEL.vocab_size
  reps3, ce3 = embed(garbage)
  np.testing.assert_allclose(reps3, reps, rtol=1e-6, atol=1e-7)
  real = (packed["gen_segment_ids"].reshape(ce.shape[0], -1)[:, 1:] > 0)
  np.testing.assert_allclose(ce3[real], ce[real], rtol=1e-6, atol=1e-7)


def test_pool_packed_weights_ignore_padding_and_other_sequences():
  from grit_jax import objectives

  rng = np.random.default_rng(0)
  seq = np.array([[0, 0, 0, 1, 1, -1], [2, 2, 3, 3, 3, -1]])  # 2 units x 2 sequences, one padding slot each
  m = np.array([[0, 1, 1, 1, 1, 1], [1, 0, 0, 1, 1, 0]])
  h = rng.normal(size=(2, 6, 3)).astype(np.float32)
  h[:, -1] = 1e6  # padding slot: must get no weight
  for method in objectives.POOLINGS:
    out = np.asarray(objectives.pool_packed(h, m, seq, 2, method))
    for u in range(2):
      for i in range(2):
        own = seq[u] == u * 2 + i
        ref = objectives.pool(h[u][own][None], (m[u] * own)[own][None], method)
        np.testing.assert_allclose(out[u, i], np.asarray(ref)[0], rtol=1e-6, err_msg=method)


def test_pack_plan_fits_or_says_no():
  lengths = [5, 3, 4, 2, 6, 1]
  plan = packing.pack_plan(lengths, units=2, rows=2, row_len=7)
  assert plan is not None
  # every sequence inside its unit's rows, no overlaps
  for u in range(2):
    used = np.zeros([2, 7], int)
    for i in range(u * 3, u * 3 + 3):
      r, c = plan[i]
      used[r, c:c + lengths[i]] += 1
    assert used.max() == 1
  assert packing.pack_plan(lengths, units=2, rows=1, row_len=7) is None
  assert packing.rows_needed(lengths, 2, 7) == 2
  with pytest.raises(Exception, match="do not fit rows"):
    packing.pack_plan([8], 1, 1, 7)


def test_aot_batch_of_a_packed_recipe():
  """`grit-jax aot` builds the packed batch the train iterator would yield (rows derived from the recipe's data) and
  counts the FLOPs of the packed rows."""
  from grit_jax import flops as mfu
  from grit_jax.perf import aot, aot_compile
  from grit_jax import sharding as mesh_lib

  c = aot.parse_args(["--config", "configs/tiny.py", "--topology", "v5e-4", "--config.data.pack_embedding=True",
                      "--config.data.pack_generative=True", "--config.data.query_pack_len=256",
                      "--config.data.passage_pack_len=256", "--config.data.generative_pack_len=256"])[0]
  mesh, _ = mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1))
  layouts = aot_compile.packed_layouts(c, mesh)
  assert set(layouts) == {"query", "passage", "gen"} and all(lay.units == 8 for lay in layouts.values())
  batch = aot_compile.abstract_batch(c.data, step_lib.input_batch_sharding(mesh), layouts)
  p = layouts["passage"]
  assert batch["passage_ids"].shape == (8, p.rows, 256) and batch["passage_lengths"].shape == (8, 4)
  assert "passage_mask" not in batch and 0 < p.expected_efficiency <= 1
  packed = mfu.grit_step_flops_from_config(c, layouts)  # the rows the step computes, not one row per sequence
  assert packed.passage == mfu.grit_step_flops(c.model, passage_batch=8 * p.rows, passage_len=256).passage


def _ladder(levels=3, rows=0, chunks=1, headroom=0.05):
  """Two packed passes of one stream (4 units; 3 'passages' per example) on skewed random lengths, and their ladder."""
  rng = np.random.default_rng(0)
  pool = {"query": [np.minimum(rng.geometric(1 / 30, [500, 1]), 256)],
          "passage": [np.minimum(rng.geometric(1 / 150, [500, 3]), 1024)]}
  lengths = packing.sample_batches(pool, examples=32, seed=0)
  specs = {"query": packing.PassSpec(units=4, num_sequences=32, pack_len=256, rows=0, chunks=chunks),
           "passage": packing.PassSpec(units=4, num_sequences=96, pack_len=1024, rows=rows, chunks=chunks)}
  return pool, lengths, packing.make_layouts(specs, lengths, levels=levels, headroom=headroom)


def _fits(lengths, lay, k):
  rows, length = lay.shapes[k]
  return max(lengths) <= length and packing.pack_plan(lengths, lay.units, rows, length) is not None


def test_ladder_shapes_and_the_level_each_step_takes():
  pool, sampled, layouts = _ladder()
  levels = len(layouts["query"].shapes)
  assert 2 < levels <= 3 + 1 and all(len(lay.shapes) == levels for lay in layouts.values())
  for lay in layouts.values():
    assert lay.shapes[-1] == (lay.per_unit, lay.shapes[-1][1])  # fallback: one sequence per row
    assert all(length % packing.LANES == 0 or length == lay.shapes[-1][1] for _, length in lay.shapes)
    assert abs(sum(lay.use) - 1) < 1e-9 and 0 < lay.expected_efficiency <= 1
  # the top level (the pack lengths, the most rows needed x 1.05) holds every sampled batch
  top = max(range(levels - 1), key=lambda k: layouts["passage"].shapes[k][::-1])  # longest rows, then most
  for name, lay in layouts.items():
    need = max(packing.rows_needed(b, 4, lay.shapes[-1][1]) for b in sampled[name])
    assert lay.shapes[top] == (max(need, int(need * 1.05)), lay.shapes[-1][1])
  # each step takes the cheapest level at which every pass fits: the packed arrays of fresh batches say which
  packer = packing.StepPacker(layouts)
  rng = np.random.default_rng(1)
  pad = {"ids": 0, "pool_mask": 0}
  for _ in range(12):
    idx = rng.integers(0, 500, 32)
    seqs = {"query": [{"ids": np.arange(n) + 1, "pool_mask": np.ones(n)} for n in pool["query"][0][idx, 0]],
            "passage": [{"ids": np.arange(n) + 1, "pool_mask": np.ones(n)} for n in pool["passage"][0][idx].ravel()]}
    out = packer.pack(seqs, {"query": pad, "passage": pad})
    lens = {name: [len(s["ids"]) for s in v] for name, v in seqs.items()}
    fits = [all(_fits(lens[name], lay, k) for name, lay in layouts.items()) for k in range(levels)]
    assert fits[packer.level] and not any(fits[:packer.level])
    for name, lay in layouts.items():
      assert out[f"{name}_ids"].shape == (4, *lay.shapes[packer.level])
      assert sorted(np.unique(out[f"{name}_segment_ids"]))[1:] == list(range(1, len(lens[name]) + 1))
  assert packer.steps == 12 and len(packer.level_steps) == levels
  assert "steps per level" in packer.report()


def test_ladder_of_one_level_chunks_and_rows_set_in_config():
  """pack_levels=1: the derived rows at the pack lengths (most needed x (1 + headroom)) and the fallback; rows
  rounded up to the chunks at every level; rows set in config kept at every packed level."""
  _, sampled, one = _ladder(levels=1, headroom=0.5)
  need = max(packing.rows_needed(b, 4, 1024) for b in sampled["passage"])
  assert one["passage"].shapes == [(int(need * 1.5), 1024), (24, 1024)]
  _, _, chunked = _ladder(chunks=4)
  assert all(r % 4 == 0 for lay in chunked.values() for r, _ in lay.shapes)
  _, _, fixed = _ladder(rows=7)
  assert all(shape == (7, 1024) for shape in fixed["passage"].shapes[:-1]) and not fixed["passage"].derived


def test_fit_decreasing_sets_are_independent_and_tight():
  rng = np.random.default_rng(2)
  lengths = rng.integers(1, 100, [6, 20])
  row, start, used = packing.fit_decreasing(lengths, 128)
  for m in range(6):
    assert used[m] == packing.rows_needed(lengths[m], 1, 128)
    cover = np.zeros([used[m], 128], int)
    for i in range(20):
      cover[row[m, i], start[m, i]:start[m, i] + lengths[m, i]] += 1
    assert cover.max() == 1 and cover.sum() == lengths[m].sum()
