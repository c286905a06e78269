"""The GRIT objectives with hand-worked numbers (grit_reference.md section 10) and the cross-device contrastive loss:
one device vs a (2 data x 4 fsdp) mesh, `exact` vs `gritlm` gradients."""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from grit_jax import objectives  # noqa: E402
from grit_jax import sharding as mesh_lib  # noqa: E402


# --- pooling ----------------------------------------------------------------------------------------------------

def _pool_case():
  h = jnp.array([[[1.0], [2.0], [3.0], [4.0]]])  # [B=1, T=4, D=1]
  attention = np.array([1, 1, 1, 0])
  pool_mask = attention.copy()
  pool_mask[:1] = 0  # instruction length 1 (BOS) excluded
  return h, jnp.asarray(pool_mask[None])


@pytest.mark.parametrize("method, expected", [("mean", 2.5), ("weightedmean", 8.0 / 3.0), ("lasttoken", 3.0)])
def test_pool_hand_worked(method, expected):
  h, m = _pool_case()
  out = objectives.pool(h, m, method=method)
  assert out.dtype == jnp.float32 and out.shape == (1, 1)
  np.testing.assert_allclose(float(out[0, 0]), expected, rtol=1e-6)


def test_pool_bf16_input_is_float32_and_normalize():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.bfloat16)
  m = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1]])
  out = objectives.pool(h, m, "mean", normalize=True)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, rtol=1e-6)
  h32 = np.asarray(h, np.float32)
  mean1 = h32[0, 1:4].mean(0)
  np.testing.assert_allclose(np.asarray(out[0]), mean1 / np.linalg.norm(mean1), rtol=1e-5)


