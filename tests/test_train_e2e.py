"""`grit-jax train` end to end on the tiny recipe: config overrides, outputs (metrics JSONL, TensorBoard events,
orbax checkpoints, a Hugging Face export that transformers loads), resume = uninterrupted (also after kill -9 in the
middle of a save), NaN stop, and two processes x 4 devices = one process x 8 devices.

Every run is a subprocess (as a user runs it); they share a persistent compilation cache so only the first pays for
compiling the step.
"""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from grit_jax import cli
from grit_jax.errors import GritJaxError
from grit_jax.commands import train as train_cli
from grit_jax.training import metrics_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# Short sequences, small batches, save every 2 steps, log every step, eval only at the end.
TINY = ["--config", "configs/tiny.py", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        "--config.train.save_every=2", "--config.train.eval_every=0", "--config.train.keep_checkpoints=2",
        "--config.data.query_max_len=48", "--config.data.passage_max_len=32", "--config.data.generative_max_len=48",
        "--config.data.embedding_batch_size=8", "--config.data.generative_batch_size=8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


def train(workdir, *extra, env, check=True, timeout=400):
  out = subprocess.run([sys.executable, "-m", "grit_jax.cli", "train", *TINY, "--workdir", str(workdir),
                        "--noprogress", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  return out


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_log.read_metrics(str(workdir)) if r["split"] == "train"}


def ckpt_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


# --- configs ---------------------------------------------------------------------------------------------------

def test_overrides_apply(monkeypatch, tmp_path):
  monkeypatch.chdir(ROOT)
  config, fv = train_cli.parse_args(["--config", "configs/tiny.py", "--workdir", "w", "--config.optimizer.lr=1e-5",
                                     "--config.mesh.fsdp=-1", f"--config.init_from=ckpt:{tmp_path}",
                                     "--config.data.pack_generative=True"])
  assert config.optimizer.lr == 1e-5 and config.mesh.fsdp == -1 and config.init_from == f"ckpt:{tmp_path}"
  assert config.data.pack_generative is True and fv.workdir == "w"


@pytest.mark.parametrize("bad,named", [("--config.optimizer.lrr=1e-5", "optimizer.lrr"),
                                       ("--config.optimiser.lr=1e-5", "optimiser"),
                                       ("--config.train.stepz=3", "train.stepz")])
def test_misspelled_key_is_an_error_naming_it(monkeypatch, capsys, bad, named):
  monkeypatch.chdir(ROOT)
  with pytest.raises(GritJaxError, match=f"unknown config key '{named}'"):
    train_cli.parse_args(["--config", "configs/tiny.py", "--workdir", "w", bad])
  # Through the `grit-jax` dispatcher: a one-line error, exit 2, nothing trained.
  assert cli.main(["train", "--config", "configs/tiny.py", "--workdir", "w", bad]) == 2
  assert named in capsys.readouterr().err
  assert not os.path.exists(os.path.join(ROOT, "w"))


def test_bad_value_and_missing_file(monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(GritJaxError, match="optimizer.lr=fast"):
    train_cli.parse_args(["--config", "configs/tiny.py", "--workdir", "w", "--config.optimizer.lr=fast"])
  with pytest.raises(GritJaxError, match="configs/nope.py: no such file"):
    train_cli.parse_args(["--config", "configs/nope.py", "--workdir", "w"])


def test_paper_recipes(monkeypatch):
  monkeypatch.chdir(ROOT)
  c7, _ = train_cli.parse_args(["--config", "configs/gritlm_7b.py", "--workdir", "w"])
  assert (c7.optimizer.lr, c7.optimizer.warmup_ratio, c7.train.steps) == (2e-5, 0.03, 1253)
  assert (c7.data.embedding_batch_size, c7.data.generative_batch_size, c7.data.train_group_size) == (2048, 256, 2)
  assert (c7.data.query_max_len, c7.data.passage_max_len, c7.data.generative_max_len) == (256, 2048, 2048)
  assert (c7.loss.temperature, c7.loss.pooling, c7.attn, c7.loss.lm_loss_mode, c7.loss.lambda_gen) == (
      0.02, "mean", "bbcc", "mixed", 1.0)
  assert (c7.model.num_layers, c7.model.hidden_size, c7.model.num_experts) == (32, 4096, 0)
  c8, _ = train_cli.parse_args(["--config", "configs/gritlm_8x7b.py", "--workdir", "w"])
  assert (c8.data.embedding_batch_size, c8.data.generative_batch_size) == (256, 256)
  assert (c8.loss.lm_loss_mode, c8.loss.lambda_gen, c8.model.router_aux_loss_coef) == ("token", 0.003, 0.02)
  assert (c8.model.num_experts, c8.model.num_experts_per_tok, c8.optimizer.lr) == (8, 2, 2e-5)
  for name, mode in (("gritlm_7b_embedding", "embedding"), ("gritlm_7b_generative", "generative"),
                     ("gritlm_8x7b_embedding", "embedding"), ("gritlm_8x7b_generative", "generative")):
    c, _ = train_cli.parse_args(["--config", f"configs/{name}.py", "--workdir", "w"])
    assert c.data.mode == mode


# --- one run and its outputs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("full")
  FULL_RUN_OUTPUT["out"] = train(workdir, env=env)
  return workdir


FULL_RUN_OUTPUT = {}
# Third-party lines a user must never see (TensorFlow/CUDA/oneDNN/absl start-up, seqio, tfds, libtpu).
NOISE = ("oneDNN", "cuda", "CUDA", "cuInit", "absl::InitializeLog", "T5 library uses PAD_ID",
         "Using custom data configuration", "Downloading and preparing", "downloaded and prepared", "TPU", "libtpu")


@pytest.mark.slow
def test_train_prints_no_library_noise(full_run):
  out = FULL_RUN_OUTPUT["out"]
  noisy = [line for line in (out.stdout + out.stderr).splitlines() if any(n in line for n in NOISE)]
  assert noisy == [], noisy


@pytest.mark.slow
def test_first_step_says_it_is_compiling(full_run):
  err = FULL_RUN_OUTPUT["out"].stderr.splitlines()
  start = err.index("step 1: compiling the train step ...")
  assert re.fullmatch(r"step 1: train step compiled in \d+\.\d s", err[start + 1]), err
  assert sum("compiling the train step" in line for line in err) == 1  # one step shape: compiled once


@pytest.mark.slow
def test_outputs(full_run):
  records = metrics_log.read_metrics(str(full_run))
  losses = train_losses(full_run)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v) for v in losses.values())
  train_rec = [r for r in records if r["split"] == "train"][-1]
  for key in ("loss", "tokens_per_s", "mfu"):
    assert key in train_rec
  assert train_rec["tokens_per_s"] > 0
  (ev,) = [r for r in records if r["split"] == "eval"]
  assert ev["step"] == STEPS and 0.0 <= ev["retrieval_top1"] <= ev["retrieval_top5"] <= 1.0
  assert ev["lm_loss"] > 0
  tb = metrics_log.read_tb_scalars(str(full_run))
  assert [s for s, _ in tb["train/loss"]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([v for _, v in tb["train/loss"]], [losses[s] for s in range(1, STEPS + 1)], rtol=1e-6)
  (hp,) = metrics_log.read_tb_hparams(str(full_run))  # the run's config on TensorBoard's HParams dashboard
  assert hp == pytest.approx(metrics_log.flat_hparams(json.load(open(os.path.join(full_run, "config.json")))))
  assert hp["optimizer.lr"] == pytest.approx(3e-3) and hp["attn"] == "bbcc" and hp["data.pack_embedding"] is False
  assert ckpt_steps(full_run) == [4, 6]  # keep_checkpoints=2
  hf = os.path.join(full_run, "hf")
  assert {"config.json", "tokenizer.model"} <= set(os.listdir(hf))
  assert any(n.endswith(".safetensors") for n in os.listdir(hf))
  assert not [n for n in os.listdir(full_run) if ".tmp" in n]


@pytest.mark.slow
def test_hf_export_loads_in_transformers_and_gritlm(full_run):
  import torch
  import transformers

  from grit_jax import GritLM

  hf = os.path.join(full_run, "hf")
  ours = GritLM.from_pretrained(hf)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(3, theirs.config.vocab_size, size=(2, 12)).astype(np.int32)  # [B, T]
  mask = np.ones_like(ids)
  mask[1, 9:] = 0  # right padding
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(ours.logits(ids, mask, causal=True))
  np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[1, :9], ref[1, :9], atol=1e-4, rtol=1e-4)  # padded positions are undefined


# --- resume ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stop_and_rerun_equals_uninterrupted(full_run, tmp_path, env):
  out = train(tmp_path, "--config.train.stop_after=3", env=env)
  assert ckpt_steps(tmp_path) == [2, 3] and sorted(train_losses(tmp_path)) == [1, 2, 3]
  assert not os.path.exists(tmp_path / "hf")
  train(tmp_path, env=env)  # the same command as the uninterrupted run
  resumed, full = train_losses(tmp_path), train_losses(full_run)
  assert sorted(resumed) == list(range(1, STEPS + 1))  # one record per step: the rerun replaced nothing twice
  np.testing.assert_allclose([resumed[s] for s in range(1, STEPS + 1)], [full[s] for s in range(1, STEPS + 1)],
                             rtol=1e-6, atol=1e-6)
  del out


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(full_run, tmp_path, env):
  # The driver SIGKILLs the run while step 4's checksums are computed: every shard written, nothing committed.
  killed = subprocess.run([sys.executable, "tests/kill_during_save.py", "4", *TINY, "--workdir", str(tmp_path),
                           "--noprogress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert killed.returncode == -9, killed.stderr[-3000:]
  names = os.listdir(tmp_path / "checkpoints")
  assert any(n.startswith("4.") and "tmp" in n for n in names), names  # the save of step 4 was cut short
  assert ckpt_steps(tmp_path) == [2]
  rerun = train(tmp_path, env=env)
  assert "did not finish cleanly" in rerun.stderr  # the dead run's lock is taken over
  assert ckpt_steps(tmp_path) == [4, 6]
  assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
  resumed, full = train_losses(tmp_path), train_losses(full_run)
  np.testing.assert_allclose([resumed[s] for s in range(1, STEPS + 1)], [full[s] for s in range(1, STEPS + 1)],
                             rtol=1e-6, atol=1e-6)


# --- divergence ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, env):
  # Linear warmup from 0 over 3 steps: update 1 is zero (checkpoint 1 is good), update 2 is ~1e29-sized, so the
  # loss of step 3 overflows.
  out = train(tmp_path, "--config.optimizer.lr=1e30", "--config.optimizer.grad_clip=0.0",
              "--config.optimizer.warmup_ratio=0.5", "--config.train.save_every=1", env=env, check=False)
  assert out.returncode == 1, out.stderr[-3000:]
  msg = [line for line in out.stderr.splitlines() if "training diverged at step" in line]
  assert msg, out.stderr[-3000:]
  bad_step = int(msg[0].split("training diverged at step ")[1].split(":")[0])
  assert 1 < bad_step <= STEPS
  good = ckpt_steps(tmp_path)
  # The checkpoint of the step before the bad loss holds the params that produced it: not kept either.
  assert good and max(good) <= bad_step - 2
  assert f"last good checkpoint is step {max(good)}" in msg[0]
  assert not os.path.exists(tmp_path / "hf")
  # The kept checkpoint restores and holds finite parameters.
  import jax
  import orbax.checkpoint as ocp

  state = ocp.StandardCheckpointer().restore(os.path.join(tmp_path, "checkpoints", str(max(good)), "state"))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# --- multi-host ------------------------------------------------------------------------------------------------

def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(full_run, tmp_path, env):
  port = _free_port()
  env4 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, "-m", "grit_jax.cli", "train", *TINY, "--workdir", str(tmp_path),
                             "--noprogress", "--coordinator", f"localhost:{port}", "--num_processes", "2",
                             "--process_id", str(i)], cwd=ROOT, env=env4, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=500) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, o[-2000:] + e[-4000:]
  multi, single = train_losses(tmp_path), train_losses(full_run)
  assert sorted(multi) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi[s] for s in range(1, STEPS + 1)], [single[s] for s in range(1, STEPS + 1)],
                             rtol=1e-5, atol=1e-6)
  assert ckpt_steps(tmp_path) == [4, 6]
  meta = json.load(open(tmp_path / "checkpoints" / "6" / "meta" / "metadata"))  # written once, by process 0
  assert meta["process_count"] == 2


