"""The global batches of example indices, epoch by epoch, of the training iterator (data/iterator.py): a pure
function of (seed, stream, epoch), so a stream's state is two integers and a resumed run draws the uninterrupted
run's batches. `same_dataset` batching cuts each dataset's permutation into full batches (the reference's
CustomRandomSampler); `mixed` cuts one permutation of all rows."""
from __future__ import annotations

import numpy as np

from grit_jax.data import tfds_builders
from grit_jax.errors import GritJaxError


def epoch_batches(counts: np.ndarray, offsets: np.ndarray, batch: int, rng: np.random.Generator,
                   single_dataset: bool) -> np.ndarray:
  """[num_batches, batch] global example indices of one epoch."""
  if single_dataset and len(counts) > 1:
    full, leftover = [], []
    for d, n in enumerate(counts):
      perm = offsets[d] + rng.permutation(int(n))
      k = int(n) // batch
      full.append(perm[:k * batch].reshape(k, batch))
      leftover.append(perm[k * batch:])
    mixed = rng.permutation(np.concatenate(leftover))
    k = len(mixed) // batch
    batches = np.concatenate(full + [mixed[:k * batch].reshape(k, batch)])
    return batches[rng.permutation(len(batches))]
  perm = rng.permutation(int(offsets[-1]))
  k = len(perm) // batch
  return perm[:k * batch].reshape(k, batch)


class Stream:
  """Global batches of indices epoch by epoch. State: {"epoch", "batch"} = the next batch to yield."""

  def __init__(self, ds: tfds_builders.JsonlDataset, global_batch: int, seed: int, stream: int,
               single_dataset: bool, name: str):
    self.ds, self.global_batch, self.seed, self.stream = ds, global_batch, seed, stream
    self.single_dataset = single_dataset
    self.epoch, self.batch = 0, 0
    self._cache: tuple[int, np.ndarray] | None = None
    if len(ds) < global_batch:
      raise GritJaxError(f"{name}: {len(ds)} valid examples in {ds.files}, fewer than one global batch of "
                         f"{global_batch}")

  def batches(self, epoch: int) -> np.ndarray:
    if self._cache is None or self._cache[0] != epoch:
      rng = np.random.default_rng([self.seed, self.stream, epoch])
      self._cache = (epoch, epoch_batches(self.ds.counts, self.ds.offsets, self.global_batch, rng,
                                           self.single_dataset))
    return self._cache[1]

  def next(self) -> tuple[int, np.ndarray]:
    """(epoch, [global_batch] indices) of the next global batch."""
    if self.batch >= len(self.batches(self.epoch)):
      self.epoch, self.batch = self.epoch + 1, 0
    out = self.epoch, self.batches(self.epoch)[self.batch]
    self.batch += 1
    return out

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "batch": self.batch}

  def set_state(self, state: dict) -> None:
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
