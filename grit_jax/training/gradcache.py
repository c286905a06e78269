"""GradCache (Gao et al. 2021, as vendored by the reference): contrastive training with a batch far larger than the
activations of one backward pass allow, with the same loss and gradients as the full-batch step.

1. Representations of every chunk, forward only (no activations kept).
2. The loss over the full batch of representations and its gradient w.r.t. them (cheap: [B, D] arrays).
3. Chunk by chunk: re-run the forward under `jax.vjp` and pull the cached representation gradient back into the
   parameters; gradients are summed over chunks.
Peak activation memory is that of one chunk; the cost is one extra forward.

Chunks and shards: the batch dim is split over W devices (contiguous blocks of B/W rows). Chunk k takes the k-th
sub-block of every shard, so each chunk stays spread over all W devices (no resharding, no idle device) and the
representations are put back in the original row order before the loss.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def split_chunks(x, num_chunks: int, shards: int = 1):
  """[B, ...] -> [num_chunks, B / num_chunks, ...]; chunk k = rows [k*m, (k+1)*m) of each of the `shards`
  contiguous shards (m = B / (shards * num_chunks))."""
  B, rest = x.shape[0], x.shape[1:]
  if B % (shards * num_chunks):
    raise ValueError(f"batch of {B} rows does not split into {num_chunks} chunks x {shards} shards")
  m = B // (shards * num_chunks)
  return x.reshape(shards, num_chunks, m, *rest).swapaxes(0, 1).reshape(num_chunks, shards * m, *rest)


def merge_chunks(x, shards: int = 1):
  """Inverse of `split_chunks`: [num_chunks, c, ...] -> [num_chunks * c, ...] in the original row order."""
  n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
  return x.reshape(n, shards, c // shards, *rest).swapaxes(0, 1).reshape(n * c, *rest)


def split_rows(x, num_chunks: int):
  """Packed [U, R, ...] -> [num_chunks, U, R / num_chunks, ...]: chunk k = rows [k*r, (k+1)*r) of every packing
  unit (r = R / num_chunks). The unit axis stays where it is, so each chunk stays spread over all devices."""
  U, R, rest = x.shape[0], x.shape[1], x.shape[2:]
  if R % num_chunks:
    raise ValueError(f"{R} packed rows per unit do not split into {num_chunks} chunks")
  return x.reshape(U, num_chunks, R // num_chunks, *rest).swapaxes(0, 1)


def chunk_shards(batch_rows: Sequence[int], num_chunks: int, shards: int) -> int:
  """`shards` when every batch splits into num_chunks x shards, else 1 (contiguous chunks: still exact, the chunks
  are then just not spread over all devices)."""
  if all(b % (shards * num_chunks) == 0 for b in batch_rows):
    return shards
  if any(b % num_chunks for b in batch_rows):
    raise ValueError(f"batches of {list(batch_rows)} rows do not split into {num_chunks} chunks")
  return 1


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def gradcache(rep_fns: Sequence[Callable], params, inputs: Sequence[tuple], loss_fn: Callable, num_chunks: int, *,
              shards: int = 1, constrain: Callable = lambda x: x, packed: Sequence[bool] | None = None):
  """Loss and parameter gradients of loss_fn(rep_fns[0](params, *inputs[0]), rep_fns[1](params, *inputs[1]), ...)
  computed GradCache-style.

  rep_fns[i](params, *arrays) -> representations [b, D] of the rows of `arrays` (each [b, ...]);
  inputs[i]: tuple of arrays [B_i, ...] (e.g. query ids, mask, pool mask);
  loss_fn(*reps) -> (scalar objective, aux);  num_chunks: chunks per input (B_i / num_chunks rows each);
  shards: W, how many devices split the batch dim; constrain: applied to every chunked array [n, c, ...] (a sharding
  constraint keeping dim 1 on the batch axes).
  packed[i]: input i is packed rows [U, R, ...] (grit_jax.data.packing.pack_sequences): chunks are row chunks of
  every unit (`split_rows`), rep_fns[i] returns the representations of ALL the pass's sequences with 0 for those
  outside the chunk's rows, so the representations are the sum over chunks and every chunk pulls back the full
  representation gradient (a sequence's rows lie in one chunk: the other chunks' contributions to it are 0).
  Returns ((objective, aux), grads) equal to jax.value_and_grad(..., has_aux=True) of the unchunked computation.
  """
  packed = tuple(packed or (False,) * len(inputs))
  split = lambda a, p: split_rows(a, num_chunks) if p else split_chunks(a, num_chunks, shards)
  chunked = [tuple(constrain(split(a, p)) for a in arrays) for arrays, p in zip(inputs, packed)]

  # Pass 1: representations without gradient, one chunk at a time.
  frozen = jax.lax.stop_gradient(params)
  reps = []
  for f, xs, p in zip(rep_fns, chunked, packed):
    if p:
      first = f(frozen, *(x[0] for x in xs))
      rest = jax.tree.map(lambda x: x[1:], xs)
      total, _ = jax.lax.scan(lambda acc, ch, f=f: (acc + f(frozen, *ch), None), first, rest)
      reps.append(total)
    else:
      reps.append(merge_chunks(jax.lax.map(lambda ch, f=f: f(frozen, *ch), xs), shards))

  # Pass 2: the loss on the full batch and its gradient w.r.t. the representations.
  (objective, aux), rep_grads = jax.value_and_grad(loss_fn, argnums=tuple(range(len(reps))), has_aux=True)(*reps)

  # Pass 3: per chunk, pull the cached representation gradient back through the (recomputed) forward.
  grads = jax.tree.map(jnp.zeros_like, params)
  for f, xs, g, p in zip(rep_fns, chunked, rep_grads, packed):
    def body(acc, chunk, f=f, g=g, p=p):
      arrays, g_chunk = chunk
      _, pullback = jax.vjp(lambda prm: f(prm, *arrays), params)
      return _add(acc, pullback((g if p else g_chunk).astype(jnp.float32))[0]), None

    g_chunks = None if p else constrain(split_chunks(g, num_chunks, shards))
    grads, _ = jax.lax.scan(body, grads, (xs, g_chunks))
  return (objective, aux), grads