@pytest.mark.slow
def test_packed_run_equals_padded(full_run, tmp_path, env):
  """Packing changes where sequences sit, not what is trained: the 8-device run's losses and eval equal the padded
  run's."""
  out = train(tmp_path, "--config.data.pack_embedding=True", "--config.data.pack_generative=True", env=env)
  assert "packed passage: 8 units" in out.stdout
  # Each step shape (pack level) a batch takes is compiled on its first step, and says so.
  compiles = [line for line in out.stderr.splitlines() if "compiling the train step" in line]
  assert compiles and compiles[0].startswith("step 1: compiling the train step (pack level ")
  assert len(compiles) == len(set(compiles)) == len({line.split("(")[1] for line in compiles})
  packed, padded = train_losses(tmp_path), train_losses(full_run)
  np.testing.assert_allclose([packed[s] for s in range(1, STEPS + 1)], [padded[s] for s in range(1, STEPS + 1)],
                             rtol=1e-5, atol=1e-6)
  rec = {r["split"]: r for r in metrics_log.read_metrics(str(tmp_path))}
  ref = {r["split"]: r for r in metrics_log.read_metrics(str(full_run))}
  np.testing.assert_allclose(rec["eval"]["lm_loss"], ref["eval"]["lm_loss"], rtol=1e-5)
  assert 0 < rec["train"]["efficiency_passage"] <= 1


