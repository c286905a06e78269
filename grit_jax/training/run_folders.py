"""A run's folders and what its processes agree on about them (collectives: every process takes the same decision).

`claim_run` guards the run's folders: they must be writable (checked before any work) and one run at a time holds
them (a lock file naming pid and host; a crashed holder's lock is taken over).
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from grit_jax.errors import GritJaxError
from grit_jax.fileio import file_lock, owner

LOCK_FILE = ".grit_jax.lock"


def allgather_json(obj: Any) -> list[Any]:
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


def first_error(error: str | None) -> str | None:
  """The first process's error (collective), so every process takes the same decision."""
  errors = allgather_json(error)
  for i, e in enumerate(errors):
    if e is not None:
      return e if len(errors) == 1 else f"(process {i}) {e}"
  return None


def warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
  """The cause of a library exception in one line (its type and first line, not the traceback)."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def is_local(path: str) -> bool:
  return "://" not in path


def _check_writable(path: str, what: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise GritJaxError(f"{what} {path} is not writable ({e.strerror or e}); choose another folder or fix its "
                       "permissions") from None


class RunLock:
  """`<dir>/.grit_jax.lock`, held (filelock: flock) for the life of a run; it records pid, host and start time so a
  refused run can say who holds it (filelock names no holder). The OS drops the flock when its holder dies; the file
  content then shows a run that did not finish cleanly, whose lock is taken over when its pid is gone from this
  host."""

  def __init__(self, folder: str):
    self.path = os.path.join(folder, LOCK_FILE)
    self._file = self._lock = None

  def acquire(self) -> str | None:
    """None, or why the folder is in use."""
    import filelock

    folder = os.path.dirname(self.path)
    f, lock = file_lock(self.path)  # both held until release
    try:
      lock.acquire(timeout=0)
    except filelock.Timeout:
      other = os.fstat(f.fileno()).st_uid != os.geteuid()
      holder = (f"a run of {owner(self.path)}: the holder cannot be identified" if other else _holder(f.read())[2])
      f.close()
      return f"{folder} is in use by another run ({holder}); wait for it to finish or use another --workdir"
    text = f.read().strip()
    if text:  # the previous run did not release it: crashed, killed, or (network filesystem) still running
      pid, host, holder = _holder(text)
      if host != socket.gethostname() or (pid != os.getpid() and _pid_alive(pid)):
        f.close()
        lock.release()
        return f"{folder} is in use by another run ({holder}); if that run has ended, delete {self.path}"
      warn(f"{self.path}: taking over the lock of a run that did not finish cleanly ({holder}; pid {pid} is no "
            "longer running)")
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
    f.flush()
    self._file, self._lock = f, lock
    return None

  def release(self) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()  # empty = released cleanly; the file stays (unlinking would race with a new holder)
      self._file.close()
      self._lock.release()  # drops the flock
      self._file = self._lock = None


def _holder(text: str) -> tuple[int, str, str]:
  """(pid, host, a description) of the run a lock file names; pid -1 when unreadable."""
  try:
    info = json.loads(text)
    pid, host, started = int(info["pid"]), str(info["host"]), str(info.get("started", "?"))
  except (ValueError, KeyError, TypeError, AttributeError):
    return -1, "", "starting" if not text.strip() else "the lock file does not name it"  # never its contents
  if not (re.fullmatch(r"[\w.-]{1,253}", host) and re.fullmatch(r"[\w :+-]{1,40}", started)):
    return -1, "", "the lock file does not name it"  # not what RunLock writes: show none of it
  return pid, host, f"pid {pid} on {host}, started {started}"


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunClaim:
  """The claim of `claim_run`: a context manager that releases the locks."""

  def __init__(self, locks: list[RunLock]):
    self.locks = locks

  def release(self) -> None:
    for lock in self.locks:
      lock.release()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def claim_run(workdir: str, checkpoint_dir: str = "") -> RunClaim:
  """Checks that the run's local folders are writable and locks them against a second run; raises GritJaxError
  (on every process) otherwise. Collective. Call before any expensive work; release when the run ends."""
  root = checkpoint_dir or workdir
  folders = [(workdir, "workdir")]
  if root != workdir:
    folders.append((root, "checkpoint_dir"))
  error, locks = None, []
  try:
    for path, what in folders:
      if is_local(path):
        _check_writable(path, what)
        ckpts = os.path.join(path, "checkpoints")
        if root == path and os.path.isdir(ckpts):
          _check_writable(ckpts, "checkpoint folder")
    if jax.process_index() == 0:  # the processes of one run share the folders: one lock per run
      for path, _ in folders:
        if is_local(path) and error is None:
          lock = RunLock(path)
          error = lock.acquire()
          if error is None:
            locks.append(lock)
  except GritJaxError as e:
    error = str(e)
  error = first_error(error)
  claim = RunClaim(locks)
  if error is not None:
    claim.release()
    raise GritJaxError(error)
  return claim
