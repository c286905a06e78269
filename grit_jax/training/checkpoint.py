"""Orbax checkpoints of a training run: sharded train state + data-iterator position + metadata, per step.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta, grit_checksums.json}`.
- state: the train state pytree (params, optimizer state, step), written by every process for its own shards.
- data:  {"process_<i>": iterator state} for every process, so each host resumes its own shard of the stream.
- meta:  {"step", "config", "process_count", ...} (JSON).
- grit_checksums.json: size and sha256 of every file of the step (orbax's own commit markers aside).

Saves are asynchronous (the step loop continues while the arrays are written) and atomic: orbax writes to
`<step>.orbax-checkpoint-tmp` and renames only when every item is complete, so a process killed mid-save leaves
the previous steps intact and the temporary folder is removed at the next start (`cleanup_tmp_directories`).
The checksums are computed by process 0 in orbax's background thread after every process has written its shards
and before that rename (`post_finalization_callback`), so every committed step carries them.

Restoring (`Checkpointer.restore_latest`) walks the steps newest first and takes the first one that is complete,
matches its checksums and the shapes of this config, and restores; each newer step is named with the reason it
failed and moved to `<workdir>/damaged_checkpoints/` (never deleted). The target's leaves carry the shardings of
the current mesh, so a checkpoint restores onto a different mesh shape than it was saved from.

The run's folders and lock: training/run_folders.py; the checksums: training/checksums.py.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from grit_jax.errors import GritJaxError
from grit_jax.training.checksums import MANIFEST, verify_manifest, write_manifest
from grit_jax.training.run_folders import allgather_json, first_error, one_line, warn

_ITEMS = ("state", "data", "meta")
_TMP = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "damaged_checkpoints"


# ---------------------------------------------------------------------------------------------------------------
# Shapes against the config

def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat_shapes(tree) -> dict[str, tuple]:
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree.leaves_with_path(tree) if hasattr(leaf, "shape")}


# What a step holds of the TrainState, as a dict: the tree every grit_jax version writes, whatever fields the state
# gains (a LoRA run's frozen base is never in a step: Run.with_base adds it after a restore).
SAVED_FIELDS = ("step", "params", "opt_state")


def _saved(state):
  """The tree a step stores of `state`: SAVED_FIELDS of a TrainState, any other tree as it is."""
  from grit_jax.training.state import TrainState
  return {f: getattr(state, f) for f in SAVED_FIELDS} if isinstance(state, TrainState) else state


def _shape_mismatch(state_dir: str, abstract_state: Any) -> str | None:
  """None when the saved arrays have the shapes of `abstract_state`, else the first difference."""
  # The item's handler, not a Checkpointer: that one also looks for a step-level _CHECKPOINT_METADATA inside the
  # item folder (it is one level up) and logs "Metadata file does not exist" at every resume.
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
  saved = _flat_shapes(getattr(meta, "item_metadata", meta))
  want = _flat_shapes(_saved(abstract_state))
  for name, shape in want.items():
    if name not in saved:
      return f"the config has {name} {shape}, the checkpoint does not (a different model config)"
    if saved[name] != shape:
      return f"{name} was saved with shape {saved[name]}, this config needs {shape} (a different model config)"
  extra = sorted(set(saved) - set(want))
  if extra:
    return f"the checkpoint has {extra[0]} {saved[extra[0]]}, this config does not (a different model config)"
  return None


# ---------------------------------------------------------------------------------------------------------------
# The checkpointer

class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train loop."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, allow_unverified: bool = False):
    self.allow_unverified = allow_unverified
    path = os.path.join(workdir, "checkpoints")
    self.directory = path if "://" in path else os.path.abspath(path)  # gs:// etc. go to orbax as they are
    self.root = os.path.dirname(self.directory)
    self.async_save = async_save
    self._sealing: int | None = None  # the step whose save is in flight (orbax runs one at a time)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        cleanup_tmp_directories=True,
        # Always orbax's async path (it runs the checksum callback); a synchronous save waits for it.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _seal(self) -> None:
    """orbax's post-finalization callback (process 0, background thread): every process has written its shards,
    the step is not yet committed. Writes the checksums into the temporary folder, so they commit with it."""
    final = self._step_dir(self._sealing)
    tmp = final + _TMP
    write_manifest(tmp if epath.Path(tmp).exists() else final)  # object stores commit in place

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, meta: dict) -> None:
    """Starts an async save of `state` at `step`. Collective: every process calls it with its own data_state."""
    states = allgather_json(data_state)
    data = {f"process_{i}": s for i, s in enumerate(states)}
    meta = dict(meta, step=int(step), process_count=jax.process_count())
    self.wait()  # orbax would wait too; _sealing must not change under a running callback
    self._sealing = int(step)
    self.manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(_saved(state)), data=ocp.args.JsonSave(data),
                                meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    if not self.async_save:
      self.wait()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None, dict]:
    """(state on the current mesh, this process's data-iterator state, meta) of checkpoint `step`, unchecked
    (`restore_latest` checks first).

    abstract_state: pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (e.g. from `jax.eval_shape`).
    """
    restored = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(_saved(abstract_state)), data=ocp.args.JsonRestore(),
                                meta=ocp.args.JsonRestore()),
    )
    meta = dict(restored.meta)
    data = restored.data or {}
    saved_procs = int(meta.get("process_count", 1))
    if saved_procs != jax.process_count():
      # The params restore onto any mesh; the data position is per process and only carries over 1:1.
      raise GritJaxError(
          f"checkpoint {self.directory}/{step} was written by {saved_procs} processes, this run has "
          f"{jax.process_count()}: the data position cannot be carried over. Start a new workdir with "
          f"--config.init_from=ckpt:{self.directory}/{step} to keep the weights.")
    state = restored.state if _saved(abstract_state) is abstract_state else abstract_state.replace(**restored.state)
    return state, data.get(f"process_{jax.process_index()}"), meta

  def check(self, step: int, abstract_state: Any) -> str | None:
    """Why step `step` cannot be restored for `abstract_state` (None = it can, as far as checks tell): incomplete
    folder, files that differ from their checksums (each process checks its share), shapes of another config.
    Collective; every process gets the same answer."""
    d = self._step_dir(step)
    error = None
    try:
      missing = [item for item in _ITEMS if not epath.Path(d, item).exists()]
      if missing:
        error = f"incomplete step folder (no {', '.join(missing)}): not written by a finished save"
      elif epath.Path(d, MANIFEST).exists():
        error = verify_manifest(d, jax.process_index(), jax.process_count())
      elif not self.allow_unverified:  # this version seals every step it commits: a missing manifest is damage
        error = (f"no {MANIFEST}, so its files cannot be verified (a step of grit_jax before checksums: "
                 "--config.train.allow_unverified_checkpoints=True restores it anyway)")
      if error is None and not missing:
        error = _shape_mismatch(os.path.join(d, "state"), abstract_state)
    except Exception as e:  # noqa: BLE001 - a damaged step fails in the library in many ways; name the cause
      error = one_line(e)
    return first_error(error)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict | None, dict] | None:
    """(step, state, data-iterator state, meta) of the newest step that checks and restores, or None when there
    is no checkpoint. Each newer step is named with why it failed and moved to <root>/damaged_checkpoints/ (the
    run then saves those steps afresh). Raises GritJaxError when checkpoints exist and none restores."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      why = self.check(step, abstract_state)
      if why is None:
        if not epath.Path(self._step_dir(step), MANIFEST).exists():
          warn(f"checkpoint step {step} in {self.directory} has no {MANIFEST}: restoring it unverified "
                "(train.allow_unverified_checkpoints)")
        try:
          restored = self.restore(step, abstract_state)
        except GritJaxError:
          raise
        except Exception as e:  # noqa: BLE001 - see check()
          why = one_line(e)
        why = first_error(why)
      if why is None:
        if damaged:
          self._set_aside([s for s, _ in damaged])
          warn(f"resuming from step {step}, the newest intact checkpoint")
        return (step, *restored)
      damaged.append((step, why))
      warn(f"checkpoint step {step} in {self.directory} is damaged: {why}")
    if damaged:
      steps = "; ".join(f"step {s}: {why}" for s, why in damaged)
      raise GritJaxError(f"no checkpoint in {self.directory} can be restored ({steps}). Fix the config if it "
                         "changed, or move the folder away to start afresh")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps out of orbax's folder (kept for inspection), so the run can save those steps again."""
    if jax.process_index() == 0:
      dest = epath.Path(self.root, DAMAGED_DIR)
      dest.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target, n = dest / str(step), 1
        while target.exists():
          target, n = dest / f"{step}.{n}", n + 1
        epath.Path(self._step_dir(step)).rename(target)
        warn(f"moved damaged checkpoint step {step} to {target}")
    allgather_json(None)  # every process waits for the moves
    self.manager.reload()

  def delete(self, step: int) -> None:
    self.manager.delete(int(step))

  def wait(self) -> None:
    """Blocks until the save in flight is committed; a failed save (disk full, permissions) is a GritJaxError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax re-raises its background thread's error; name it in one line
      raise GritJaxError(f"saving checkpoint step {self._sealing} in {self.directory} failed: {one_line(e)}") from e

  def close(self) -> None:
    self.wait()
    self.manager.close()


def restore_params(path: str, abstract_params: Any, allow_unverified: bool = False) -> Any:
  """Params of a grit_jax checkpoint step folder (`.../checkpoints/<step>`) or run folder (latest step),
  restored onto the shardings of `abstract_params` (the `init_from=ckpt:DIR` path: weights only, new run).
  A step without grit_checksums.json is refused unless `allow_unverified`."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(os.path.join(path, "state")):
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    if not steps:
      raise GritJaxError(f"init_from=ckpt:{path}: no grit_jax checkpoint there (expected <step>/state)")
    path = os.path.join(path, str(max(steps)))
  if os.path.exists(os.path.join(path, MANIFEST)):
    why = first_error(verify_manifest(path, jax.process_index(), jax.process_count()))
    if why is not None:
      raise GritJaxError(f"init_from=ckpt:{path}: the checkpoint is damaged: {why}")
  elif not allow_unverified:
    raise GritJaxError(f"{path}: no {MANIFEST}, so its files cannot be verified (a step of grit_jax before "
                       "checksums: --config.train.allow_unverified_checkpoints=True, or ckpt-to-hf --allow-unverified, "
                       "restores it anyway)")
  # Restore only the params subtree (the optimizer state stays on disk), onto the current shardings.
  target = {"params": abstract_params}
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), target)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(path, "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError) as e:
    raise GritJaxError(f"init_from=ckpt:{path}: the saved params do not match this model config ({e})") from e
  return restored["params"]