# --- init_from -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_init_from_hf_and_ckpt(full_run, monkeypatch):
  """init_from=hf:DIR converts a Hugging Face directory into the sharded state; ckpt:DIR takes a run's weights."""
  import jax

  from grit_jax.convert import hf as hf_lib
  from grit_jax.training import run as run_lib

  monkeypatch.chdir(ROOT)
  config, _ = train_cli.parse_args([*TINY, "--workdir", "unused"])
  run = run_lib.Run(config)
  state = run.init_state()
  want = hf_lib.load_hf(os.path.join(full_run, "hf"), run.model_config)  # the trained weights, numpy
  for spec in (f"hf:{full_run}/hf", f"ckpt:{full_run}"):
    got = run_lib.load_init_params(spec, run.model_config, state.params)
    flat_got, flat_want = jax.tree.leaves_with_path(got), dict(jax.tree.leaves_with_path(want))
    assert len(flat_got) == len(flat_want)
    for path, leaf in flat_got:
      assert leaf.sharding == dict(jax.tree.leaves_with_path(state.params))[path].sharding  # sharded as the init
      np.testing.assert_allclose(np.asarray(leaf), flat_want[path], rtol=0, atol=0, err_msg=f"{spec} {path}")
  with pytest.raises(GritJaxError, match="expected .*hf:DIR.*ckpt:DIR"):
    run_lib.load_init_params("gs://nope", run.model_config, state.params)


