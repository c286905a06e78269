"""Test driver (not a test): `python tests/kill_during_index.py PHASE N ARGS...` runs `grit-jax index ARGS...` and
kills itself with SIGKILL at the N-th shard (1-based) of this run, at PHASE:
  write   half of the shard's bytes in its temporary file, nothing renamed
  renamed the shard renamed into place, its manifest entry not yet written
  commit  the manifest entry written (the shard is done)
The project has no kill hook of its own; this wraps the index's shard writer and manifest commit from outside."""
import os
import signal
import sys

from grit_jax.perf import host

host.prepare_cpu_host()  # before jax starts, as the CLI does

from grit_jax import cli  # noqa: E402
from grit_jax.inference import corpus_shards  # noqa: E402


def main() -> int:
  phase, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
  write_shard, commit, calls = corpus_shards._write_shard, corpus_shards._commit, []

  def die():
    os.kill(os.getpid(), signal.SIGKILL)

  def hooked_write(path, ids, emb):
    calls.append(path)
    if phase == "write" and len(calls) == n:
      with open(f"{path}.tmp{os.getpid()}", "wb") as f:
        f.write(b"\x93NUMPY" + bytes(emb.nbytes // 2))
      die()
    write_shard(path, ids, emb)
    if phase == "renamed" and len(calls) == n:
      die()

  def hooked_commit(*args):
    commit(*args)
    if phase == "commit" and len(calls) == n:
      die()

  corpus_shards._write_shard, corpus_shards._commit = hooked_write, hooked_commit
  return cli.main(["index", *argv])


if __name__ == "__main__":
  sys.exit(main())
