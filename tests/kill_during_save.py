"""Test driver (not a test): `python tests/kill_during_save.py STEP ARGS...` runs `grit-jax train ARGS...` and
kills itself with SIGKILL at the worst moment of the save of STEP: every shard written, the checksums being
computed, nothing committed. The project has no kill hook of its own; this wraps its checksum writer from outside."""
import os
import signal
import sys

from grit_jax.perf import host

host.prepare_cpu_host()  # before jax starts, as the CLI does

from grit_jax import cli  # noqa: E402
from grit_jax.training import checkpoint  # noqa: E402


def main() -> int:
  step, argv = sys.argv[1], sys.argv[2:]
  write_manifest = checkpoint.write_manifest

  def write_then_die(step_dir: str) -> None:
    if os.path.basename(step_dir).split(".")[0] == step:
      os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(step_dir)

  checkpoint.write_manifest = write_then_die
  return cli.main(["train", *argv])


if __name__ == "__main__":
  sys.exit(main())