# --- damaged checkpoints: named, set aside, the newest intact one resumes ---------------------------------------

def _copy_run(full_run, dest):
  import shutil

  shutil.copytree(full_run, dest)
  return dest


def _state_file(workdir, step):
  d = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
  return os.path.join(d, sorted(os.listdir(d))[0])


def _flip_bytes(path, n=400):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(0, min(n, len(data))):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def tiny_run_config():
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    config, _ = train_cli.parse_args([*TINY, "--workdir", "unused"])
  finally:
    os.chdir(cwd)
  from grit_jax.training import run as run_lib

  return config, run_lib.Run(config)


def test_a_step_holds_the_tree_earlier_versions_wrote(tiny_run_config, tmp_path):
  """A step stores {step, params, opt_state} whatever fields TrainState gains (LoRA's `frozen`), so checkpoints of
  earlier grit_jax versions restore: a TrainState with a new field as the restore target failed on them with
  "tree structures do not match". Written here as those versions wrote it (orbax, the three fields), restored
  through the Checkpointer."""
  import jax
  import orbax.checkpoint as ocp

  from grit_jax.training import checkpoint as ckpt_lib

  _, run = tiny_run_config
  state = run.init_state()
  old = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  with ocp.CheckpointManager(str(tmp_path / "checkpoints")) as manager:  # a step's items: state / data / meta
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(old), data=ocp.args.JsonSave({}),
                                            meta=ocp.args.JsonSave({"step": 3, "process_count": 1})))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False, allow_unverified=True)  # no checksums
  step, restored, _, _ = ckpt.restore_latest(run.abstract_state())
  assert step == 3 and restored.frozen is None
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.save(4, restored.replace(step=restored.step + 1), None, {})
  with open(os.path.join(ckpt.directory, "4", "state", "_METADATA")) as f:
    saved = {eval(k)[0] for k in json.load(f)["tree_metadata"]}
  assert saved == {"step", "params", "opt_state"}


DAMAGE = {  # how the newest step (6) is damaged -> what the run must say about it
    "flipped": (lambda w: _flip_bytes(_state_file(w, 6)), "does not match its sha256"),
    "truncated": (lambda w: _truncate(_state_file(w, 6)), "bytes, "),
    "missing": (lambda w: os.remove(_state_file(w, 6)), "is missing"),
    "missing_meta": (lambda w: os.remove(os.path.join(w, "checkpoints", "6", "meta", "metadata")), "is missing"),
    "stray_folder": (lambda w: os.mkdir(os.path.join(w, "checkpoints", "8")), "incomplete step folder"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_is_named_and_the_newest_intact_restores(full_run, tmp_path, tiny_run_config,
                                                                          damage, capsys):
  from grit_jax.training import checkpoint as ckpt_lib

  workdir = _copy_run(full_run, tmp_path / "w")
  damage_fn, why = DAMAGE[damage]
  damage_fn(str(workdir))
  bad = 8 if damage == "stray_folder" else 6
  good = 6 if damage == "stray_folder" else 4
  _, run = tiny_run_config
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=2)
  try:
    step, state, data_state, meta = ckpt.restore_latest(run.abstract_state())
  finally:
    ckpt.close()
  err = capsys.readouterr().err
  assert step == good and meta["step"] == good and data_state["step"] == good
  assert f"checkpoint step {bad} in {workdir}/checkpoints is damaged: " in err and why in err, err
  assert "Traceback" not in err
  assert os.path.isdir(workdir / "damaged_checkpoints" / str(bad)) and ckpt_steps(workdir) == sorted({4, 6} - {bad})
  if damage == "flipped":  # init_from=ckpt: verifies the same checksums
    with pytest.raises(GritJaxError, match="init_from=ckpt:.* the checkpoint is damaged: .* sha256"):
      ckpt_lib.restore_params(str(workdir / "damaged_checkpoints" / "6"), state.params)
  # The restored state is the saved one, bit for bit.
  import orbax.checkpoint as ocp

  saved = ocp.StandardCheckpointer().restore(os.path.join(full_run, "checkpoints", str(good), "state"))
  for a, b in zip(jax_leaves(saved["params"]), jax_leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)


@pytest.mark.slow
def test_shape_mismatch_is_named(full_run, tmp_path, tiny_run_config, capsys):
  """A newest step written for another model shape falls back; a config that matches no step is an error listing
  every step, never a silent fresh start."""
  import jax

  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import run as run_lib

  workdir = _copy_run(full_run, tmp_path / "w")
  config, run = tiny_run_config
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=3)
  _, state, data_state, meta = ckpt.restore_latest(run.abstract_state())
  wider = jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype) if x.ndim == 2 else x,
                       jax.device_get(state))
  ckpt.save(8, wider, data_state, meta)
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=3)
  step, *_ = ckpt.restore_latest(run.abstract_state())
  ckpt.close()
  err = capsys.readouterr().err
  assert step == 6
  assert "checkpoint step 8" in err and "was saved with shape" in err and "this config needs" in err, err
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.model.intermediate_size = config.model.intermediate_size * 2
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=3)
  with pytest.raises(GritJaxError, match=r"no checkpoint in .* can be restored \(step 6: .*mlp.*step 4: "):
    ckpt.restore_latest(run_lib.Run(other).abstract_state())
  ckpt.close()
  assert ckpt_steps(workdir) == [4, 6]  # nothing moved when no step restores


