"""Atomic file writes (a reader, or a crash, sees the old file or the new one, never half of one), JSON reads
whose failures name the file, and where grit_jax keeps its caches."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from typing import Any, Callable, IO

from grit_jax.errors import GritJaxError

CACHE_ENV = "GRIT_JAX_CACHE"  # root of grit_jax's caches (default ~/.cache/grit_jax)


def cache_dir(kind: str) -> str:
  """<root>/<kind>: tfds builds ("tfds"), models converted from GGUF files ("gguf")."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "grit_jax")
  return os.path.join(root, kind)


def read_json(path: str, what: str = "JSON") -> Any:
  """The parsed file; a missing, unreadable, non-UTF-8 or malformed one is a GritJaxError naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise GritJaxError(f"{path}: cannot read {what} ({e})") from e


def write_json(path: str, obj, *, indent: int = 2, ensure_ascii: bool = False, **dump_kwargs) -> None:
  """The one JSON writer: `obj` as UTF-8 JSON + a newline (non-ASCII characters as themselves, as transformers writes
  its files), atomically (json.dump's keyword arguments pass through)."""
  def dump(f):
    json.dump(obj, f, indent=indent, ensure_ascii=ensure_ascii, **dump_kwargs)
    f.write("\n")
  atomic_write(path, dump)


def atomic_write(path: str, write: Callable[[IO], object], mode: str = "w") -> None:
  """Calls write(f) on a temporary file beside `path` (same filesystem), then renames it over `path`; on error the
  temporary file is removed and `path` is untouched."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def open_lock(path: str) -> IO:
  """The lock file `path` opened for reading and writing (text), created 0600 and never truncated. A symlink or
  anything but a plain file is refused: a lock linked to another file would truncate it or show its contents."""
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise GritJaxError(f"{path}: the lock file is a symbolic link: refused (delete it)") from None
    if e.errno in (errno.EACCES, errno.EPERM):
      raise GritJaxError(f"{path}: cannot open the lock file ({e.strerror}): it belongs to {owner(path)}, so its "
                         "holder cannot be identified") from None
    raise GritJaxError(f"{path}: cannot open the lock file ({e.strerror})") from None
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise GritJaxError(f"{path}: the lock file is not a plain file: refused (delete it)")
  return os.fdopen(fd, "r+", encoding="utf-8", errors="replace")


def file_lock(path: str):
  """(the lock file opened as open_lock opens it, for a record of its holder; a filelock.FileLock on the same file,
  not yet held). filelock takes the OS lock (flock; dropped when the holder dies) on its own descriptor and keeps
  the file's contents; mode 0600 (no group/other write bit) keeps it on flock, never on its soft fallback, which
  would write its own marker into the file."""
  import filelock

  f = open_lock(path)  # first: a symlink or non-file is refused with its one-line error, before filelock opens it
  return f, filelock.FileLock(path, mode=0o600)


def owner(path: str) -> str:
  """'another user (uid N)' for a file another user owns, else 'this user'."""
  try:
    uid = os.stat(path, follow_symlinks=False).st_uid
  except OSError:
    return "another user"
  return "this user" if uid == os.geteuid() else f"another user (uid {uid})"


def sha256_file(path: str) -> str:
  """Hex sha256 of a local file's bytes (read in blocks, never whole)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()
