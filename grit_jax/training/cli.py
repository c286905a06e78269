"""`grit-jax train`: parse an ml-collections config with command-line overrides, join the other processes of a
multi-host run, and hand over to the trainer.

  grit-jax train --config configs/tiny.py --workdir runs/tiny [--config.optimizer.lr=1e-3 ...]
  grit-jax train ... --coordinator 10.0.0.2:1234 --num_processes 2 --process_id 0    # explicit multi-process
  grit-jax train ... --distributed=yes                                                # TPU VM: from the environment

Rerunning the same command resumes from the last checkpoint in the workdir.
"""
from __future__ import annotations

import difflib
import os
import re
import sys

from grit_jax.errors import GritJaxError

USAGE = "usage: grit-jax train --config configs/RECIPE.py --workdir DIR [--config.KEY=VALUE ...]"


def _define_flags(argv: list[str]):
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "recipe file (configs/*.py) whose get_config() returns the config",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, TensorBoard events, HF export",
                      flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                    "jax.distributed.initialize: yes = always (TPU VM / Slurm: from the environment); auto = when "
                    "--coordinator is given or the environment names several workers; no = never", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs without a TPU VM)",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)", flag_values=fv)
  flags.DEFINE_boolean("progress", True, "show a progress bar (process 0 only)", flag_values=fv)
  return fv


def _get_path(config, path: str):
  """Walks a dotted path; raises GritJaxError naming the first unknown component (with a suggestion)."""
  node, done = config, []
  for part in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(done) or "the config"
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f" (did you mean {'.'.join(done + close)!r}?)" if close else ""
      raise GritJaxError(f"--config.{path}: unknown config key {'.'.join(done + [part])!r}{hint}; "
                         f"keys of {where}: {', '.join(sorted(keys))}")
    node, done = node[part], done + [part]
  return node


def _explain_parse_error(argv: list[str], config_path: str | None, err: Exception) -> GritJaxError:
  """absl/ml_collections parse errors, rewritten to name the offending flag or config key."""
  from ml_collections import config_flags

  if config_path is None:
    return GritJaxError(f"--config is required\n{USAGE}")
  if not os.path.exists(config_path.split(":")[0]):
    return GritJaxError(f"--config {config_path}: no such file")
  try:
    config = config_flags.config_flags._LoadConfigModule("config", config_path.split(":")[0]).get_config()
  except Exception as e:  # noqa: BLE001 - the config file itself is broken; show why
    return GritJaxError(f"--config {config_path}: cannot load the config ({type(e).__name__}: {e})")
  for arg in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if m:
      try:
        _get_path(config, m.group(1))
      except GritJaxError as e:
        return e
  msg = (err.args[0] if isinstance(err, KeyError) and err.args else str(err)).strip()
  m = re.search(r"Unknown command line flag '([^']+)'", msg)
  if m:
    return GritJaxError(f"unknown flag --{m.group(1)}\n{USAGE}")
  return GritJaxError(msg)


def parse_args(argv: list[str]):
  """(config ConfigDict, flag values) from the argv after `train`. Bad flags/keys raise GritJaxError."""
  from absl import flags

  argv = ["grit-jax train", *argv]
  config_path = None
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      config_path = argv[i + 1]
    elif a.startswith("--config="):
      config_path = a.split("=", 1)[1]
  if config_path is not None:
    if not os.path.exists(config_path.split(":")[0]):
      raise GritJaxError(f"--config {config_path}: no such file")
    # Recipes import their siblings as `configs.<name>`: make the folder above configs/ importable.
    root = os.path.dirname(os.path.dirname(os.path.abspath(config_path.split(":")[0])))
    if root not in sys.path:
      sys.path.insert(0, root)
  fv = _define_flags(argv)
  try:
    rest = fv(argv)
    config = fv.config
  except (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError) as e:
    raise _explain_parse_error(argv, config_path, e) from None
  if len(rest) > 1:
    raise GritJaxError(f"unexpected argument {rest[1]!r}\n{USAGE}")
  if config is None:
    raise GritJaxError(f"--config is required\n{USAGE}")
  if not fv.workdir:
    raise GritJaxError(f"--workdir is required\n{USAGE}")
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
  config, fv = parse_args(argv)
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