@pytest.mark.slow
def test_checkpoint_without_checksums_restores_with_a_warning(full_run, tmp_path, tiny_run_config, capsys):
  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import checksums

  workdir = _copy_run(full_run, tmp_path / "w")
  os.remove(workdir / "checkpoints" / "6" / checksums.MANIFEST)  # as written by an older grit_jax
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=2, allow_unverified=True)
  step, *_ = ckpt.restore_latest(tiny_run_config[1].abstract_state())
  ckpt.close()
  assert step == 6 and "has no grit_checksums.json" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_past_a_damaged_checkpoint_equals_uninterrupted(full_run, tmp_path, env):
  workdir = _copy_run(full_run, tmp_path / "w")
  _flip_bytes(_state_file(str(workdir), 6))
  out = train(workdir, env=env)
  assert "checkpoint step 6" in out.stderr and "does not match its sha256" in out.stderr
  assert "resuming from step 4" in out.stderr
  resumed, full = train_losses(workdir), train_losses(full_run)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in range(1, STEPS + 1)], [full[s] for s in range(1, STEPS + 1)],
                             rtol=1e-6, atol=1e-6)
  assert ckpt_steps(workdir) == [4, 6] and os.path.isdir(workdir / "damaged_checkpoints" / "6")


def test_checksums_commit_with_the_step_and_a_failed_save_is_named(tmp_path, monkeypatch):
  """Fast (no training): the manifest is inside every committed step and catches a flipped byte; a save whose
  background work fails commits nothing and surfaces as one named error."""
  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import checksums

  state = {"params": {"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, "step": np.int32(1)}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(1, state, {"pos": 1}, {"note": "x"})
  step_dir = os.path.join(ckpt.directory, "1")
  manifest = json.load(open(os.path.join(step_dir, checksums.MANIFEST)))["files"]
  assert {"state/_METADATA", "meta/metadata", "data/metadata"} <= set(manifest)
  assert checksums.verify_manifest(step_dir) is None
  victim = sorted(k for k in manifest if "/d/" in k)[0]
  with open(os.path.join(step_dir, victim), "r+b") as f:
    b = f.read(1)
    f.seek(0)
    f.write(bytes([b[0] ^ 1]))
  assert checksums.verify_manifest(step_dir) == f"{victim} does not match its sha256 (corrupted bytes)"

  def disk_full(step_dir):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt_lib, "write_manifest", disk_full)
  with pytest.raises(GritJaxError, match=r"saving checkpoint step 2 in .* failed: OSError: \[Errno 28\] No space"):
    ckpt.save(2, state, {"pos": 2}, {"note": "y"})
  assert ckpt.all_steps() == [1]
  ckpt.manager.close()


def test_checkpoint_without_checksums_is_refused_unless_allowed(tmp_path, capsys):
  """Fast (no training): a step without grit_checksums.json is not restored unverified by default."""
  import jax

  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import checksums

  state = {"params": {"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, "step": np.int32(1)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(1, state, {"pos": 1}, {"note": "x"})
  ckpt.close()
  os.remove(os.path.join(ckpt.directory, "1", checksums.MANIFEST))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  with pytest.raises(GritJaxError, match=r"step 1: no grit_checksums.json.*allow_unverified_checkpoints=True") as e:
    ckpt.restore_latest(abstract)
  assert "\n" not in str(e.value)
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, allow_unverified=True)
  step, restored, data, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 1 and data == {"pos": 1} and "restoring it unverified" in capsys.readouterr().err
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  with pytest.raises(GritJaxError, match=r"1: no grit_checksums.json.*allow_unverified_checkpoints=True"):
    ckpt_lib.restore_params(os.path.join(ckpt.directory, "1"), abstract["params"])  # init_from=ckpt: too


def test_resume_prints_no_orbax_metadata_warning(tmp_path, caplog):
  """Fast: restoring a step (its checks included) logs no absl "Metadata file does not exist" warning."""
  import logging

  import jax

  from grit_jax.training import checkpoint as ckpt_lib

  state = {"params": {"w": np.ones((4, 4), np.float32)}, "step": np.int32(1)}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(1, state, {"pos": 1}, {})
  ckpt.close()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    step, *_ = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                                state))
    ckpt.close()
  assert step == 1 and "Metadata file does not exist" not in caplog.text, caplog.text


