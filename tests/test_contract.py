"""The run contract (grit_jax.contract): every bad value is a one-line error naming its key before any mesh, data or
weights; every shipped recipe validates and trains; the train/aot command lines explain themselves."""
import glob
import json
import math
import os
import shutil

import numpy as np
import pytest

from grit_jax import cli, contract
from grit_jax.errors import GritJaxError
from grit_jax.commands import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", "w"]
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("base.py"))


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
  monkeypatch.chdir(ROOT)


def parse(*overrides):
  return train_cli.parse_args([*TINY, *overrides])[0]


# --- every value checked, by name -------------------------------------------------------------------------------

@pytest.mark.parametrize("override,named", [
    ("--config.attn=bbbb", "config.attn='bbbb'"),
    ("--config.attn=bxcc", "config.attn='bxcc'"),
    ("--config.data.mode=both", "config.data.mode='both'"),
    ("--config.data.bad_input=ignore", "config.data.bad_input='ignore'"),
    ("--config.data.query_max_len=0", "config.data.query_max_len=0"),
    ("--config.data.train_group_size=0", "config.data.train_group_size=0"),
    ("--config.data.embedding_batch_size=0", "config.data.embedding_batch_size=0"),
    ("--config.data.generative_batch_size=0", "config.data.generative_batch_size=0"),
    ("--config.data.generative_max_len=4096", "config.data.generative_max_len=4096: longer than the model's "
                                              "max_position_embeddings=2048"),
    ("--config.data.passage_pack_len=32", "config.data.passage_pack_len=32: below passage_max_len"),
    ("--config.data.query_pack_rows=-1", "config.data.query_pack_rows=-1"),
    ("--config.data.pack_headroom=-0.5", "config.data.pack_headroom=-0.5"),
    ("--config.data.pack_levels=0", "config.data.pack_levels=0"),
    ("--config.loss.pooling=max", "config.loss.pooling='max'"),
    ("--config.loss.lm_loss_mode=sum", "config.loss.lm_loss_mode='sum'"),
    ("--config.loss.contrastive_grad=sum", "config.loss.contrastive_grad='sum'"),
    ("--config.loss.temperature=0", "config.loss.temperature=0"),
    ("--config.loss.lambda_gen=0", "config.loss.lambda_gen=0 with data.mode='unified'"),
    ("--config.loss.lambda_rep=-1", "config.loss.lambda_rep=-1"),
    ("--config.loss.lm_loss_sub_batches=0", "config.loss.lm_loss_sub_batches=0"),
    ("--config.loss.lm_loss_sub_batches=3", "config.loss.lm_loss_sub_batches=3: must divide"),
    ("--config.optimizer.lr=0", "config.optimizer.lr=0"),
    ("--config.optimizer.warmup_ratio=1.5", "config.optimizer.warmup_ratio=1.5"),
    ("--config.optimizer.b2=1.0", "config.optimizer.b2=1.0"),
    ("--config.optimizer.eps=0", "config.optimizer.eps=0"),
    ("--config.optimizer.lr=nan", "config.optimizer.lr=nan"),
    ("--config.train.steps=0", "config.train.steps=0"),
    ("--config.train.grad_accum=0", "config.train.grad_accum=0"),
    ("--config.train.grad_accum=3", "config.train.grad_accum=3: must divide"),
    ("--config.train.gradcache_chunk=-1", "config.train.gradcache_chunk=-1"),
    ("--config.train.gradcache_chunk=5", "config.train.gradcache_chunk=5: must divide"),
    ("--config.train.log_every=0", "config.train.log_every=0"),
    ("--config.train.keep_checkpoints=0", "config.train.keep_checkpoints=0"),
    ("--config.mesh.fsdp=0", "config.mesh.fsdp=0"),
    ("--config.model.num_heads=3", "num_heads"),
    ("--config.model.remat_policy=most", "remat_policy"),
    ("--config.model.attention_impl=flash", "attention_impl='flash'"),
    ("--config.model.moe_impl=sparse", "moe_impl='sparse'"),
    ("--config.model.rope_theta=0", "rope_theta=0"),
    ("--config.model.rope_theta=-1e4", "rope_theta=-10000"),
    ("--config.model.sliding_window=0", "sliding_window=0"),
    ("--config.mesh.dcn_fsdp=0", "config.mesh.dcn_fsdp=0"),
    ("--config.init_from=s3://bucket/model", "config.init_from='s3://bucket/model'"),
    ("--config.init_from=hf:/no/such/dir", "no such folder"),
    ("--config.data.train_dir=/no/such/dir", "config.data.train_dir='/no/such/dir'"),
    ("--config.data.tokenizer=/no/such.model", "/no/such.model"),
    ("--config.data.batching=random", "config.data.batching='random'"),
    ("--config.data.no_in_batch_negatives=('nope.jsonl',)", "'nope.jsonl' is not a file of data.train_dir"),
    ("--config.loss.matryoshka_dims=(32,16)", "config.loss.matryoshka_dims=(32, 16): must be strictly increasing"),
    ("--config.loss.matryoshka_dims=(32,128)", "128 is larger than the model's hidden size 64"),
    ("--config.loss.matryoshka_weights=(1.0,)", "1 weight(s) for 0 matryoshka_dims"),
    ("--config.loss.distill_weight=-1", "config.loss.distill_weight=-1"),
    ("--config.loss.distill_temperature=0", "config.loss.distill_temperature=0"),
    ("--config.loss.distill_weight=1.0", "no embedding file of data.train_dir='data/train' has teacher scores"),
])
def test_bad_value_is_named(override, named, capsys):
  with pytest.raises(GritJaxError, match=None) as e:
    parse(override)
  assert named in str(e.value), str(e.value)
  assert "\n" not in str(e.value)
  # Through the dispatcher: one line on stderr, exit 2, no workdir made.
  assert cli.main(["train", *TINY, override]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("grit-jax train: error:") and len(err.splitlines()) == 1
  assert not os.path.exists(os.path.join(ROOT, "w"))


def test_batch_sizes_are_checked_against_the_devices():
  c = parse("--config.data.embedding_batch_size=12")  # 12 queries do not split over 8 fsdp shards
  with pytest.raises(GritJaxError, match=r"config.data.embedding_batch_size=12: not divisible by the 8 batch shards"):
    contract.validate(c, num_devices=8, check_files=False, log=None)
  contract.validate(c, num_devices=4, check_files=False, log=None)  # 12 / 4 is fine
  c = parse("--config.train.gradcache_chunk=4")  # chunks of 4 queries cannot span 8 shards
  with pytest.raises(GritJaxError, match="GradCache chunk"):
    contract.validate(c, num_devices=8, check_files=False, log=None)
  with pytest.raises(GritJaxError, match="config.mesh"):
    contract.validate(parse("--config.mesh.data=3"), num_devices=8, check_files=False, log=None)


def test_attn_is_parsed_by_one_rule():
  assert contract.parse_attn("bbcc") == (False, False)
  assert contract.parse_attn("cccc") == (True, True)
  assert contract.parse_attn("cb") == (True, False)
  for bad in ("", "b", "bbc", "bbbb", "BBCC", None):
    with pytest.raises(GritJaxError, match="config.attn"):
      contract.parse_attn(bad)


def test_tokenizer_larger_than_the_vocabulary_is_an_error():
  # The shipped tokenizer has ~1000 pieces: a 512-row embedding table cannot hold its ids.
  with pytest.raises(GritJaxError, match=r"config.data.tokenizer=.*tokenizer.model.*pieces but the model.s "
                                         r"vocab_size is 512"):
    parse("--config.model.vocab_size=512")


def test_init_from_hf_keeps_the_source_models_hyperparameters(tmp_path):
  from grit_jax.modeling import get_config

  src = get_config("tiny_mistral", rms_norm_eps=1e-6, sliding_window=32, rope_theta=5e5,
                   max_position_embeddings=1024)
  (tmp_path / "config.json").write_text(json.dumps(src.to_hf_dict()))
  c = parse(f"--config.init_from=hf:{tmp_path}", "--config.model.dtype=bfloat16")
  said = []
  model = contract.validate(c, check_files=False, log=said.append)
  assert (model.rms_norm_eps, model.sliding_window, model.rope_theta, model.max_position_embeddings) == (
      1e-6, 32, 5e5, 1024)
  assert model.dtype == "bfloat16"  # how the run computes stays the recipe's
  assert len(said) == 1 and "rms_norm_eps=1e-05->1e-06" in said[0] and "sliding_window=None->32" in said[0]
  # The resolved model is what the run saves.
  assert contract.with_model(c, model).model.rms_norm_eps == 1e-6
  # A source that is not a supported model is named.
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}))
  with pytest.raises(GritJaxError, match="model_type='phi3'"):
    contract.validate(c, check_files=False, log=None)


