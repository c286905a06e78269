"""Training metrics as JSONL (one object per logged step) and TensorBoard event files.

Only the primary process writes. The TensorBoard events go through clu.metric_writers.SummaryWriter (scalars as
`tensorboard.summary.scalar` writes them). The run's resolved config goes to the HParams dashboard once per
(re)start (clu's write_hparams), one hparam per dotted key (`optimizer.lr`, `data.pack_embedding`, ...; lists and
None as their JSON text).

After a resume, `MetricsLog(..., resume_step=s)` drops the JSONL records past step s (they belong to steps the run
is about to redo), so the file of an interrupted-and-resumed run reads like the uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping

import numpy as np

from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _as_float(v) -> float:
  return float(np.asarray(v))


def read_metrics(workdir: str) -> list[dict]:
  """All records of workdir/metrics.jsonl, in file order. A last line cut short (a crash in the middle of a write)
  is dropped with a warning (a resume rewrites the file without it); a damaged line before it is a GritJaxError."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  out = []
  for n, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    try:
      out.append(json.loads(raw.decode("utf-8")))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
      if n == len(lines):  # no newline after it: the write never finished
        print(f"warning: {path}:{n}: dropping a half-written last line ({e})", file=sys.stderr, flush=True)
        continue
      raise GritJaxError(f"{path}:{n}: not a metrics record ({e}); remove the line to resume") from None
  return out


def flat_hparams(tree: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
  """A nested config (dict or ConfigDict) as {dotted key: bool | number | str}, the types TensorBoard's HParams take."""
  out = {}
  for k, v in (tree.items() if hasattr(tree, "items") else []):
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(flat_hparams(v, key + "."))
    elif isinstance(v, (bool, int, float, str)):
      out[key] = v
    else:  # None, lists, tuples
      out[key] = json.dumps(v, default=str)
  return out


class MetricsLog:
  """`write(step, metrics, prefix)` appends one JSONL record and one TensorBoard scalar per metric."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None,
               hparams: Mapping | None = None):
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
    from clu.metric_writers import SummaryWriter  # lazy (imports TensorFlow): only the writing process pays for it

    self._tb = SummaryWriter(os.path.join(workdir, TB_DIR))
    if hparams is not None:
      self._tb.write_hparams(flat_hparams(hparams))

  def write(self, step: int, metrics: Mapping[str, object], prefix: str = "train") -> dict:
    record = {"step": int(step), "split": prefix}
    record.update({k: _as_float(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    # json has no NaN/inf literals that other readers accept; write them as strings.
    safe = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
    self._file.write(json.dumps(safe) + "\n")
    self._file.flush()
    self._tb.write_scalars(int(step), {f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split")})
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
        if v.metadata.plugin_data.plugin_name != "hparams":
          out.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
  return out


def read_tb_hparams(workdir: str) -> list[dict[str, bool | float | str]]:
  """The hparams of each (re)start of the run under workdir/tb, in file order."""
  import tensorflow as tf
  from tensorboard.plugins.hparams import metadata

  out = []
  tb = os.path.join(workdir, TB_DIR)
  for name in sorted(os.listdir(tb)):
    for raw in tf.data.TFRecordDataset(os.path.join(tb, name)):
      for v in tf.compat.v1.Event.FromString(raw.numpy()).summary.value:
        if v.tag == metadata.SESSION_START_INFO_TAG:
          info = metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
          out.append({k: getattr(h, h.WhichOneof("kind")) for k, h in info.hparams.items()})
  return out
