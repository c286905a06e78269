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