def test_pool_padding_invariant():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 6, 3)).astype(np.float32)
  m = np.array([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
  for method in objectives.POOLINGS:
    a = objectives.pool(jnp.asarray(h), jnp.asarray(m), method)
    b = objectives.pool(jnp.asarray(np.concatenate([h, rng.normal(size=(2, 3, 3))], 1)),
                        jnp.asarray(np.pad(m, ((0, 0), (0, 3)))), method)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# --- contrastive ----------------------------------------------------------------------------------------------

Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
PS = np.array([[0.8, 0.6], [0.6, 0.8], [0.6, 0.8], [1.0, 0.0]], np.float32)


def test_contrastive_hand_worked():
  # logits = q p^T / 0.02 = [[40, 30, 30, 50], [30, 40, 40, 0]], targets [0, 2]
  row0 = -40 + 50 + math.log(math.exp(-10) + math.exp(-20) + math.exp(-20) + 1.0)
  row1 = -40 + 40 + math.log(math.exp(-10) + 1.0 + 1.0 + math.exp(-40))
  np.testing.assert_allclose([row0, row1], [10.0000454, 0.6931699], rtol=1e-6)
  loss, acc = objectives.contrastive_loss(jnp.asarray(Q), jnp.asarray(PS), temperature=0.02, group_size=2,
                                          return_accuracy=True)
  np.testing.assert_allclose(float(loss), (row0 + row1) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(loss), 5.3466076, rtol=1e-6)
  # row 0's argmax is column 3 (50 > 40): wrong; row 1 ties 40/40 at columns 1, 2 -> argmax 1: wrong
  assert float(acc) == 0.0
  logits = objectives.contrastive_logits(jnp.asarray(Q), jnp.asarray(PS), 0.02)
  np.testing.assert_allclose(np.asarray(logits), [[40, 30, 30, 50], [30, 40, 40, 0]], rtol=1e-5)


def test_contrastive_masks_a_shared_positive_hand_worked():
  # Three queries, g=1, dot products at temperature 1: logits = q p^T = [[2, 0, 1], [0, 3, 1], [1, 1, 4]].
  # Queries 0 and 1 have the same positive text (equal pos_key): column 1 is not a negative of row 0, nor column 0
  # of row 1; row 2 keeps every candidate.
  q = jnp.eye(3, dtype=jnp.float32)
  p = jnp.asarray([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]])  # p_j . e_i = p[j, i]; symmetric here
  key = jnp.asarray([[7, 1], [7, 1], [7, 2]], jnp.int32)
  row0 = math.log(1 + math.exp(1 - 2))                      # candidates {2, 1}: -log(e^2 / (e^2 + e^1))
  row1 = math.log(1 + math.exp(1 - 3))                      # candidates {3, 1}
  row2 = math.log(1 + 2 * math.exp(1 - 4))                  # candidates {1, 1, 4}
  np.testing.assert_allclose([row0, row1, row2], [0.3132617, 0.1269280, 0.0949230], rtol=1e-6)
  loss = objectives.contrastive_loss(q, p, 1.0, 1, normalize=False, pos_key=key)
  np.testing.assert_allclose(float(loss), (row0 + row1 + row2) / 3, rtol=1e-6)
  plain = objectives.contrastive_loss(q, p, 1.0, 1, normalize=False)  # unmasked: row 0 also weighs e^0
  np.testing.assert_allclose(float(plain), (math.log(1 + math.exp(-2) + math.exp(-1)) + math.log(
      1 + math.exp(-3) + math.exp(-2)) + row2) / 3, rtol=1e-6)
  # g=2: only the other query's positive column is masked, never a hard negative; gradients stay finite
  mask = objectives.false_negative_mask(key, 2)
  assert np.asarray(mask).tolist() == [[False, False, True, False, False, False],
                                       [True, False, False, False, False, False],
                                       [False] * 6]
  q3 = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  grads = jax.grad(lambda a: objectives.contrastive_loss(a, jnp.asarray(PS[:2].repeat(3, 0)[:6]), 0.05, 2,
                                                         pos_key=key))(q3)
  assert np.isfinite(np.asarray(grads)).all()


def test_contrastive_is_cosine_and_counts_accuracy():
  # scaling a vector does not change a cosine loss; a correct ranking gives accuracy 1
  q = np.array([[3.0, 0.0], [0.0, 0.5]], np.float32)
  p = np.array([[2.0, 0.1], [1.0, -1.0], [0.1, 4.0], [1.0, 1.0]], np.float32)
  l1, a1 = objectives.contrastive_loss(jnp.asarray(q), jnp.asarray(p), 0.1, 2, return_accuracy=True)
  l2 = objectives.contrastive_loss(jnp.asarray(q / 7), jnp.asarray(p * 3), 0.1, 2)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  assert float(a1) == 1.0
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  pn = p / np.linalg.norm(p, axis=1, keepdims=True)
  s = qn @ pn.T / 0.1
  ce = [np.log(np.exp(s[i]).sum()) - s[i, 2 * i] for i in range(2)]
  np.testing.assert_allclose(float(l1), np.mean(ce), rtol=1e-5)


# --- LM loss ----------------------------------------------------------------------------------------------------

def _lm_case():
  """Two rows whose per-token CE is exactly [1, 1, 1] and [4]: logits that give CE c to the target are
  [c + log(V - 1) + ..., ...]; simpler: 2-way vocab with logit gap chosen so that CE = c."""
  V = 2
  # CE of target 0 with logits [0, x] = log(1 + e^x); choose x = log(e^c - 1)
  def logits_for(c):
    return [0.0, math.log(math.exp(c) - 1.0)]
  T = 4
  logits = np.zeros((2, T, V), np.float32)
  labels = np.full((2, T), -100, np.int32)
  for t in range(3):  # row 0: targets at positions 1..3, predicted from positions 0..2
    logits[0, t] = logits_for(1.0)
    labels[0, t + 1] = 0
  logits[1, 0] = logits_for(4.0)
  labels[1, 1] = 0
  return jnp.asarray(logits), jnp.asarray(labels)


def test_lm_loss_hand_worked():
  logits, labels = _lm_case()
  ce = objectives.token_cross_entropy(logits, labels)
  np.testing.assert_allclose(np.asarray(ce), [[1, 1, 1], [4, 0, 0]], rtol=1e-5)
  np.testing.assert_allclose(float(objectives.lm_loss(logits, labels, "mixed")), 7 / 4, rtol=1e-5)  # 1.75
  np.testing.assert_allclose(float(objectives.lm_loss(logits, labels, "token")), 7 / 2, rtol=1e-5)  # 3.5
  np.testing.assert_allclose(float(objectives.lm_loss(logits, labels, "token", token_factor=0.003)), 0.0105,
                             rtol=1e-5)
  # two sub-batches of one row each: mean(3/3, 4/1) = 2.5 (the per-sample mean)
  np.testing.assert_allclose(float(objectives.lm_loss(logits, labels, "mixed", num_sub_batches=2)), 2.5, rtol=1e-5)


def test_lm_loss_equal_lengths_token_is_length_times_mixed():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(4, 6, 11)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 11, (4, 6)), jnp.int32)
  mixed = float(objectives.lm_loss(logits, labels, "mixed"))
  token = float(objectives.lm_loss(logits, labels, "token"))
  np.testing.assert_allclose(token, 5 * mixed, rtol=1e-5)  # L = 5 targets per row after the shift
  # mixed over 4 one-row sub-batches = per-sample mean = mixed when lengths are equal
  np.testing.assert_allclose(float(objectives.lm_loss(logits, labels, "mixed", 4)), mixed, rtol=1e-5)


