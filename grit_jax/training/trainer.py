"""The training run: build or restore the sharded state, stream batches, step, log, evaluate, checkpoint, export.

`train(config, workdir)` is what `grit-jax train` calls. Rerunning it on the same workdir resumes from the last
checkpoint with the data position of every process restored, so the loss curve of an interrupted run equals the
uninterrupted one. A non-finite loss stops the run without saving (`TrainingDiverged`), keeping the last good
checkpoint.

Host-device overlap: the loss of step s is read back only after step s+1 has been dispatched, so the host never
waits for the device except before a save, an eval or the end.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp

from grit_jax import contract
from grit_jax import flops as flops_lib
from grit_jax.errors import GritJaxError
from grit_jax.fileio import write_json
from grit_jax.training import checkpoint as ckpt_lib
from grit_jax.training import evaluate as eval_lib
from grit_jax.training import export as export_lib
from grit_jax.training import metrics_log
from grit_jax.training import run as run_lib
from grit_jax.training import run_folders


class TrainingDiverged(GritJaxError):
  """The loss (or the parameters) became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------------------
# The loop

@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def train(config, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) the training described by `config` in `workdir`; returns a summary dict."""
  from grit_jax import sharding as mesh_lib

  model_config = contract.validate(config, num_devices=jax.device_count(),  # before any mesh, data or weights
                                   num_slices=mesh_lib.num_slices(jax.devices()),
                                   log=print if jax.process_index() == 0 else None)
  config = contract.with_model(config, model_config)  # what is saved and logged is the model really trained
  with run_folders.claim_run(workdir, config.train.checkpoint_dir):  # writable, and no other run in it
    return _train(config, model_config, workdir, progress=progress)


def _train(config, model_config, workdir: str, *, progress: bool) -> dict:
  from grit_jax import data as data_lib

  t = config.train
  primary = jax.process_index() == 0
  config_json = _config_json(config)
  from grit_jax.data.tokenizer import file_identity
  # The tokenizer is named relative to where the run started: record which file it was (ckpt-to-hf finds it).
  run_json = dict(config_json, tokenizer_file=file_identity(config.data.tokenizer))
  if primary:
    write_json(os.path.join(workdir, "config.json"), run_json)

  run = run_lib.Run(config, model_config)
  ckpt = ckpt_lib.Checkpointer(t.checkpoint_dir or workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint,
                               allow_unverified=t.allow_unverified_checkpoints)
  restored = ckpt.restore_latest(run.abstract_state())  # the newest intact step; damaged newer ones named
  data_state = None
  if restored is not None:
    start, state, data_state, meta = restored
    _warn_config_changes(meta.get("config", {}), config_json)
    state = run.with_base(state, workdir)  # LoRA: the frozen base is not in the checkpoint
  else:
    start = 0
    state = run.init_state(workdir)

  from grit_jax.training import step as step_lib

  it = data_lib.make_train_iterator(config.data, shard_index=jax.process_index(), num_shards=jax.process_count(),
                                    **step_lib.packing_layout(config, run.mesh))
  if it.packer is not None and primary:
    print(it.packer.describe(), flush=True)
  if data_state is not None:
    it.set_state(data_state)

  evaluate = eval_lib.Evaluator(run, config)
  log = metrics_log.MetricsLog(workdir, enabled=primary, resume_step=start, hparams=run_json)
  stop = min(t.stop_after or t.steps, t.steps)
  # the packed rows are what a packed step computes
  flops = flops_lib.grit_step_flops_from_config(config, it.packer.layouts if it.packer else None).total
  peak = flops_lib.peak_flops(jax.devices(), config.model.dtype)
  bar = None
  if progress and primary and stop > start:
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True)

  last_metrics: dict = dict(meta.get("metrics", {})) if start else {}
  pending = None  # (step, device metrics) of the step whose loss has not been read yet
  window = {"t": time.perf_counter(), "steps": 0, "tokens": 0}

  def settle(item):
    """Reads back one step's metrics; stops on a non-finite loss; logs every log_every steps."""
    nonlocal last_metrics
    step, m_dev = item
    m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
    window["steps"] += 1
    window["tokens"] += m.get("tokens", 0.0)
    bad = non_finite(m)
    if bad:
      _diverged(step, bad, ckpt, log, bar)
    last_metrics = m
    if step % t.log_every == 0 or step == stop:
      dt = time.perf_counter() - window["t"]
      m = dict(m, **_sum_over_processes({k: m[k] for k in it.truncated}))  # texts cut to max length, so far
      m["tokens_per_s"] = window["tokens"] / dt if dt > 0 else float("nan")
      m["step_s"] = dt / max(window["steps"], 1)
      m["mfu"] = flops_lib.mfu(flops, m["step_s"], 1, peak) if flops else float("nan")
      log.write(step, m)
      window.update(t=time.perf_counter(), steps=0, tokens=0)
      if bar is not None:
        bar.set_postfix_str(_postfix(m), refresh=False)
    if bar is not None:
      bar.update(step - bar.n)

  preemption = _Preemption()
  compiled_shapes = set()  # pack levels (None: unpacked) whose step is compiled; a new one compiles in its first call
  try:
    for step in range(start + 1, stop + 1):
      batch_np = next(it)
      step_data_state = it.get_state()
      batch = data_lib.to_global_batch(batch_np, run.mesh)
      shape = it.packer.level if it.packer is not None else None
      compiling = primary and shape not in compiled_shapes
      if compiling:  # the call blocks while XLA compiles (tens of seconds for the tiny recipe, minutes for 7B)
        level = f" (pack level {shape})" if shape is not None else ""
        _note(bar, f"step {step}: compiling the train step{level} ...")
        t_compile = time.perf_counter()
      state, metrics = run.train_step(state, batch)
      if compiling:
        compiled_shapes.add(shape)
        _note(bar, f"step {step}: train step{level} compiled in {time.perf_counter() - t_compile:.1f} s")
      metrics = dict(metrics, **it.truncation_counts())  # host-side counts through this batch
      if it.packer is not None:
        metrics["pack_level"] = it.packer.level  # the step shape this batch took (grit_jax.data.packing)
      if pending is not None:
        settle(pending)
      pending = (step, metrics)
      preempted = preemption.reached(step)
      is_last = step == stop or preempted
      if (t.save_every and step % t.save_every == 0) or is_last:
        settle(pending)
        pending = None
        if not bool(_all_finite(run_lib.params(state))):
          _diverged(step, "parameters", ckpt, log, bar)
        ckpt.save(step, state, step_data_state, {"config": config_json, "metrics": last_metrics})
      if preempted:
        stop = step
        if primary:
          print(f"\npreempted (SIGTERM): saved step {step}; rerun the same command to resume", flush=True)
        break
      if config.data.eval_dir and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
        if pending is not None:
          settle(pending)
          pending = None
        ev = evaluate(run_lib.model_params(state))
        log.write(step, ev, prefix="eval")
        last_metrics.update({f"eval_{k}": v for k, v in ev.items()})
        if bar is not None:
          bar.write(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    final = max(stop, start)
    summary = {"step": final, "resumed_from": start, **last_metrics}
    if it.packer is not None:
      summary["pack_fallback_steps"] = it.packer.fallbacks
      summary["pack_level_steps"] = list(it.packer.level_steps)  # this run (since a resume), per level
    cut = data_lib.iterator.truncation_report(_sum_over_processes(it.truncated), _sum_over_processes(it.texts))
    if cut and primary:
      print(f"warning: {cut} (raise config.data.*_max_len to keep them whole)", file=sys.stderr, flush=True)
    if final == t.steps and t.export_hf:
      merged, export_model = run_lib.export_params(state, model_config)  # LoRA: adapters merged into the base
      summary["hf"] = export_lib.export_hf(merged, config, export_model, os.path.join(workdir, "hf"))
  finally:
    preemption.restore()
    if bar is not None:
      bar.close()
    ckpt.close()
    log.close()
  return summary


class _Preemption:
  """SIGTERM (what a preempted TPU VM / spot instance receives) -> save at the next step and stop cleanly.
  Multi-process runs use jax's preemption sync point so every process stops at the same step."""

  def __init__(self):
    self.flag = False
    self._old = None
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread: leave signals alone
      pass

  def _handler(self, signum, frame):
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service in this jax.distributed set-up
        return False
    return self.flag

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _sum_over_processes(counts: dict) -> dict:
  """Host-side counts of this process -> the run's (collective)."""
  per_process = run_folders.allgather_json({k: int(v) for k, v in counts.items()})
  return {k: sum(c[k] for c in per_process) for k in counts}


def _postfix(m: dict) -> str:
  parts = [f"loss {m['loss']:.4f}"]
  for k, short in (("loss_rep", "rep"), ("loss_emb", "rep"), ("loss_gen", "gen")):
    if k in m:
      parts.append(f"{short} {m[k]:.4f}")
  parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
  if math.isfinite(m["mfu"]):
    parts.append(f"MFU {m['mfu']:.1%}")
  return " ".join(parts)


def _note(bar, line: str) -> None:
  """A line on stderr, above the progress bar when there is one."""
  if bar is not None:
    bar.write(line, file=sys.stderr)
  else:
    print(line, file=sys.stderr, flush=True)


def non_finite(metrics: dict) -> str | None:
  """What of a step's metrics is NaN or infinite (None: nothing). A finite loss with an infinite gradient norm
  (a run on garbage weights: loss 4e29) turns the parameters into garbage at the update."""
  for key in ("loss", "grad_norm"):
    if key in metrics and not math.isfinite(metrics[key]):
      return f"the {key} is {metrics[key]}"
  return None


def _diverged(step, value, ckpt, log, bar):
  ckpt.wait()
  log.flush()
  if bar is not None:
    bar.close()
  # A checkpoint of step s holds the params after update s, which step s+1's loss is computed from: if that loss
  # is not finite, checkpoint s is not good either (a rerun would resume into the same divergence).
  if value != "parameters" and step - 1 in ckpt.all_steps():
    ckpt.delete(step - 1)
  last_saved = ckpt.latest_step()
  where = (f"the last good checkpoint is step {last_saved} in {ckpt.directory} (rerunning resumes from it)"
           if last_saved else "no checkpoint was written")
  what = "the parameters became non-finite" if value == "parameters" else value
  raise TrainingDiverged(f"training diverged at step {step}: {what} (the last good step is {step - 1}). Stopped "
                         f"without saving; {where}. "
                         "Lower --config.optimizer.lr or check the data.")


def _warn_config_changes(saved: dict, now: dict) -> None:
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out

  a, b = flat(saved), flat(now)
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "train.stop_after")
  if changed and jax.process_index() == 0:
    print(f"warning: resuming with a changed config: {', '.join(changed)}", flush=True)
