"""Model FLOPs of a GRIT training step, the bidirectional embedding passes and the causal generative pass counted
separately, and MFU from them.

Counted as the usual MFU convention does (PaLM appendix B, MaxText): matmul FLOPs only (2 per multiply-add), a
training step = 3x the forward (backward = 2x), recomputation (remat, GradCache's extra no-grad forward) NOT counted
-- it is overhead that MFU is meant to expose. Attention score/value products count only the key positions a query
may see: all T for bidirectional passes, (T + 1) / 2 on average for causal ones (fewer with a sliding window).
Padded shapes are counted (the accelerator computes them). Embedding passes skip the LM head; the generative pass
pays it. MoE layers count the router and `num_experts_per_tok` experts per token.
"""
from __future__ import annotations

import dataclasses
import os

from grit_jax.perf.topologies import CHIPS

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)


def _get(cfg, name, default=None):
  return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name, default)


def _mean_visible_keys(length: int, causal: bool, sliding_window: int | None) -> float:
  """Average number of key positions one query attends to in a length-`length` self-attention."""
  if not causal:
    return float(length)
  w = sliding_window or length
  w = min(w, length)
  # query i sees min(i + 1, w) keys
  total = w * (w + 1) / 2 + (length - w) * w
  return total / length


def matmul_params_per_layer(cfg) -> int:
  """Parameters of one decoder layer that take part in a per-token matmul (norms excluded)."""
  d, h, kvh, dh = (_get(cfg, n) for n in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"))
  attn = d * h * dh + 2 * d * kvh * dh + h * dh * d
  inter = _get(cfg, "intermediate_size")
  experts = _get(cfg, "num_experts", 0) or 0
  if experts:
    mlp = _get(cfg, "num_experts_per_tok") * 3 * d * inter + d * experts  # chosen experts + router
  else:
    mlp = 3 * d * inter
  return attn + mlp


def forward_flops(cfg, batch: int, length: int, *, causal: bool, lm_head: bool) -> float:
  """FLOPs of one forward pass over [batch, length] tokens."""
  tokens = batch * length
  layers = _get(cfg, "num_layers")
  dense = 2 * tokens * layers * matmul_params_per_layer(cfg)
  window = None if not causal else _get(cfg, "sliding_window", None)
  keys = _mean_visible_keys(length, causal, window)
  # QK^T and PV: 2 products x 2 FLOPs x keys x heads x head_dim per query token and layer
  attention = 2 * 2 * tokens * layers * keys * _get(cfg, "num_heads") * _get(cfg, "head_dim")
  head = 2 * tokens * _get(cfg, "hidden_size") * _get(cfg, "vocab_size") if lm_head else 0
  return float(dense + attention + head)


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
                    attn: str = "bbcc") -> StepFlops:
  """Training FLOPs of one GRIT step (global batch). `attn` as config.attn: chars 1-2 = query/passage pass
  (b = bidirectional, c = causal), chars 3-4 generative (GritLM: "bbcc")."""
  m = TRAIN_MULTIPLIER
  return StepFlops(
      query=m * forward_flops(model_cfg, query_batch, query_len, causal=attn[0] == "c", lm_head=False)
      if query_batch else 0.0,
      passage=m * forward_flops(model_cfg, passage_batch, passage_len, causal=attn[1] == "c", lm_head=False)
      if passage_batch else 0.0,
      generative=m * forward_flops(model_cfg, gen_batch, gen_len, causal=attn[2] == "c", lm_head=True)
      if gen_batch else 0.0,
  )


def grit_step_flops_from_config(config, layouts: dict | None = None) -> StepFlops:
  """Same, for a full recipe ConfigDict (config.model, config.data, config.attn). `layouts`: the packed passes'
  shapes ({pass: grit_jax.data.packing.PassLayout}): a packed pass computes its rows (U * R rows of L tokens,
  attention over the whole row) instead of one padded row per sequence."""
  d = config.data
  emb = d.mode in ("unified", "embedding")
  gen = d.mode in ("unified", "generative")
  shape = {"query": (d.embedding_batch_size if emb else 0, d.query_max_len),
           "passage": (d.embedding_batch_size * d.train_group_size if emb else 0, d.passage_max_len),
           "gen": (d.generative_batch_size if gen else 0, d.generative_max_len)}
  for name, lay in (layouts or {}).items():
    shape[name] = (lay.units * lay.rows, lay.row_len)
  return grit_step_flops(
      config.model, query_batch=shape["query"][0], query_len=shape["query"][1], passage_batch=shape["passage"][0],
      passage_len=shape["passage"][1], gen_batch=shape["gen"][0], gen_len=shape["gen"][1], attn=config.attn)


def mfu(flops_per_step: float, step_seconds: float, num_chips: int, peak_flops_per_chip: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak of all chips."""
  return flops_per_step / (step_seconds * num_chips * peak_flops_per_chip)


# Dense bf16 peak FLOP/s per jax device, by device_kind prefix (TPU numbers from the chip table of
# grit_jax.perf.topologies). TPU v4/v5p devices are whole (megacore) chips.
_DEVICE_PEAKS = (
    ("TPU v5p", CHIPS["v5p"].peak_bf16_flops), ("TPU v5 lite", CHIPS["v5e"].peak_bf16_flops),
    ("TPU v5e", CHIPS["v5e"].peak_bf16_flops), ("TPU v6", CHIPS["v6e"].peak_bf16_flops),
    ("TPU v4", CHIPS["v4"].peak_bf16_flops),
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
)
# A CPU host has no datasheet number; ~100 GFLOP/s per core (AVX-512 float32, measured ~50% of theoretical FMA peak
# on the reference machine) makes MFU on a laptop comparable between runs, not between machines.
_CPU_FLOPS_PER_CORE = 100e9


def peak_flops(devices) -> float:
  """Summed peak FLOP/s of `devices` (jax devices of this process; for the train log's MFU); NaN if unknown."""
  if devices[0].platform == "cpu":
    import jax

    return _CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) * jax.process_count()
  for prefix, flops in _DEVICE_PEAKS:
    if devices[0].device_kind.startswith(prefix):
      return flops * len(devices)
  return float("nan")
