"""The command line of the verbs that take a recipe (`grit-jax train`, `grit-jax aot`): `--config FILE` with
`--config.KEY=VALUE` overrides (ml_collections), the verb's own flags, `--help`, and one-line errors naming the
file, line, flag or key.

  parse(verb, usage, argv, define_flags) -> (config, flag values) | None after printing --help
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import traceback

from grit_jax.errors import GritJaxError


def _config_path(argv: list[str]) -> str | None:
  path = None
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif a.startswith("--config="):
      path = a.split("=", 1)[1]
  return path


def _make_recipes_importable(file: str) -> None:
  """Recipes import their siblings and `configs.base` as `configs.<name>`. `configs` is a namespace package, so
  both the recipe's own tree and this checkout's configs/ serve it: a recipe copied elsewhere still finds base."""
  own_root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
  project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for root in (project_root, own_root):  # own_root ends up first
    if root not in sys.path:
      sys.path.insert(0, root)


def load_recipe(file: str):
  """The ConfigDict of a recipe file's get_config(); its errors become one line naming file and line."""
  from absl import flags
  from ml_collections import config_flags

  if not os.path.isfile(file):
    raise GritJaxError(f"--config {file}: no such file")
  _make_recipes_importable(file)
  try:  # config_flags' own loader (a config-file flag whose default is the file): the recipe's errors as raised
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", file, flag_values=fv, lock_config=False, sys_argv=["load_recipe"])
    config = fv["config"].value
  except SyntaxError as e:
    raise GritJaxError(f"{e.filename or file}:{e.lineno}: {e.msg} (syntax error in the recipe)") from None
  except GritJaxError:
    raise
  except Exception as e:  # noqa: BLE001 - the recipe's own code failed: show where, in one line
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(sys.prefix)]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else f"{file}: "
    raise GritJaxError(f"{where}cannot load the recipe ({type(e).__name__}: {e})") from None
  check_schema(config, file)
  return config


def _key_paths(node, prefix: str = "") -> list[str]:
  out = []
  for k in node.keys():
    v = node[k]
    out += _key_paths(v, f"{prefix}{k}.") if hasattr(v, "keys") else [prefix + k]
  return out


def _schema():
  """This checkout's configs/base.py schema, loaded by path (a recipe's own tree may shadow `configs.base`)."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")
  spec = importlib.util.spec_from_file_location("_grit_jax_schema", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check_schema(config, file: str) -> None:
  """A recipe's keys are exactly this checkout's configs/base.py keys: a key the recipe added (a typo such as
  `c.train.stepz = 3`) would be saved and ignored; one its own older base lacks would fail later as a KeyError."""
  want, got = _key_paths(_schema()), _key_paths(config)
  extra = [k for k in got if k not in set(want)]
  if extra:
    close = difflib.get_close_matches(extra[0], want, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise GritJaxError(f"--config {file}: unknown config key {extra[0]!r}{hint}; configs/base.py defines every key")
  missing = [k for k in want if k not in set(got)]
  if missing:
    base = getattr(sys.modules.get("configs.base"), "__file__", None) or "its configs/base.py"
    raise GritJaxError(f"--config {file}: config key {missing[0]!r} is missing (the recipe's base {base} is older "
                       f"than this grit_jax's configs/base.py; {len(missing)} key(s) missing)")


def get_path(config, path: str):
  """Walks a dotted key path; raises GritJaxError naming the first unknown component (with a suggestion)."""
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


def _explain(argv: list[str], file: str, usage: str, err: Exception) -> GritJaxError:
  """absl/ml_collections parse errors, rewritten to name the offending flag or config key."""
  config = load_recipe(file)
  for arg in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if m:
      get_path(config, m.group(1))
  msg = (err.args[0] if isinstance(err, KeyError) and err.args else str(err)).strip()
  m = re.search(r"Unknown command line flag '([^']+)'", msg)
  if m:
    return GritJaxError(f"unknown flag --{m.group(1)}\n{usage}")
  return GritJaxError(msg.splitlines()[0] if msg else repr(err))


def _help(verb: str, usage: str, fv, description: str) -> str:
  lines = [usage, ""] + ([description, ""] if description else []) + ["flags:"]
  for flag in sorted((fv[name] for name in set(fv) if name == fv[name].name), key=lambda f: f.name):
    default = "" if flag.default is None else f" (default: {flag.default})"
    lines.append(f"  --{flag.name}: {flag.help}{default}")
  lines += ["", "Every key of configs/base.py can be overridden: --config.SECTION.KEY=VALUE (e.g. "
            "--config.optimizer.lr=1e-4, --config.mesh.fsdp=-1); a misspelled key is an error that names it.",
            f"Recipes: configs/*.py (`grit-jax {verb} --config configs/tiny.py ...`)."]
  return "\n".join(lines)


def parse(verb: str, usage: str, argv: list[str], define_flags, description: str = ""):
  """(config, flag values) for `grit-jax <verb> argv`. define_flags(fv) adds the verb's own flags to the
  FlagValues. Returns None after printing the help for -h/--help. Bad flags/keys raise GritJaxError."""
  from absl import flags
  from ml_collections import config_flags

  argv = [f"grit-jax {verb}", *argv]
  file = _config_path(argv)
  file = file.split(":")[0] if file else None
  fv = flags.FlagValues()
  want_help = any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:])
  if file is not None and not want_help:
    load_recipe(file)  # a missing or broken recipe is named before absl reports it its own way
  config_flags.DEFINE_config_file("config", None, "recipe file (configs/*.py) whose get_config() returns the "
                                  "config", flag_values=fv, lock_config=True, sys_argv=argv)
  define_flags(fv)
  if want_help:
    print(_help(verb, usage, fv, description))
    return None
  try:
    rest = fv(argv)
    config = fv.config
  except (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError) as e:
    if file is None:
      raise GritJaxError(f"--config is required\n{usage}") from None
    raise _explain(argv, file, usage, e) from None
  if len(rest) > 1:
    raise GritJaxError(f"unexpected argument {rest[1]!r}\n{usage}")
  if config is None:
    raise GritJaxError(f"--config is required\n{usage}")
  from grit_jax import contract

  contract.check_model_overrides(config, [m.group(1) for a in argv[1:]
                                          if (m := re.match(r"^--?config\.model\.([^=]+)", a))])
  return config, fv
