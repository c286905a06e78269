"""The `grit-jax` dispatcher: help, usage errors, --version, a closed pipe, user errors reported without a traceback;
`grit-jax mteb`'s argument handling and one-line failures (no model compiled, no network)."""
import os
import subprocess
import sys
import textwrap

import pytest

from grit_jax import cli
from grit_jax.errors import GritJaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert f"  {name}" in out


def test_unknown_command_is_an_error(capsys):
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err


def test_bare_command_prints_usage_and_exits_2(capsys):
  assert cli.main([]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith("usage: grit-jax <command>")


def test_version(capsys):
  from importlib import metadata
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out == f"grit-jax {metadata.version('grit_jax')}\n"


def test_console_script_installed():
  out = subprocess.run([sys.executable, "-m", "grit_jax.cli", "--help"], capture_output=True, text=True, check=True)
  assert "convert" in out.stdout


@pytest.mark.parametrize("argv", [["-h"], ["train", "--help"]])
def test_closed_pipe_is_not_a_traceback(argv):
  """`grit-jax -h | head -1`: the reader is gone before the help is written."""
  p = subprocess.Popen([sys.executable, "-m", "grit_jax.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=ENV)
  p.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
  err = p.stderr.read().decode()
  assert p.wait(timeout=60) == 141 and err == ""  # 128 + SIGPIPE, as `cat` would end


def test_mteb_help_does_not_import_mteb():
  code = textwrap.dedent("""
      import sys
      from grit_jax import cli
      try:
        cli.main(["mteb", "--help"])
      except SystemExit:
        pass
      print("mteb imported" if "mteb" in sys.modules else "mteb not imported")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
  assert "--tasks" in out.stdout and out.stdout.rstrip().endswith("mteb not imported")


def test_mteb_unknown_task_is_one_line_naming_it():
  from grit_jax.commands import mteb as mteb_cli
  with pytest.raises(GritJaxError, match=r"^unknown MTEB task 'SciFcat' \(did you mean 'SciFact'\?\), 'NoSuchTask';"):
    mteb_cli.main(["--model", "never-loaded", "--tasks", "SciFcat", "NFCorpus", "NoSuchTask"])


def test_mteb_task_needing_the_network_offline_is_one_line(tmp_path):
  """SciFact's data is not cached and the Hub is off: the real mteb/datasets failure, answered in one line."""
  code = textwrap.dedent("""
      import sys, types
      from grit_jax import cli
      from grit_jax.inference import mteb_adapter

      class Fake:  # no weights: the run ends before anything is encoded
        params, config = {}, types.SimpleNamespace(hidden_size=4)
        def weights_fingerprint(self):
          return "0" * 16

      mteb_adapter.MtebEncoder.from_pretrained = classmethod(lambda cls, d, name=None, **kw: cls(Fake(), "grit_jax/fake", **kw))
      sys.exit(cli.main(["mteb", "--model", "unused", "--tasks", "SciFact", "--cache", sys.argv[1]]))
  """)
  env = dict(ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "results")], capture_output=True, text=True,
                       env=env, timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("grit-jax mteb: error: MTEB task SciFact: its data could not be downloaded ("), last
