"""grit_jax.fileio.atomic_write: the old file survives a failed write, and no temporary file is left behind."""
import os

import pytest

from grit_jax.fileio import atomic_write


def test_atomic_write_replaces_or_keeps(tmp_path):
  path = str(tmp_path / "out.json")
  atomic_write(path, lambda f: f.write("old"))
  assert open(path).read() == "old"

  def fails(f):
    f.write("half of the new con")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    atomic_write(path, fails)
  assert open(path).read() == "old"
  assert os.listdir(tmp_path) == ["out.json"]

  atomic_write(path, lambda f: f.write(b"new"), "wb")
  assert open(path).read() == "new" and os.listdir(tmp_path) == ["out.json"]


def test_file_lock_excludes_a_second_holder_and_keeps_the_record(tmp_path):
  """fileio.file_lock (filelock under the run and tfds build locks): one holder at a time, also against a plain
  flock; the file's contents (the holder's record) survive acquire and release; 0600; a symlink is refused."""
  import fcntl
  import stat

  import filelock

  from grit_jax.errors import GritJaxError
  from grit_jax.fileio import file_lock

  path = str(tmp_path / ".x.lock")
  record, lock = file_lock(path)
  with record, lock:
    record.write('{"pid": 1}')
    record.flush()
    other_record, other = file_lock(path)
    with other_record, pytest.raises(filelock.Timeout):
      other.acquire(timeout=0)
  assert open(path).read() == '{"pid": 1}' and stat.S_IMODE(os.stat(path).st_mode) == 0o600
  with open(path) as held:
    fcntl.flock(held, fcntl.LOCK_EX)  # a holder that is not filelock (an older grit_jax)
    record, lock = file_lock(path)
    with record, pytest.raises(filelock.Timeout):
      lock.acquire(timeout=0)
  record, lock = file_lock(path)
  with record, lock:  # released: free again
    pass
  os.symlink(path, tmp_path / "link.lock")
  with pytest.raises(GritJaxError, match="symbolic link: refused"):
    file_lock(str(tmp_path / "link.lock"))
