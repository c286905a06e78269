"""Orbax checkpoints of a training run: sharded train state + data-iterator position + metadata, per step.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`.
- state: the train state pytree (params, optimizer state, step), written by every process for its own shards.
- data:  {"process_<i>": iterator state} for every process, so each host resumes its own shard of the stream.
- meta:  {"step", "config", "process_count", ...} (JSON).

Saves are asynchronous (the step loop continues while the arrays are written) and atomic: orbax writes to
`<step>.orbax-checkpoint-tmp*` and renames only when every item is complete, so a process killed mid-save leaves
the previous steps intact and the temporary folder is removed at the next start (`cleanup_tmp_directories`).
Restoring takes an abstract target whose leaves carry the shardings of the current mesh, so a checkpoint can be
restored onto a different mesh shape than it was saved from.
"""
from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from grit_jax.errors import GritJaxError

# Test hook: kill this process with SIGKILL right after the async save of this step has started (the temporary
# folder exists, nothing is committed). Used by tests/test_train_e2e.py to prove a killed save is harmless.
KILL_DURING_SAVE_ENV = "GRIT_JAX_TEST_KILL_DURING_SAVE"


def _allgather_json(obj: Any) -> list[Any]:
  """Every process's `obj` (JSON-serialisable), in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
  padded = np.zeros([n], np.uint8)  # [max bytes]
  padded[:raw.size] = raw
  lens = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)  # [P]
  rows = multihost_utils.process_allgather(padded).reshape(len(lens), n)  # [P, max bytes]
  return [json.loads(bytes(r[:k]).decode()) for r, k in zip(rows, lens)]


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train loop."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    path = os.path.join(workdir, "checkpoints")
    self.directory = path if "://" in path else os.path.abspath(path)  # gs:// etc. go to orbax as they are
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._kill_step = int(os.environ.get(KILL_DURING_SAVE_ENV, "-1"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, meta: dict) -> None:
    """Starts an async save of `state` at `step`. Collective: every process calls it with its own data_state."""
    states = _allgather_json(data_state)
    data = {f"process_{i}": s for i, s in enumerate(states)}
    meta = dict(meta, step=int(step), process_count=jax.process_count())
    self.manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    if step == self._kill_step:
      os.kill(os.getpid(), signal.SIGKILL)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None, dict]:
    """(state on the current mesh, this process's data-iterator state, meta) of checkpoint `step`.

    abstract_state: pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (e.g. from `jax.eval_shape`).
    """
    restored = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
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
    return restored.state, data.get(f"process_{jax.process_index()}"), meta

  def delete(self, step: int) -> None:
    self.manager.delete(int(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(path: str, abstract_params: Any) -> Any:
  """Params of a grit_jax checkpoint step folder (`.../checkpoints/<step>`) or run folder (latest step),
  restored onto the shardings of `abstract_params` (the `init_from=ckpt:DIR` path: weights only, new run)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(os.path.join(path, "state")):
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    if not steps:
      raise GritJaxError(f"init_from=ckpt:{path}: no grit_jax checkpoint there (expected <step>/state)")
    path = os.path.join(path, str(max(steps)))
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