def test_ckpt_to_hf_takes_the_runs_tokenizer_from_any_folder(tmp_path, monkeypatch, capsys):
  """Fast (a tiny checkpoint, no training): the run's config.json records its tokenizer file and sha256; ckpt-to-hf
  run from another folder uses that file, not the other folder's data/tokenizer.model, and checks the hash."""
  import jax

  from grit_jax import contract
  from grit_jax.data.tokenizer import file_identity
  from grit_jax.modeling import init_params
  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import trainer

  monkeypatch.chdir(ROOT)
  config, _ = train_cli.parse_args([*TINY, "--workdir", "w"])
  model_config = contract.model_config(config, log=None)
  run = tmp_path / "run"
  ckpt = ckpt_lib.Checkpointer(str(run), keep=1, async_save=False)
  ckpt.save(1, {"params": init_params(model_config, jax.random.PRNGKey(0))}, None, {})
  ckpt.close()
  run_json = dict(trainer._config_json(config), tokenizer_file=file_identity(config.data.tokenizer))
  (run / "config.json").write_text(json.dumps(run_json))
  other = tmp_path / "elsewhere"
  (other / "data").mkdir(parents=True)
  (other / "data" / "tokenizer.model").write_bytes(b"another tokenizer")  # what a cwd-relative path would take
  monkeypatch.chdir(other)
  assert cli.main(["convert", "ckpt-to-hf", str(run / "checkpoints" / "1"), str(tmp_path / "hf")]) == 0, \
      capsys.readouterr().err
  with open(os.path.join(ROOT, "data", "tokenizer.model"), "rb") as a, open(tmp_path / "hf" / "tokenizer.model",
                                                                           "rb") as b:
    assert a.read() == b.read()
  assert cli.main(["convert", "ckpt-to-hf", str(run / "checkpoints" / "1"), str(tmp_path / "hf2"), "--tokenizer",
                   "data/tokenizer.model"]) == 2
  err = capsys.readouterr().err.strip()
  assert "data/tokenizer.model: not the tokenizer the run trained with" in err and len(err.splitlines()) == 1
  run_json["tokenizer_file"]["path"] = str(tmp_path / "moved.model")
  (run / "config.json").write_text(json.dumps(run_json))
  assert cli.main(["convert", "ckpt-to-hf", str(run / "checkpoints" / "1"), str(tmp_path / "hf3")]) == 2
  assert "the run's tokenizer" in capsys.readouterr().err and not (tmp_path / "hf3").exists()
  # A step the run no longer keeps (README's example once named one): the error lists the steps there are.
  assert cli.main(["convert", "ckpt-to-hf", str(run / "checkpoints" / "100"), str(tmp_path / "hf4")]) == 2
  assert capsys.readouterr().err.strip().endswith(f"no such checkpoint directory (steps in {run / 'checkpoints'}: 1)")


def test_metrics_log_writes_tensorboard_scalars_and_hparams(tmp_path):
  """Fast: the TensorBoard side of MetricsLog (clu's SummaryWriter) holds every scalar of metrics.jsonl, NaN kept, and
  one HParams record per (re)start with the config's flat keys and types."""
  hparams = {"optimizer": {"lr": 3e-3}, "attn": "bbcc", "data": {"pack_embedding": False, "lens": [1, 2]},
             "seed": None}
  log = metrics_log.MetricsLog(str(tmp_path), hparams=hparams)
  log.write(1, {"loss": 2.5, "tokens": 128})
  log.write(2, {"loss": float("nan")})
  log.write(2, {"lm_loss": 1.25}, prefix="eval")
  log.close()
  log = metrics_log.MetricsLog(str(tmp_path), resume_step=2, hparams=hparams)  # a restart: a second HParams record
  log.write(3, {"loss": 1.5})
  log.close()
  tb = metrics_log.read_tb_scalars(str(tmp_path))
  assert tb.keys() == {"train/loss", "train/tokens", "eval/lm_loss"}
  assert [s for s, _ in tb["train/loss"]] == [1, 2, 3] and np.isnan(tb["train/loss"][1][1])
  assert (tb["train/loss"][0][1], tb["train/loss"][2][1], tb["train/tokens"], tb["eval/lm_loss"]) == (
      2.5, 1.5, [(1, 128.0)], [(2, 1.25)])
  want = {"optimizer.lr": pytest.approx(3e-3), "attn": "bbcc", "data.pack_embedding": False, "data.lens": "[1, 2]",
          "seed": "null"}
  assert metrics_log.read_tb_hparams(str(tmp_path)) == [want, want]


