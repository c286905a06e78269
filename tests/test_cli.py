"""The `grit-jax` dispatcher: help, usage errors, --version, a closed pipe, user errors reported without a traceback;
`grit-jax mteb`'s argument handling and one-line failures (no model compiled, no network)."""
import os
import subprocess
import sys

import pytest

from grit_jax import cli

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

