"""FLOP accounting, below training/ (the train log's MFU) and perf/ (`grit-jax aot`), which both use it.

Two counts, for two questions:
- Model FLOPs (`grit_step_flops`, `step_flops`): what MFU divides by. Counted as the usual convention does (PaLM
  appendix B, MaxText): matmul FLOPs only (2 per multiply-add), a training step = 3x the forward (backward = 2x),
  recomputation (remat, GradCache's extra no-grad forward) NOT counted -- it is overhead that MFU is meant to
  expose. Attention score/value products count only the key positions a query may see: all T for bidirectional
  passes, (T + 1) / 2 on average for causal ones (fewer with a sliding window). Padded shapes are counted (the
  accelerator computes them). Embedding passes skip the LM head; the generative pass pays it. MoE layers count the
  router and `num_experts_per_tok` experts per token.
- Executed FLOPs (`executed_flops`): what the program really computes, counted from the traced step's matmuls
  (dot_general, ragged_dot, Pallas kernels) with every loop and recomputation multiplied out: scanned layers x
  num_layers, remat's recomputed forward, GradCache's extra forward, all E experts of a dense MoE, the masked half
  of a causal score matrix. The routed MoE's grouped matmuls on TPU (megablox gmm for the forward and dx, tgmm for
  dw: grit_jax.modeling.moe) are counted from the routed shapes through the kernels' cost estimate, 2 x rows x in
  x out per product, rows = the shard's B*T*k assignments rounded up to the kernel's row tile. What the roofline
  needs; XLA's cost_analysis cannot say it (it counts a loop body once, and a Pallas kernel only by its cost
  estimate: megablox's, not splash's, which has none).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

from grit_jax import common_types as ct

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)


def _get(cfg, name, default=None):
  return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _mean_visible_keys(length: int, causal: bool, sliding_window: int | None) -> float:
  """Average number of key positions one query attends to in a length-`length` self-attention. Causal with a
  window W: the last W positions; bidirectional with a window W (Gemma's sliding layers): |q - k| <= W."""
  if sliding_window is None:
    return float(length) if not causal else (length + 1) / 2
  w = min(sliding_window, length)
  if causal:  # query i sees min(i + 1, w) keys
    return (w * (w + 1) / 2 + (length - w) * w) / length
  return sum(min(i + w, length - 1) - max(i - w, 0) + 1 for i in range(length)) / length


def _layers(cfg) -> list[tuple[bool, bool]]:
  """(sliding, moe) of each layer, as ModelConfig.layer_is_sliding / layer_is_moe decide (configs as dicts too)."""
  n, types = _get(cfg, "num_layers"), tuple(_get(cfg, "layer_types", ()) or ())
  experts, dense = _get(cfg, "num_experts", 0) or 0, set(_get(cfg, "dense_layers", ()) or ())
  window = _get(cfg, "sliding_window", None)
  return [(types[i] == "sliding_attention" if types else window is not None, bool(experts) and i not in dense)
          for i in range(n)]


def _layer_params(cfg, moe: bool) -> int:
  d, h, kvh, dh = (_get(cfg, n) for n in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"))
  attn = d * h * dh + 2 * d * kvh * dh + h * dh * d
  if moe:  # chosen experts (their own width: Qwen3-MoE's moe_intermediate_size) + router
    width = _get(cfg, "moe_intermediate_size", None) or _get(cfg, "intermediate_size")
    return attn + _get(cfg, "num_experts_per_tok") * 3 * d * width + d * _get(cfg, "num_experts")
  return attn + 3 * d * _get(cfg, "intermediate_size")


def matmul_params_per_layer(cfg) -> int:
  """Parameters of one decoder layer that take part in a per-token matmul (norms excluded; the mean over the
  layers where dense and MoE layers mix)."""
  layers = _layers(cfg)
  return round(sum(_layer_params(cfg, moe) for _, moe in layers) / len(layers))


def forward_flops(cfg, batch: int, length: int, *, causal: bool, lm_head: bool) -> float:
  """FLOPs of one forward pass over [batch, length] tokens, layer by layer (sliding layers see their window:
  causally W keys back, bidirectionally |q - k| <= W // 2 where the model keeps it, bidirectional_window)."""
  tokens = batch * length
  window = _get(cfg, "sliding_window", None)
  bidir_window = window // 2 if window and _get(cfg, "bidirectional_window", False) else None
  total = 0.0
  for sliding, moe in _layers(cfg):
    w = (window if causal else bidir_window) if sliding else None
    # QK^T and PV: 2 products x 2 FLOPs x keys x heads x head_dim per query token and layer
    keys = _mean_visible_keys(length, causal, w)
    total += 2 * tokens * _layer_params(cfg, moe) + 2 * 2 * tokens * keys * _get(cfg, "num_heads") * \
        _get(cfg, "head_dim")
  head = 2 * tokens * _get(cfg, "hidden_size") * _get(cfg, "vocab_size") if lm_head else 0
  return float(total + head)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Model FLOPs of one training step, by pass."""
  query: float        # bidirectional embedding pass over the queries
  passage: float      # bidirectional embedding pass over positives + hard negatives
  generative: float   # causal pass with the LM head

  @property
  def embedding(self) -> float:
    return self.query + self.passage

  @property
  def total(self) -> float:
    return self.query + self.passage + self.generative


def grit_step_flops(model_cfg, *, query_batch: int = 0, query_len: int = 0, passage_batch: int = 0,
                    passage_len: int = 0, gen_batch: int = 0, gen_len: int = 0,
                    attn: str | ct.AttnMode = "bbcc") -> StepFlops:
  """Training FLOPs of one GRIT step (global batch). `attn` as config.attn (common_types.parse_attn; GritLM:
  "bbcc"), or parsed."""
  m = TRAIN_MULTIPLIER
  mode = ct.parse_attn(attn)
  return StepFlops(
      query=m * forward_flops(model_cfg, query_batch, query_len, causal=mode.query_causal, lm_head=False)
      if query_batch else 0.0,
      passage=m * forward_flops(model_cfg, passage_batch, passage_len, causal=mode.passage_causal, lm_head=False)
      if passage_batch else 0.0,
      generative=m * forward_flops(model_cfg, gen_batch, gen_len, causal=True, lm_head=True)
      if gen_batch else 0.0,
  )


def grit_step_flops_from_config(config, layouts: dict | None = None) -> StepFlops:
  """Same, for a full recipe ConfigDict (config.model, config.data, config.attn). `layouts`: the packed passes'
  shapes ({pass: grit_jax.data.packing.PassLayout}): a packed pass computes its rows (U * R rows of L tokens,
  attention over the whole row) instead of one padded row per sequence."""
  d = config.data
  emb, gen = ct.passes(d.mode)
  shape = {ct.QUERY: (d.embedding_batch_size if emb else 0, d.query_max_len),
           ct.PASSAGE: (d.embedding_batch_size * d.train_group_size if emb else 0, d.passage_max_len),
           ct.GEN: (d.generative_batch_size if gen else 0, d.generative_max_len)}
  for name, lay in (layouts or {}).items():
    shape[name] = (lay.units * lay.rows, lay.row_len)
  return grit_step_flops(
      config.model, query_batch=shape[ct.QUERY][0], query_len=shape[ct.QUERY][1],
      passage_batch=shape[ct.PASSAGE][0], passage_len=shape[ct.PASSAGE][1], gen_batch=shape[ct.GEN][0],
      gen_len=shape[ct.GEN][1], attn=config.attn)


def mfu(flops_per_step: float, step_seconds: float, num_chips: int, peak_flops_per_chip: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak of all chips."""
  return flops_per_step / (step_seconds * num_chips * peak_flops_per_chip)


# Dense bf16 peak FLOP/s per chip of each TPU generation (Cloud TPU system-architecture pages; grit_jax.perf.topologies
# builds its chip table from it). v4/v5p chips are whole (megacore) chips, as their jax devices are.
TPU_PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
# The same per jax device, by device_kind prefix.
_DEVICE_PEAKS = (
    ("TPU v5p", TPU_PEAK_BF16_FLOPS["v5p"]), ("TPU v5 lite", TPU_PEAK_BF16_FLOPS["v5e"]),
    ("TPU v5e", TPU_PEAK_BF16_FLOPS["v5e"]), ("TPU v6", TPU_PEAK_BF16_FLOPS["v6e"]),
    ("TPU v4", TPU_PEAK_BF16_FLOPS["v4"]),
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
)
# A CPU host has no datasheet number; a jitted matmul's rate per core on the reference machine, by compute dtype
# (AVX-512: ~100 GFLOP/s in float32, ~50% of the FMA peak; AVX512_BF16 dots twice that), makes MFU on a laptop
# comparable between runs, not between machines. Accelerators are rated at their bf16 peak, as MFU usually is.
_CPU_FLOPS_PER_CORE = {"float32": 100e9, "bfloat16": 200e9}


def peak_flops(devices, dtype: str) -> float:
  """Summed peak FLOP/s of `devices` (jax devices of this process; for the train log's MFU) computing in `dtype`
  (ModelConfig.dtype); NaN if unknown."""
  if devices[0].platform == "cpu":
    import jax

    return _CPU_FLOPS_PER_CORE[str(dtype)] * (os.cpu_count() or 1) * jax.process_count()
  for prefix, flops in _DEVICE_PEAKS:
    if devices[0].device_kind.startswith(prefix):
      return flops * len(devices)
  return float("nan")


def step_flops(model_config, batch_shapes: Mapping[str, tuple], attn: str | ct.AttnMode = "bbcc") -> StepFlops:
  """StepFlops(query, passage, generative; .embedding, .total) of one step on a global batch whose arrays have
  these shapes (a batch dict of arrays works too: anything with .shape, or plain shape tuples)."""
  shape = lambda k: tuple(getattr(batch_shapes[k], "shape", batch_shapes[k])) if k in batch_shapes else (0, 0)
  (qb, ql), (pb, pl), (gb, gl) = (shape(ct.key(name, ct.IDS)) for name in ct.PASSES)
  return grit_step_flops(model_config, query_batch=qb, query_len=ql, passage_batch=pb, passage_len=pl,
                         gen_batch=gb, gen_len=gl, attn=attn)


def num_params(params) -> int:
  """Number of parameters in a param pytree (arrays or ShapeDtypeStructs)."""
  import jax

  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------------------------
# Executed FLOPs of a traced program

# Pallas attention kernels carry no cost of their own: FLOPs per (query x key x head_dim) element of each kernel,
# counted as its matmuls (forward: QK^T, PV; dq: QK^T again, dO V^T, dS K; dkv: QK^T, P^T dO, dO V^T, dS^T Q). The
# kernels skip key blocks their mask hides, which this count does not see: a causal pass is counted over all T x S.
_ATTENTION_KERNEL_PRODUCTS = (("_dkv", 4), ("_dq", 3), ("_fwd", 2))


@dataclasses.dataclass
class ExecutedFlops:
  """Matmul FLOPs one call of a program executes (all devices together)."""
  total: float = 0.0
  kernels: float = 0.0          # part of total in Pallas attention kernels (counted over every key block)
  loops_once: float = 0.0       # total with every loop body counted once: XLA cost_analysis's convention, which
                                # MaxText prints (compares programs whose layer loop is one scan, kernels included)
  unknown_loops: int = 0        # while loops of unknown trip count, counted once (0 for the train step)
  uncounted_kernels: int = 0    # Pallas kernels with neither a cost estimate nor an attention signature

  def per_chip(self, num_chips: int) -> float:
    return self.total / num_chips


def _dot_general_flops(eqn) -> float:
  lhs = eqn.invars[0].aval.shape
  (contract, _), _ = eqn.params["dimension_numbers"]
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)


def _ragged_dot_flops(eqn) -> float:
  """A ragged dot with ragged rows (forward lhs [M, K] x groups [G, K, N] -> [M, N], and dx): each row meets one
  group, 2 x |lhs| x the rhs dims neither contracted, batch nor group. With the ragged dimension contracted (the
  weight gradient, x [M, K] x dy [M, N] -> dw [G, K, N]) XLA:TPU (libtpu 0.0.42.1) does not group the rows: it
  compiles a product of [G, M, K] and [G, M, N] copies masked to each group's rows (a convolution over G), every
  group over all M rows, so it executes 2 x G x M x K x N, G times what the grouping needs; counted as executed
  (the reason the routed MoE runs megablox's grouped kernels on TPU)."""
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  numbers = eqn.params.get("ragged_dot_dimension_numbers")
  if numbers is None:  # ragged_dot: lhs [M, K] x rhs [G, K, N]
    return 2.0 * math.prod(lhs) * rhs[-1]
  (lhs_contract, rhs_contract), (_, rhs_batch) = numbers.dot_dimension_numbers
  bound = set(rhs_contract) | set(rhs_batch) | set(numbers.rhs_group_dimensions)
  flops = 2.0 * math.prod(lhs) * math.prod(n for d, n in enumerate(rhs) if d not in bound)
  if set(numbers.lhs_ragged_dimensions) & set(lhs_contract):
    flops *= eqn.invars[2].aval.shape[0]  # group_sizes [G]: the masked product over every group
  return flops


def _pallas_flops(eqn, acc: ExecutedFlops) -> float:
  estimate = eqn.params.get("cost_estimate")
  if estimate is not None and getattr(estimate, "flops", 0):
    return float(estimate.flops)
  name = str(eqn.params.get("name") or getattr(eqn.params.get("name_and_src_info"), "name", ""))
  arrays = [v.aval for v in eqn.invars if getattr(v.aval, "ndim", 0) >= 3 and "float" in str(v.aval.dtype)]
  for tag, products in _ATTENTION_KERNEL_PRODUCTS:
    if tag in name and len(arrays) >= 2:
      q, k = arrays[0].shape, arrays[1].shape  # [..., H, T, Dh], [..., KVH, S, Dh]
      flops = 2.0 * products * math.prod(q) * k[-2]
      acc.kernels += flops
      return flops
  acc.uncounted_kernels += 1
  return 0.0


def _count(jaxpr, acc: ExecutedFlops, mult: float, once: float) -> None:
  """Adds `jaxpr`'s FLOPs run `mult` times to acc.total, and run `once` times (loop trip counts left out) to
  acc.loops_once."""
  from jax._src import core

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    flops = 0.0
    if name == "dot_general":
      flops = _dot_general_flops(eqn)
    elif name in ("ragged_dot", "ragged_dot_general"):
      flops = _ragged_dot_flops(eqn)
    elif name == "pallas_call":
      before = acc.kernels
      flops = _pallas_flops(eqn, acc)
      acc.kernels = before + mult * (acc.kernels - before)
    elif name == "scan":
      _count(eqn.params["jaxpr"].jaxpr, acc, mult * eqn.params["length"], once)
    elif name == "while":
      acc.unknown_loops += 1
      _count(eqn.params["body_jaxpr"].jaxpr, acc, mult, once)
    elif name == "cond":  # the most expensive branch
      costs = []
      for branch in eqn.params["branches"]:
        sub = ExecutedFlops()
        _count(branch.jaxpr, sub, mult, once)
        costs.append(sub)
      worst = max(costs, key=lambda c: c.total)
      acc.total += worst.total
      acc.kernels += worst.kernels
      acc.loops_once += worst.loops_once
    elif name == "shard_map":  # the body sees one shard: it runs once per device of the manual axes
      mesh = eqn.params["mesh"]
      shards = math.prod(mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names))
      _count(eqn.params["jaxpr"], acc, mult * shards, once * shards)
    else:
      for sub in core.jaxprs_in_params(eqn.params):
        _count(sub, acc, mult, once)
    acc.total += mult * flops
    acc.loops_once += once * flops


def executed_flops(closed_jaxpr) -> ExecutedFlops:
  """Matmul FLOPs of one call of a traced program (`jax.make_jaxpr(f)(...)`, or `jitted.trace(...).jaxpr`),
  global: divide by the chips for a per-chip number (FSDP and data parallelism split every matmul evenly)."""
  acc = ExecutedFlops()
  _count(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), acc, 1.0, 1.0)
  return acc