def test_resume_survives_a_half_written_metrics_line(tmp_path, capsys):
  """Fast: a crash in the middle of a metrics write leaves a cut last line; the resume drops it, keeps the rest."""
  path = tmp_path / metrics_log.METRICS_FILE
  path.write_bytes(b'{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "train", "loss": 1.5}\n'
                   b'{"step": 3, "split": "tr\xc3')
  assert [r["step"] for r in metrics_log.read_metrics(str(tmp_path))] == [1, 2]
  assert "dropping a half-written last line" in capsys.readouterr().err
  log = metrics_log.MetricsLog(str(tmp_path), resume_step=2)
  log.write(3, {"loss": 1.25})
  log.close()
  assert [(r["step"], r["loss"]) for r in metrics_log.read_metrics(str(tmp_path))] == [(1, 2.0), (2, 1.5), (3, 1.25)]
  path.write_text('{"step": 1}\n{"step": 2, "spl\n{"step": 3}\n')  # damage before the end: named, not guessed
  with pytest.raises(GritJaxError, match=r"metrics.jsonl:2: not a metrics record"):
    metrics_log.read_metrics(str(tmp_path))


def test_infinite_grad_norm_stops_the_run_naming_the_last_good_step(tmp_path):
  """Fast: a finite loss with grad_norm inf (the loss 4e29 of a run on garbage) is a divergence, as a NaN loss is."""
  from grit_jax.training import trainer

  assert trainer.non_finite({"loss": 4e29, "grad_norm": 1.0}) is None
  assert trainer.non_finite({"loss": 4e29, "grad_norm": float("inf")}) == "the grad_norm is inf"
  assert trainer.non_finite({"loss": float("nan"), "grad_norm": 1.0}) == "the loss is nan"

  class Ckpt:
    directory = str(tmp_path)
    wait = lambda self: None  # noqa: E731
    all_steps = lambda self: [4]  # noqa: E731
    latest_step = lambda self: 4  # noqa: E731

  class Log:
    flush = lambda self: None  # noqa: E731

  with pytest.raises(trainer.TrainingDiverged, match=r"diverged at step 7: the grad_norm is inf \(the last good "
                                                     r"step is 6\).* last good checkpoint is step 4"):
    trainer._diverged(7, "the grad_norm is inf", Ckpt(), Log(), None)


# --- the run's folders -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused(tmp_path, env):
  from grit_jax.training import run_folders

  workdir = tmp_path / "w"
  with run_folders.claim_run(str(workdir)):  # a run in progress (this process)
    out = train(workdir, env=env, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    msg = out.stderr.strip().splitlines()[-1]
    assert msg.startswith("grit-jax train: error: ") and "is in use by another run" in msg
    assert f"pid {os.getpid()} on {socket.gethostname()}, started " in msg
    assert sorted(os.listdir(workdir)) == [".grit_jax.lock"]  # refused before any work
  # Released: a new claim succeeds without a warning.
  run_folders.claim_run(str(workdir)).release()


def test_stale_lock_is_taken_over_and_a_live_holder_is_not(tmp_path, capsys):
  from grit_jax.training import run_folders

  # A holder killed with SIGKILL: the OS dropped its flock, its pid is gone.
  code = "import os, sys; from grit_jax.training import run_folders as c; c.claim_run(sys.argv[1]); os.kill(os.getpid(), 9)"
  dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert dead.returncode == -9, dead.stderr[-2000:]
  holder = json.load(open(tmp_path / run_folders.LOCK_FILE))
  claim = run_folders.claim_run(str(tmp_path))
  assert f"pid {holder['pid']} is no longer running" in capsys.readouterr().err
  claim.release()
  # A lock file naming a live process of this host (a filesystem where flock is not shared): refused.
  with open(tmp_path / run_folders.LOCK_FILE, "w") as f:
    json.dump({"pid": os.getppid(), "host": socket.gethostname()}, f)
  with pytest.raises(GritJaxError, match="in use by another run"):
    run_folders.claim_run(str(tmp_path))


def test_lock_files_are_not_followed_nor_echoed(tmp_path, monkeypatch):
  import fcntl
  import stat

  from grit_jax.fileio import open_lock
  from grit_jax.training import run_folders

  secret = tmp_path / "secret.txt"
  secret.write_text("password=hunter2\nmore\n")
  run = tmp_path / "run"
  run.mkdir()
  os.symlink(secret, run / run_folders.LOCK_FILE)  # a lock linked to another file: refused, the file untouched
  with pytest.raises(GritJaxError, match=r"lock file is a symbolic link: refused") as e:
    run_folders.claim_run(str(run))
  assert "hunter2" not in str(e.value) and secret.read_text() == "password=hunter2\nmore\n"
  with pytest.raises(GritJaxError, match=r"symbolic link"):
    open_lock(str(run / run_folders.LOCK_FILE))  # the tfds build lock opens the same way
  os.remove(run / run_folders.LOCK_FILE)
  claim = run_folders.claim_run(str(run))
  assert stat.S_IMODE(os.stat(run / run_folders.LOCK_FILE).st_mode) == 0o600
  claim.release()
  # Held (flock) with contents that name no run: refused without echoing them.
  (run / run_folders.LOCK_FILE).write_text("password=hunter2")
  with open(run / run_folders.LOCK_FILE) as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    with pytest.raises(GritJaxError, match="in use by another run") as e:
      run_folders.claim_run(str(run))
    assert "hunter2" not in str(e.value)
    (run / run_folders.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "h", "started": "password=hunter2"}))
    with pytest.raises(GritJaxError, match="the lock file does not name it") as e:
      run_folders.claim_run(str(run))
    assert "hunter2" not in str(e.value)
    # Held by another user: the holder cannot be identified (its pid and host mean nothing here).
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(GritJaxError, match=rf"a run of another user \(uid {uid}\): the holder cannot be identified"):
      run_folders.claim_run(str(run))