def test_grit_loss_combination():
  total = objectives.grit_loss(jnp.float32(2.0), jnp.float32(3.0), jnp.float32(5.0), lambda_rep=0.5,
                               lambda_gen=0.003, router_aux_coef=0.02)
  np.testing.assert_allclose(float(total), 0.5 * 2 + 0.003 * 3 + 0.02 * 5, rtol=1e-6)
  assert float(objectives.grit_loss(None, jnp.float32(3.0))) == 3.0
  assert float(objectives.grit_loss(jnp.float32(2.0), None, jnp.float32(5.0))) == 2.0  # no coef: no aux


# --- across the mesh ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh_and_reps():
  mesh, rules = mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1))
  rng = np.random.default_rng(0)
  B, g, D = 16, 2, 8
  q = rng.normal(size=(B, D)).astype(np.float32)
  p = (np.repeat(q, g, axis=0) + 0.7 * rng.normal(size=(B * g, D))).astype(np.float32)
  return mesh, rules, q, p


def _sharded(mesh, x):
  return jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))


def test_gathered_loss_equals_single_device(mesh_and_reps):
  mesh, rules, q, p = mesh_and_reps
  ref_loss, ref_acc = objectives.contrastive_loss(jnp.asarray(q), jnp.asarray(p), 0.05, 2, return_accuracy=True)
  axes = mesh_lib.batch_axes(mesh, rules)
  assert mesh_lib.num_batch_shards(mesh, rules) == 8
  for grad in ("exact", "gritlm"):
    fn = jax.jit(lambda a, b, grad=grad: objectives.gathered_contrastive_loss(a, b, mesh, axes, 0.05, 2, grad=grad))
    loss, acc = fn(_sharded(mesh, q), _sharded(mesh, p))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(acc), float(ref_acc), rtol=1e-6)
  # the global-view (GSPMD) loss on sharded arrays equals it too
  glob = jax.jit(lambda a, b: objectives.contrastive_loss(a, b, 0.05, 2))(_sharded(mesh, q), _sharded(mesh, p))
  np.testing.assert_allclose(float(glob), float(ref_loss), rtol=1e-5)


def test_gathered_gradients_exact_and_gritlm(mesh_and_reps):
  mesh, rules, q, p = mesh_and_reps
  axes = mesh_lib.batch_axes(mesh, rules)
  W = mesh_lib.num_batch_shards(mesh, rules)
  ref = jax.grad(lambda a, b: objectives.contrastive_loss(a, b, 0.05, 2), argnums=(0, 1))(jnp.asarray(q),
                                                                                          jnp.asarray(p))

  def grads(grad):
    f = lambda a, b: objectives.gathered_contrastive_loss(a, b, mesh, axes, 0.05, 2, grad=grad)[0]
    return jax.jit(jax.grad(f, argnums=(0, 1)))(_sharded(mesh, q), _sharded(mesh, p))

  for got, want in zip(grads("exact"), ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  for got, want in zip(grads("gritlm"), ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want) / W, rtol=1e-5, atol=1e-7)
  # and the GSPMD global-view gradient is the exact one
  g_glob = jax.jit(jax.grad(lambda a, b: objectives.contrastive_loss(a, b, 0.05, 2), argnums=(0, 1)))(
      _sharded(mesh, q), _sharded(mesh, p))
  for got, want in zip(g_glob, ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_gathered_loss_masks_shared_positives_like_single_device(mesh_and_reps):
  mesh, rules, q, p = mesh_and_reps
  key = np.stack([np.arange(16) % 5, np.zeros(16)], axis=1).astype(np.int32)  # 16 queries, 5 positive texts
  ref = objectives.contrastive_loss(jnp.asarray(q), jnp.asarray(p), 0.05, 2, pos_key=jnp.asarray(key))
  assert abs(float(ref) - float(objectives.contrastive_loss(jnp.asarray(q), jnp.asarray(p), 0.05, 2))) > 1e-3
  axes = mesh_lib.batch_axes(mesh, rules)
  for grad in ("exact", "gritlm"):
    loss, _ = jax.jit(lambda a, b, k, grad=grad: objectives.gathered_contrastive_loss(
        a, b, mesh, axes, 0.05, 2, grad=grad, pos_key=k))(_sharded(mesh, q), _sharded(mesh, p), _sharded(mesh, key))
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)


