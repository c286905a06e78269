"""`grit-jax train`: parse an ml-collections config with command-line overrides, join the other processes of a
multi-host run, and hand over to the trainer.

  grit-jax train --config configs/tiny.py --workdir runs/tiny [--config.optimizer.lr=1e-3 ...]
  grit-jax train ... --coordinator 10.0.0.2:1234 --num_processes 2 --process_id 0    # explicit multi-process
  grit-jax train ... --distributed=yes                                                # TPU VM: from the environment

Rerunning the same command resumes from the last checkpoint in the workdir.
"""
from __future__ import annotations

import os
import sys

from grit_jax.errors import GritJaxError

USAGE = "usage: grit-jax train --config configs/RECIPE.py --workdir DIR [--config.KEY=VALUE ...]"


def _define_flags(fv) -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, TensorBoard events, HF export "
                      "(rerunning the same command on it resumes)", flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                    "jax.distributed.initialize: yes = always (TPU VM / Slurm: from the environment); auto = when "
                    "--coordinator is given or the environment names several workers; no = never", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs without a TPU VM)",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)", flag_values=fv)
  flags.DEFINE_boolean("progress", True, "show a progress bar (process 0 only)", flag_values=fv)


def parse_args(argv: list[str]):
  """(config ConfigDict, flag values) from the argv after `train`, or None after --help. Bad flags/keys and
  invalid values raise GritJaxError (grit_jax.contract.validate, without the device count: train() checks the
  mesh once jax knows its devices)."""
  from grit_jax import contract, recipe_flags

  parsed = recipe_flags.parse("train", USAGE, argv, _define_flags)
  if parsed is None:
    return None
  config, fv = parsed
  if not fv.workdir:
    raise GritJaxError(f"--workdir is required\n{USAGE}")
  contract.validate(config, log=None)
  return config, fv


def _env_names_several_workers() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def init_distributed(fv) -> None:
  """jax.distributed.initialize from flags (--coordinator ...) or from the environment (TPU VM workers)."""
  import jax

  explicit = fv.coordinator is not None or fv.num_processes is not None or fv.process_id is not None
  if explicit:
    if fv.coordinator is None or fv.num_processes is None or fv.process_id is None:
      raise GritJaxError("--coordinator, --num_processes and --process_id go together")
    if fv.distributed == "no":
      raise GritJaxError("--distributed=no contradicts --coordinator")
    jax.distributed.initialize(coordinator_address=fv.coordinator, num_processes=fv.num_processes,
                               process_id=fv.process_id)
  elif fv.distributed == "yes" or (fv.distributed == "auto" and _env_names_several_workers()):
    jax.distributed.initialize()


def main(argv: list[str]) -> int:
  parsed = parse_args(argv)
  if parsed is None:  # --help
    return 0
  config, fv = parsed
  init_distributed(fv)
  from grit_jax.training import trainer

  try:
    trainer.train(config, fv.workdir, progress=fv.progress)
  except trainer.TrainingDiverged as e:
    print(f"grit-jax train: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
