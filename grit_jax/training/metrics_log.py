"""Training metrics as JSONL (one object per logged step) and TensorBoard event files.

Only the primary process writes. The TensorBoard events go through TensorFlow's core summary op with the
"scalars" plugin metadata (what `tensorboard.summary.scalar` writes), so the `tensorboard` package is not needed
to write them, only to view them.

After a resume, `MetricsLog(..., resume_step=s)` drops the JSONL records past step s (they belong to steps the run
is about to redo), so the file of an interrupted-and-resumed run reads like the uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

from grit_jax.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _as_float(v) -> float:
  return float(np.asarray(v))


def read_metrics(workdir: str) -> list[dict]:
  """All records of workdir/metrics.jsonl, in file order."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
  """`write(step, metrics, prefix)` appends one JSONL record and one TensorBoard scalar per metric."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
      atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
    self._file = open(self.path, "a")
    import tensorflow as tf  # lazy: only the writing process pays for it

    self._tf = tf
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, TB_DIR))
    self._meta = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))

  def write(self, step: int, metrics: Mapping[str, object], prefix: str = "train") -> dict:
    record = {"step": int(step), "split": prefix}
    record.update({k: _as_float(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    # json has no NaN/inf literals that other readers accept; write them as strings.
    safe = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
    self._file.write(json.dumps(safe) + "\n")
    self._file.flush()
    with self._tb.as_default():
      for k, v in record.items():
        if k in ("step", "split"):
          continue
        self._tf.summary.write(f"{prefix}/{k}", self._tf.constant(v, self._tf.float32), step=int(step),
                               metadata=self._meta)
    return record

  def flush(self):
    if self.enabled:
      self._file.flush()
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()
      self.enabled = False


def read_tb_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file under workdir/tb (for tests and quick checks)."""
  import tensorflow as tf

  out: dict[str, list[tuple[int, float]]] = {}
  tb = os.path.join(workdir, TB_DIR)
  for name in sorted(os.listdir(tb)):
    for raw in tf.data.TFRecordDataset(os.path.join(tb, name)):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
  return out