def test_gathered_single_shard_is_local_loss():
  # W = 1: the gathered loss is the local loss (nothing to gather)
  mesh, rules = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1), devices=jax.devices()[:1])
  loss, _ = objectives.gathered_contrastive_loss(jnp.asarray(Q), jnp.asarray(PS), mesh,
                                                 mesh_lib.batch_axes(mesh, rules), 0.02, 2)
  np.testing.assert_allclose(float(loss), 5.3466076, rtol=1e-6)


# --- issue 24: own-group rows, distillation, Matryoshka dims ------------------------------------------------------

def test_distill_loss_hand_worked():
  # Row 0: teacher scores (2 ln 3, 0) at teacher temperature 2 -> teacher (3/4, 1/4); student logits (0, 0) ->
  # (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2). Row 1 has no scores (NaN): left out of the mean.
  scores = jnp.array([[2 * math.log(3.0), 0.0], [jnp.nan, jnp.nan]])
  student = jnp.zeros((2, 2))
  want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812
  np.testing.assert_allclose(float(objectives.distill_loss(student, scores, 2.0)), want, rtol=1e-6)
  # the student matching the teacher scores 0; no row with scores gives 0, not NaN
  assert abs(float(objectives.distill_loss(jnp.array([[math.log(3.0), 0.0]]), scores[:1], 2.0))) < 1e-7
  assert float(objectives.distill_loss(student, jnp.full((2, 2), jnp.nan))) == 0.0


def _two_queries():
  # q0 = e0, q1 = e1; passages: q0's positive e0, its negative 0, q1's positive e1, its negative 0 (dot, T = 1):
  # row 0 logits (1, 0, 0, 0), row 1 (0, 0, 1, 0): each row's CE = ln(e + 3) - 1.
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  p = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
  return q, p


def test_no_in_batch_negatives_hand_worked():
  q, p = _two_queries()
  full = math.log(math.e + 3) - 1
  own = math.log(math.e + 1) - 1  # row 0 flagged: its candidates are its own positive and negative only
  got = objectives.contrastive_loss(q, p, 1.0, 2, normalize=False, no_in_batch_neg=jnp.array([1, 0]))
  np.testing.assert_allclose(float(got), (own + full) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(objectives.contrastive_loss(q, p, 1.0, 2, normalize=False)), full, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(objectives.own_group_mask(jnp.array([1, 0]), 2)),
                                [[0, 0, 1, 1], [0, 0, 0, 0]])


def test_representation_loss_distill_hand_worked():
  q, p = _two_queries()
  # Own-group student logits of row 0: (1, 0) -> (e, 1) / (e + 1); teacher (ln 3, 0) -> (3/4, 1/4). Row 1: no scores.
  s0 = math.e / (math.e + 1)
  kl = 0.75 * math.log(0.75 / s0) + 0.25 * math.log(0.25 / (1 - s0))
  scores = jnp.array([[math.log(3.0), 0.0], [jnp.nan, jnp.nan]])
  out = objectives.representation_loss(q, p, 1.0, 2, normalize=False, distill_weight=0.5, teacher_scores=scores)
  np.testing.assert_allclose(float(out["contrastive"]), math.log(math.e + 3) - 1, rtol=1e-6)
  np.testing.assert_allclose(float(out["distill"]), kl, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), math.log(math.e + 3) - 1 + 0.5 * kl, rtol=1e-6)
  assert float(out["accuracy"]) == 1.0


def test_matryoshka_loss_hand_worked():
  # q0 = p0 = (3, 4), q1 = p1 = (4, -3) (g = 1, T = 1, cosine). Prefix 1: every vector normalises to (1): all logits
  # 1, CE ln 2 per row. Full size: cos(q_i, p_i) = 1, cos(q0, p1) = 0: CE ln(e + 1) - 1. Weights (1, 0.5).
  q = jnp.array([[3.0, 4.0], [4.0, -3.0]])
  out = objectives.representation_loss(q, q, 1.0, 1, dims=(1, 2), dim_weights=(1.0, 0.5))
  want = math.log(2.0) + 0.5 * (math.log(math.e + 1) - 1)
  np.testing.assert_allclose(float(out["loss"]), want, rtol=1e-6)
  # no dims = the plain contrastive loss over the full size
  np.testing.assert_allclose(float(objectives.representation_loss(q, q, 1.0, 1)["loss"]),
                             float(objectives.contrastive_loss(q, q, 1.0, 1)), rtol=1e-7)
  with pytest.raises(ValueError, match="dims"):
    objectives.representation_loss(q, q, 1.0, 1, dims=(1, 3))