def test_command_line_override_contradicting_the_loaded_backbone_is_named(tmp_path):
  from grit_jax.modeling import get_config

  (tmp_path / "config.json").write_text(json.dumps(get_config("tiny_mistral", num_layers=3).to_hf_dict()))
  with pytest.raises(GritJaxError, match=r"--config.model.num_layers=5 contradicts .*config.json \(num_layers=3\)"):
    parse(f"--config.init_from=hf:{tmp_path}", "--config.model.num_layers=5")
  # Agreeing with the source, or a compute field (how the run computes), is fine.
  assert parse(f"--config.init_from=hf:{tmp_path}", "--config.model.num_layers=3",
               "--config.model.remat_policy=full").model.num_layers == 3


def test_weights_with_nan_are_refused(tmp_path):
  from grit_jax.convert import hf as hf_lib
  from grit_jax.convert import tensor_files
  from grit_jax.modeling import get_config, init_params

  config = get_config("tiny_mistral")
  params = init_params(config)
  params = tensor_files.unflatten({k: np.array(v) for k, v in tensor_files.flatten(params).items()})
  hf_lib.save_hf(params, config, str(tmp_path / "ok"))
  hf_lib.load_hf(str(tmp_path / "ok"))  # loads
  flat = tensor_files.flatten(params)
  name = sorted(flat)[0]
  flat[name] = np.array(flat[name])
  flat[name].reshape(-1)[3] = np.nan
  hf_lib.save_hf(tensor_files.unflatten(flat), config, str(tmp_path / "nan"))
  with pytest.raises(GritJaxError, match=r"has 1 NaN/inf value\(s\).*damaged"):
    hf_lib.load_hf(str(tmp_path / "nan"))


