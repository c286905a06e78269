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
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write
from grit_jax import flops as flops_lib
from grit_jax.training import checkpoint as ckpt_lib
from grit_jax.training import metrics_log


class TrainingDiverged(GritJaxError):
  """The loss (or the parameters) became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------------------
# Throughput accounting


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (the only place that knows the other modules' entry points)

def model_config_from(config):
  from grit_jax.modeling import ModelConfig

  return ModelConfig.from_dict(config.model.to_dict(), source="config.model")


def _tokenizer(config):
  from grit_jax.data.tokenizer import Tokenizer

  return Tokenizer(config.data.tokenizer)


class Run:
  """Everything the loop needs, built once from the config."""

  def __init__(self, config):
    from grit_jax.training import mesh as mesh_lib
    from grit_jax.training import optimizer as opt_lib
    from grit_jax.training import state as state_lib
    from grit_jax.training import step as step_lib

    self.config = config
    self.model_config = model_config_from(config)
    self.mesh, self.rules = mesh_lib.make_mesh(config.mesh)
    self.tx = opt_lib.make_optimizer(config.optimizer, config.train.steps)
    rng = jax.random.PRNGKey(config.train.seed)
    self._create = lambda: state_lib.create_train_state(self.model_config, self.tx, self.mesh, self.rules, rng)
    self.train_step = step_lib.make_train_step(self.model_config, config, self.mesh, self.rules)
    self.eval_fns = None

  def abstract_state(self):
    """The state's shapes, dtypes and shardings on this mesh, without allocating it (the restore target)."""
    from grit_jax.training import state as state_lib

    shapes, shardings = state_lib.state_shardings(self.model_config, self.tx, self.mesh, self.rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

  def init_state(self):
    return self._create()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation

def make_eval_fns(model_config, config, mesh, rules):
  """Jitted (embed_queries, embed_passages, lm_sums) over global (sharded) batches, each called under the mesh and
  the logical-axis rules (as the train step), so the model's sharding constraints resolve to mesh axes. The passes
  are the train step's own (grit_jax.training.step.GritObjective)."""
  import flax.linen as nn

  from grit_jax import objectives
  from grit_jax.training import step as step_lib

  obj = step_lib.GritObjective(model_config, config.loss, mesh, rules, config.attn)
  finish = objectives.l2_normalize if config.loss.normalize else (lambda e: e)

  def lm_sums(params, ids, mask, labels):
    """(sum of next-token CE over supervised tokens, their count): an exact token mean over the whole eval set."""
    logits = obj.model.apply({"params": params}, ids, mask, causal=True).logits  # [B, T, V]
    return jnp.sum(objectives.token_cross_entropy(logits, labels)), jnp.sum(labels[:, 1:] != objectives.IGNORE)

  def under_mesh(fn):
    jitted = jax.jit(fn)

    def call(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted(*args)
    return call

  return (under_mesh(lambda p, i, m, pm: finish(obj.embed_query(p, i, m, pm))),
          under_mesh(lambda p, i, m, pm: finish(obj.embed_passage(p, i, m, pm))),
          under_mesh(lm_sums))


def evaluate(run: Run, params, config) -> dict:
  """Held-out retrieval accuracy (each eval query against every eval passage: positives and hard negatives of all
  queries) and the generative LM loss (token mean over the eval chats)."""
  from grit_jax import data as data_lib

  if run.eval_fns is None:
    run.eval_fns = make_eval_fns(run.model_config, config, run.mesh, run.rules)
  embed_q, embed_p, lm_sums = run.eval_fns
  qs, ps, lm_sum, lm_tokens = [], [], 0.0, 0.0
  for batch_np in data_lib.make_eval_iterator(config.data, shard_index=jax.process_index(),
                                              num_shards=jax.process_count()):
    batch = data_lib.to_global_batch(batch_np, run.mesh)
    if "query_ids" in batch:
      # Filler rows (weight 0) complete the last batch; drop them (and their passages).
      keep = np.asarray(_to_host(batch["query_weight"])) > 0  # [Bq]
      q = np.asarray(_to_host(embed_q(params, batch["query_ids"], batch["query_mask"], batch["query_pool_mask"])))
      p = np.asarray(_to_host(embed_p(params, batch["passage_ids"], batch["passage_mask"],
                                      batch["passage_pool_mask"])))
      g = p.shape[0] // q.shape[0]
      qs.append(q[keep])
      ps.append(p.reshape(q.shape[0], g, -1)[keep].reshape(-1, p.shape[-1]))
    if "gen_ids" in batch:
      s, n = _to_host(lm_sums(params, batch["gen_ids"], batch["gen_mask"], batch["gen_labels"]))
      lm_sum, lm_tokens = lm_sum + float(s), lm_tokens + float(n)
  out = {}
  if qs:
    q = np.concatenate(qs)  # [Q, D]
    p = np.concatenate(ps)  # [Q * g, D]
    g = p.shape[0] // q.shape[0]
    ranked = np.argsort(-(q @ p.T), axis=1)  # [Q, Q * g]
    gold = np.arange(q.shape[0]) * g  # each query's positive comes first in its group
    out["retrieval_top1"] = float(np.mean(ranked[:, 0] == gold))
    out["retrieval_top5"] = float(np.mean((ranked[:, :5] == gold[:, None]).any(axis=1)))
  if lm_tokens:
    out["lm_loss"] = lm_sum / lm_tokens
  return out


# ---------------------------------------------------------------------------------------------------------------
# Export

def export_hf(params, config, out_dir: str) -> str:
  """Writes a Hugging Face directory (config.json + safetensors + tokenizer.model) that GritLM.from_pretrained and
  transformers load. Collective (every process gathers the params); process 0 writes, atomically."""
  from grit_jax.convert import hf as hf_lib

  host = _to_host(params)
  if jax.process_index() == 0:
    with hf_lib.atomic_dir(out_dir, overwrite=True) as tmp:
      kind, _, src = config.init_from.partition(":")
      if kind == "hf":
        hf_lib.copy_tokenizer_files(src, tmp)  # tokenizer.json etc. of the base model, when there
      hf_lib.save_hf(jax.tree.map(np.asarray, host), model_config_from(config), tmp)
      shutil.copyfile(config.data.tokenizer, os.path.join(tmp, "tokenizer.model"))
  return out_dir


def _to_host(tree):
  """Fully-addressable numpy copies of (possibly multi-host sharded) arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


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
  from grit_jax import data as data_lib

  t = config.train
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  config_json = _config_json(config)
  if primary:
    atomic_write(os.path.join(workdir, "config.json"), lambda f: json.dump(config_json, f, indent=2))

  run = Run(config)
  ckpt = ckpt_lib.Checkpointer(t.checkpoint_dir or workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  start = ckpt.latest_step()
  data_state = None
  if start is not None:
    state, data_state, meta = ckpt.restore(start, run.abstract_state())
    _warn_config_changes(meta.get("config", {}), config_json)
  else:
    start = 0
    state = run.init_state()
    if config.init_from:
      state = _init_from(run, state, config.init_from)

  it = data_lib.make_train_iterator(config.data, shard_index=jax.process_index(), num_shards=jax.process_count())
  if data_state is not None:
    it.set_state(data_state)

  log = metrics_log.MetricsLog(workdir, enabled=primary, resume_step=start)
  stop = min(t.stop_after or t.steps, t.steps)
  flops = _step_flops(config)
  peak = flops_lib.peak_flops(jax.devices())
  bar = None
  if progress and primary and stop > start:
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True)

  last_saved = start if start else None
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
    if not math.isfinite(m["loss"]):
      _diverged(step, m["loss"], ckpt, last_saved, log, bar)
    last_metrics = m
    if step % t.log_every == 0 or step == stop:
      dt = time.perf_counter() - window["t"]
      m = dict(m)
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
  try:
    for step in range(start + 1, stop + 1):
      batch_np = next(it)
      step_data_state = it.get_state()
      batch = data_lib.to_global_batch(batch_np, run.mesh)
      state, metrics = run.train_step(state, batch)
      if pending is not None:
        settle(pending)
      pending = (step, metrics)
      preempted = preemption.reached(step)
      is_last = step == stop or preempted
      if (t.save_every and step % t.save_every == 0) or is_last:
        settle(pending)
        pending = None
        if not bool(_all_finite(_params(state))):
          _diverged(step, "parameters", ckpt, last_saved, log, bar)
        ckpt.save(step, state, step_data_state, {"config": config_json, "metrics": last_metrics})
        last_saved = step
      if preempted:
        stop = step
        if primary:
          print(f"\npreempted (SIGTERM): saved step {step}; rerun the same command to resume", flush=True)
        break
      if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
        if pending is not None:
          settle(pending)
          pending = None
        ev = evaluate(run, _params(state), config)
        log.write(step, ev, prefix="eval")
        last_metrics.update({f"eval_{k}": v for k, v in ev.items()})
        if bar is not None:
          bar.write(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    final = max(stop, start)
    summary = {"step": final, "resumed_from": start, **last_metrics}
    if final == t.steps and t.export_hf:
      summary["hf"] = export_hf(_params(state), config, os.path.join(workdir, "hf"))
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


def _params(state):
  return state.params if hasattr(state, "params") else state["params"]


def _postfix(m: dict) -> str:
  parts = [f"loss {m['loss']:.4f}"]
  for k, short in (("loss_rep", "rep"), ("loss_emb", "rep"), ("loss_gen", "gen")):
    if k in m:
      parts.append(f"{short} {m[k]:.4f}")
  parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
  if math.isfinite(m["mfu"]):
    parts.append(f"MFU {m['mfu']:.1%}")
  return " ".join(parts)


def _step_flops(config) -> float:
  try:
    return flops_lib.grit_step_flops_from_config(config).total
  except Exception:  # noqa: BLE001 - throughput reporting must never stop a run
    return 0.0


def _diverged(step, value, ckpt, last_saved, log, bar):
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
  what = "the parameters became non-finite" if value == "parameters" else f"the loss is {value}"
  raise TrainingDiverged(f"training diverged at step {step}: {what}. Stopped without saving; {where}. "
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


def _init_from(run: Run, state, spec: str):
  """init_from = hf:DIR (convert Hugging Face weights) or ckpt:DIR (grit_jax checkpoint weights)."""
  kind, _, path = spec.partition(":")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _params(state))
  if kind == "hf":
    from grit_jax.convert import hf as hf_lib

    params = hf_lib.load_hf(path, run.model_config)
    params = jax.tree.map(lambda a, x: jax.device_put(np.asarray(x, a.dtype), a.sharding), abstract, params)
  elif kind == "ckpt":
    params = ckpt_lib.restore_params(path, abstract)
  else:
    raise GritJaxError(f"config.init_from={spec!r}: expected hf:DIR or ckpt:DIR")
  return state.replace(params=params) if hasattr(state, "replace") else dict(state, params=params)


def untrained_model(config):
  """The GritLM the run started from (same seed, same init), for before/after comparisons."""
  from grit_jax.inference.gritlm import GritLM

  run = Run(config)
  params = jax.tree.map(np.asarray, _to_host(_params(run.init_state())))
  return GritLM(run.model_config, params, _tokenizer(config))