# Root writes anywhere: this launcher drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set, then execs
# `grit-jax`, so the permission bits apply to the run as to any user.
AS_A_USER = """import ctypes, os, sys
if os.geteuid() == 0:
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (1, 2):
    if libc.prctl(24, cap, 0, 0, 0) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
os.execv(sys.executable, [sys.executable, "-m", "grit_jax.cli", *sys.argv[1:]])
"""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["workdir", "checkpoint_dir"])
def test_read_only_folder_is_a_one_line_error_before_training(env, which):
  import shutil
  import tempfile

  base = tempfile.mkdtemp()
  try:
    os.chmod(base, 0o777)
    ro = os.path.join(base, "ro")
    os.mkdir(ro, 0o555)
    os.chmod(ro, 0o555)
    workdir = ro if which == "workdir" else os.path.join(base, "w")
    extra = [] if which == "workdir" else [f"--config.train.checkpoint_dir={ro}"]
    out = subprocess.run([sys.executable, "-c", AS_A_USER, "train", *TINY, "--workdir", workdir, "--noprogress",
                          *extra], cwd=ROOT, env=dict(env, HOME=base, GRIT_JAX_CACHE=base), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"grit-jax train: error: {which} {ro} is not writable (Permission denied); choose another " \
                   "folder or fix its permissions", out.stderr[-2000:]
    assert os.listdir(ro) == []
  finally:
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_intermediate_checkpoint_exports_to_hf(full_run, tmp_path, capsys):
  import shutil

  from safetensors.numpy import load_file

  from grit_jax import GritLM
  hf = os.path.join(full_run, "hf")
  last = tmp_path / "step6"
  assert cli.main(["convert", "ckpt-to-hf", str(full_run / "checkpoints" / "6"), str(last)]) == 0
  # The last step's checkpoint exports exactly what the run itself exported at the end.
  ours, run_export = load_file(str(last / "model.safetensors")), load_file(os.path.join(hf, "model.safetensors"))
  assert sorted(ours) == sorted(run_export)
  for name in ours:
    np.testing.assert_array_equal(ours[name], run_export[name])
  for fname in ("tokenizer.json", "tokenizer_config.json", "modules.json", "config.json"):
    with open(last / fname) as a, open(os.path.join(hf, fname)) as b:
      assert a.read() == b.read(), fname
  # An intermediate step has other weights, and loads.
  mid = tmp_path / "step4"
  assert cli.main(["convert", "ckpt-to-hf", str(full_run / "checkpoints" / "4"), str(mid)]) == 0
  step4 = load_file(str(mid / "model.safetensors"))
  assert any(not np.array_equal(step4[n], ours[n]) for n in ours)
  assert GritLM.from_pretrained(str(mid)).logits(np.ones((1, 4), np.int32)).shape == (1, 4, 1024)
  # A checkpoint copied away from its run: the missing run config is named.
  shutil.copytree(full_run / "checkpoints" / "4", tmp_path / "lone" / "4")
  capsys.readouterr()
  assert cli.main(["convert", "ckpt-to-hf", str(tmp_path / "lone" / "4"), str(tmp_path / "x")]) == 2
  assert "no run config.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
