"""Model FLOPs of one GRIT train step from the shapes of its batch (for tokens/s -> FLOP/s and MFU).

Counting (grit_jax.perf.mfu): 2 FLOPs per multiply-add of every matmul, training = 3x forward (6 * N * tokens for
the weights), plus the attention score/value products (bidirectional passes see all T keys, causal ones (T+1)/2 on
average). Embedding passes (bidirectional under "bbcc") skip the LM head; the causal generative pass pays it.
Recomputation (remat, GradCache's extra forward) is not counted: MFU is meant to expose it.
"""
from __future__ import annotations

from typing import Mapping

from grit_jax.perf.mfu import StepFlops, grit_step_flops


def step_flops(model_config, batch_shapes: Mapping[str, tuple], attn: str = "bbcc") -> StepFlops:
  """StepFlops(query, passage, generative; .embedding, .total) of one step on a global batch whose arrays have
  these shapes (a batch dict of arrays works too: anything with .shape, or plain shape tuples)."""
  shape = lambda k: tuple(getattr(batch_shapes[k], "shape", batch_shapes[k])) if k in batch_shapes else (0, 0)
  (qb, ql), (pb, pl), (gb, gl) = shape("query_ids"), shape("passage_ids"), shape("gen_ids")
  return grit_step_flops(model_config, query_batch=qb, query_len=ql, passage_batch=pb, passage_len=pl,
                         gen_batch=gb, gen_len=gl, attn=attn)


def num_params(params) -> int:
  """Number of parameters in a param pytree (arrays or ShapeDtypeStructs)."""
  import math

  import jax

  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
