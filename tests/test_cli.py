"""The `grit-jax` dispatcher: help, unknown commands, and user errors reported without a traceback."""
import subprocess
import sys

from grit_jax import cli


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert f"  {name}" in out


def test_unknown_command_is_an_error(capsys):
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err


def test_console_script_installed():
  out = subprocess.run([sys.executable, "-m", "grit_jax.cli", "--help"], capture_output=True, text=True, check=True)
  assert "convert" in out.stdout