# --- the command lines ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb,flags", [
    ("train", ["--config", "--workdir", "--distributed", "--coordinator", "--num_processes", "--process_id",
               "--progress"]),
    ("aot", ["--config", "--topology", "--num_slices", "--write_hlo"]),
])
def test_help_lists_every_flag_and_exits_0(verb, flags, capsys):
  assert cli.main([verb, "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: grit-jax {verb}")
  for flag in flags:
    line = next((l for l in out.splitlines() if l.strip().startswith(flag + ":")), None)
    assert line is not None and len(line.split(":", 1)[1].strip()) > 10, (flag, out)


def test_recipe_outside_configs_and_broken_recipe(tmp_path):
  mine = tmp_path / "elsewhere" / "my_recipe.py"
  mine.parent.mkdir()
  shutil.copy(os.path.join(ROOT, "configs", "tiny.py"), mine)
  c, _ = train_cli.parse_args(["--config", str(mine), "--workdir", "w", "--config.optimizer.lr=1e-4"])
  assert c.optimizer.lr == 1e-4 and c.data.embedding_batch_size == 16
  broken = tmp_path / "broken.py"
  broken.write_text("from configs import base\n\ndef get_config():\n  c = base.get_config(\n  return c\n")
  with pytest.raises(GritJaxError, match=rf"{broken}:\d+: .*syntax error in the recipe") as e:
    train_cli.parse_args(["--config", str(broken), "--workdir", "w"])
  assert "\n" not in str(e.value)
  failing = tmp_path / "failing.py"
  failing.write_text("from configs import base\n\ndef get_config():\n  c = base.get_config()\n  c.nope.x = 1\n"
                     "  return c\n")
  with pytest.raises(GritJaxError, match=rf"{failing}:5: cannot load the recipe"):
    train_cli.parse_args(["--config", str(failing), "--workdir", "w"])


def test_recipe_keys_are_the_schemas(tmp_path):
  typo = tmp_path / "typo.py"
  typo.write_text("from configs import base\n\ndef get_config():\n  c = base.get_config()\n  c.train.stepz = 3\n"
                  "  return c\n")
  with pytest.raises(GritJaxError, match=r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)") as e:
    train_cli.parse_args(["--config", str(typo), "--workdir", "w"])
  assert str(typo) in str(e.value) and "\n" not in str(e.value)
  # A recipe tree with its own, older configs/base.py (it lacks train.stop_after): named, not a KeyError later.
  tree = tmp_path / "tree" / "configs"
  tree.mkdir(parents=True)
  with open(os.path.join(ROOT, "configs", "base.py")) as f:
    old = f.read().replace("      stop_after=0,", "")
  (tree / "base.py").write_text(old)
  shutil.copy(os.path.join(ROOT, "configs", "tiny.py"), tree / "mine.py")
  import sys

  def forget_configs():  # as a fresh process: `configs.base` not yet imported from this checkout
    for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
      del sys.modules[name]
  forget_configs()
  try:
    with pytest.raises(GritJaxError, match=r"config key 'train.stop_after' is missing .*tree/configs/base.py") as e:
      train_cli.parse_args(["--config", str(tree / "mine.py"), "--workdir", "w"])
    assert "\n" not in str(e.value)
  finally:
    forget_configs()  # the other tests import this checkout's configs again
    sys.path[:] = [p for p in sys.path if not p.startswith(str(tmp_path))]


def test_sliding_window_can_be_overridden():
  assert parse("--config.model.sliding_window=32").model.sliding_window == 32
  assert contract.model_config(parse("--config.model.sliding_window=32"), log=None).sliding_window == 32


# --- every shipped recipe trains ----------------------------------------------------------------------------------

def shrunk(name: str):
  """The recipe with its model at the tiny shape and its batch at 8 rows; every other setting (mode, attn, pooling,
  losses, remat, scan, GradCache, sub-batches, precision) is the recipe's own."""
  import ml_collections

  from grit_jax.modeling import get_config

  c, _ = train_cli.parse_args(["--config", os.path.join(ROOT, "configs", f"{name}.py"), "--workdir", "w"])
  tiny = get_config("tiny_mixtral" if c.model.num_experts else "tiny_mistral")
  with c.unlocked():
    for f in contract.architecture_fields():
      c.model[f] = getattr(tiny, f)
    c.init_from = ""
  d = c.data
  d.train_dir, d.eval_dir, d.tokenizer = "data/train", "", "data/tokenizer.model"  # eval: test_train_e2e
  d.query_max_len, d.passage_max_len, d.generative_max_len = 48, 64, 64
  d.embedding_batch_size = 8 if d.embedding_batch_size else 0
  d.generative_batch_size = 8 if d.generative_batch_size else 0
  c.loss.lm_loss_sub_batches = math.gcd(c.loss.lm_loss_sub_batches, 8)
  t = c.train
  t.gradcache_chunk = 8 if t.gradcache_chunk else 0
  t.steps, t.log_every, t.eval_every, t.save_every, t.export_hf = 2, 1, 0, 0, False
  t.checkpoint_dir, t.async_checkpoint = "", False
  return ml_collections.ConfigDict(c.to_dict())


def _distinct_recipes() -> list[str]:
  """One recipe per distinct shrunk config: recipes that differ only in their backbone (the fields `shrunk`
  replaces, and scan_layers, which a backbone whose layer kinds do not repeat must turn off: scanned == unscanned is
  test_modeling's) train the same tiny step, so each combination of settings trains once. smollm2 is left out: its
  real model fine-tunes in tests/test_smollm2.py."""
  seen, out = set(), []
  for name in sorted(RECIPES, key=lambda n: not n.startswith(("tiny", "gritlm_"))):  # the paper's represent a group
    config = shrunk(name).to_dict()
    config.pop("init_from")
    config["model"].pop("scan_layers")
    key = json.dumps(config, sort_keys=True, default=str)
    if name != "smollm2" and key not in seen:
      seen.add(key)
      out.append(name)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", _distinct_recipes())
def test_every_recipe_trains(name, tmp_path):
  from grit_jax.training import trainer

  assert {"tiny", "gritlm_7b", "gritlm_8x7b", "gritlm_7b_embedding", "gritlm_8x7b_generative"} <= \
      set(_distinct_recipes())
  config = shrunk(name)
  summary = trainer.train(config, str(tmp_path), progress=False)
  assert summary["step"] == 2 and math.isfinite(summary["loss"])
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert not any(r.get("split") == "eval" for r in rows)  # eval_dir="" means no eval
  mode = config.data.mode
  assert ("loss_rep" in rows[-1]) == (mode != "generative") and ("loss_gen" in rows[-1]) == (mode != "embedding")


def test_train_validates_before_building_anything(tmp_path):
  """A config that parses but cannot run on this host's devices fails in train() before a mesh or a workdir."""
  from grit_jax.training import trainer

  c = parse("--config.data.embedding_batch_size=12")  # 8 fake devices
  with pytest.raises(GritJaxError, match="embedding_batch_size=12"):
    trainer.train(c, str(tmp_path / "run"), progress=False)
  assert not os.path.exists(tmp_path / "run")



def test_serving_a_model_with_a_larger_tokenizer_is_an_error(tmp_path):
  """At inference the same mismatch would give NaN embeddings with exit status 0: a named error instead."""
  from grit_jax import GritLM
  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.modeling import get_config, init_params

  config = get_config("tiny_mistral", vocab_size=512)
  with pytest.raises(GritJaxError, match=r"tokenizer .*tokenizer.model: the tokenizer has \d+ pieces but the "
                                         r"model's vocab_size is 512"):
    GritLM(config, init_params(config), Tokenizer(os.path.join(ROOT, "data", "tokenizer.model")))


def test_damaged_json_files_are_named(tmp_path):
  """A model's config.json or grit_settings.json that is not UTF-8 JSON: one error naming the file."""
  from grit_jax.convert import settings as settings_lib
  from grit_jax.modeling import ModelConfig

  (tmp_path / "config.json").write_bytes(b"\xff\xfe{not json")
  with pytest.raises(GritJaxError, match=rf"{tmp_path}/config.json: cannot read the Hugging Face config"):
    ModelConfig.from_hf(str(tmp_path))
  (tmp_path / settings_lib.SETTINGS_FILE).write_text('{"version": ')
  with pytest.raises(GritJaxError, match=rf"{settings_lib.SETTINGS_FILE}: cannot read the model's settings"):
    settings_lib.read(str(tmp_path))


def test_flop_accounting_reads_attn_by_the_same_rule():
  """A 2-letter attn (generation implied causal) is a valid run config, so the FLOP count takes it too."""
  from grit_jax import flops
  from grit_jax.modeling import get_config

  shapes = dict(query_batch=2, query_len=8, passage_batch=4, passage_len=8, gen_batch=2, gen_len=8)
  model = get_config("tiny_mistral")
  assert flops.grit_step_flops(model, attn="bb", **shapes) == flops.grit_step_flops(model, attn="bbcc", **shapes)
  assert flops.grit_step_flops(model, attn="cc", **shapes).query < flops.grit_step_flops(model, **shapes).query
