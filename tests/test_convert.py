"""HF <-> grit_jax conversion: bit-identical round trips (single file, sharded, bf16), CLI, clear errors."""
import json
import os
import shutil

import numpy as np
import pytest

import torch
import transformers
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from helpers_hf import make_hf_model, random_batch, read_tensors, torch_logits  # noqa: E402

from grit_jax import GritLM, cli  # noqa: E402
from grit_jax.convert import hf as hf_lib  # noqa: E402
from grit_jax.convert import jax_dir as jax_dir_lib  # noqa: E402
from grit_jax.convert import tensor_files  # noqa: E402
from grit_jax.errors import GritJaxError  # noqa: E402
from grit_jax.modeling import ModelConfig  # noqa: E402
from grit_jax.modeling.model import scan_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")


def assert_same_tensors(a_dir, b_dir):
  a, b = read_tensors(a_dir), read_tensors(b_dir)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k  # bit-identical


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """kind -> (transformers model, directory); the mistral one also holds the shipped tokenizer.model (1000 pieces,
  so its vocabulary has 1024 rows: a model must hold every id its tokenizer makes)."""
  out = {}
  for kind, kw in (("mistral", dict(sliding_window=6, vocab_size=1024)), ("mixtral", {})):
    path = tmp_path_factory.mktemp(f"src_{kind}")
    out[kind] = (make_hf_model(kind, path, seed=1, **kw), str(path))
  shutil.copy(TOKENIZER, os.path.join(out["mistral"][1], "tokenizer.model"))
  return out


@pytest.fixture(scope="module")
def batch():
  return random_batch(np.random.RandomState(0), [10, 6], 256)


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_hf_to_jax_to_hf_round_trip_is_bit_identical(hf_dirs, tmp_path, batch, kind):
  model, src = hf_dirs[kind]
  config = ModelConfig.from_hf(src)
  params = hf_lib.load_hf(src, config)
  if kind == "mixtral":  # per-expert HF tensors land in the stacked [E, D, I] leaves, transposed
    with safe_open(os.path.join(src, "model.safetensors"), framework="np") as f:
      w2 = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight")  # [D, I]
    np.testing.assert_array_equal(params["layers_1"]["block_sparse_moe"]["w2"][3], w2.T)
  out = str(tmp_path / "hf")
  hf_lib.save_hf(params, config, out)
  assert_same_tensors(src, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  ids, mask = batch
  np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(model, ids, mask))
  # the written config.json describes the same model
  assert ModelConfig.from_hf(out) == config


def test_scanned_params_export_the_same_files(hf_dirs, tmp_path):
  _, src = hf_dirs["mixtral"]
  config = ModelConfig.from_hf(src, scan_layers=True)
  params = hf_lib.load_hf(src, config)
  assert params["layers"]["self_attn"]["o_proj"]["kernel"].shape == (2, 4, 16, 64)  # [L, H, Dh, D]
  hf_lib.save_hf(params, config, str(tmp_path / "out"))
  assert_same_tensors(src, str(tmp_path / "out"))
  unscanned = hf_lib.load_hf(src, config.replace(scan_layers=False))
  stacked = scan_params(unscanned, config.num_layers)
  for a, b in zip(*(tensor_files.flatten(p).items() for p in (params, stacked))):
    assert a[0] == b[0] and np.array_equal(a[1], b[1])


def test_sharded_export_loads_back_and_in_transformers(hf_dirs, tmp_path, batch):
  model, src = hf_dirs["mixtral"]
  config = ModelConfig.from_hf(src)
  params = hf_lib.load_hf(src, config)
  out = str(tmp_path / "sharded")
  hf_lib.save_hf(params, config, out, max_shard_size="150KB")
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  with open(os.path.join(out, hf_lib.INDEX_FILE)) as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in read_tensors(src).values())
  for fname in shards:  # no shard above the limit unless it holds a single bigger tensor
    with safe_open(os.path.join(out, fname), framework="np") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    assert sum(sizes) <= 150_000 or len(sizes) == 1
  assert_same_tensors(src, out)
  again = hf_lib.load_hf(out, config)  # through the index
  for (ka, a), (kb, b) in zip(tensor_files.flatten(params).items(), tensor_files.flatten(again).items()):
    assert ka == kb and np.array_equal(a, b)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(torch_logits(reloaded, *batch), torch_logits(model, *batch))


def test_cli_convert_round_trip(hf_dirs, tmp_path, batch, capsys):
  model, src = hf_dirs["mistral"]
  jax_dir, hf_dir = str(tmp_path / "jax"), str(tmp_path / "hf")
  assert cli.main(["convert", "hf-to-jax", src, jax_dir]) == 0
  assert hf_lib.is_jax_dir(jax_dir) and os.path.isfile(os.path.join(jax_dir, hf_lib.JAX_PARAMS_FILE))
  with safe_open(os.path.join(jax_dir, hf_lib.JAX_PARAMS_FILE), framework="np") as f:
    assert "layers_0/self_attn/q_proj/kernel" in f.keys()
  assert cli.main(["convert", "jax-to-hf", jax_dir, hf_dir]) == 0
  assert_same_tensors(src, hf_dir)
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # temporary directories renamed away
  # both directories load into the same model, and it matches transformers
  ids, mask = batch
  ref = torch_logits(model, ids, mask)
  for d in (jax_dir, hf_dir):
    m = GritLM.from_pretrained(d)
    assert m.config.sliding_window == 6
    got = m.logits(ids, mask)
    assert np.abs(got[mask.astype(bool)] - ref[mask.astype(bool)]).max() <= 1e-4
    assert m.grit_tokenizer is not None and os.path.isfile(os.path.join(d, "tokenizer.model"))
  # an existing destination is refused unless --overwrite
  assert cli.main(["convert", "jax-to-hf", jax_dir, hf_dir]) == 2
  assert "already exists" in capsys.readouterr().err
  assert cli.main(["convert", "jax-to-hf", jax_dir, hf_dir, "--overwrite", "--max-shard-size", "100KB"]) == 0
  assert os.path.isfile(os.path.join(hf_dir, hf_lib.INDEX_FILE))
  assert_same_tensors(src, hf_dir)


def test_bfloat16_checkpoint_round_trip(hf_dirs, tmp_path):
  model, _ = hf_dirs["mixtral"]
  src = str(tmp_path / "bf16")
  model.to(torch.bfloat16).save_pretrained(src)
  model.to(torch.float32)
  jax_dir, out = str(tmp_path / "jax"), str(tmp_path / "out")
  assert cli.main(["convert", "hf-to-jax", src, jax_dir]) == 0
  _, params, meta = jax_dir_lib.load_jax(jax_dir)
  assert meta["hf_dtype"] == "bfloat16" and params["norm"]["scale"].dtype == np.float32
  assert cli.main(["convert", "jax-to-hf", jax_dir, out]) == 0  # back in the checkpoint's own dtype
  assert_same_tensors(src, out)
  assert read_tensors(out)["lm_head.weight"].dtype.name == "bfloat16"


def test_save_pretrained_round_trip(hf_dirs, tmp_path, batch):
  _, src = hf_dirs["mixtral"]
  m = GritLM.from_pretrained(src)
  out = str(tmp_path / "saved")
  assert m.save_pretrained(out) == out
  assert_same_tensors(src, out)
  np.testing.assert_array_equal(GritLM.from_pretrained(out).logits(*batch), m.logits(*batch))


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_missing_directory_is_a_clear_cli_error(tmp_path, capsys):
  missing = str(tmp_path / "nope")
  dst = str(tmp_path / "dst")
  assert cli.main(["convert", "hf-to-jax", missing, dst]) == 2
  err = capsys.readouterr().err
  assert missing in err and "no such directory" in err
  assert not os.path.exists(dst)
  assert cli.main(["convert", "jax-to-hf", missing, dst]) == 2
  with pytest.raises(GritJaxError, match="no such directory"):
    GritLM.from_pretrained(missing)
  # A Hub name (gritlm's README passes one): the error says how to get a local directory.
  with pytest.raises(GritJaxError, match=r"^GritLM/GritLM-7B: no such directory \(grit_jax loads local directories "
                     r"only: `huggingface-cli download GritLM/GritLM-7B --local-dir ~/GritLM-7B`"):
    GritLM("GritLM/GritLM-7B")


def test_missing_tensor_names_the_tensor(hf_dirs, tmp_path, capsys):
  _, src = hf_dirs["mistral"]
  bad = _copy(src, tmp_path / "bad")
  tensors = read_tensors(bad)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(GritJaxError, match=r"missing weight tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    hf_lib.load_hf(bad)
  dst = str(tmp_path / "dst")
  assert cli.main(["convert", "hf-to-jax", bad, dst]) == 2
  assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
  assert not os.path.exists(dst) and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_shape_mismatch_names_file_and_tensor(hf_dirs, tmp_path):
  _, src = hf_dirs["mixtral"]
  bad = _copy(src, tmp_path / "bad")
  with open(os.path.join(bad, "config.json")) as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 80  # the files hold 96
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(GritJaxError, match=r"model\.safetensors: tensor 'model\.layers\.0\.block_sparse_moe\."
                                         r"experts\.0\.w1\.weight' has shape \(96, 64\).*expects \(80, 64\)"):
    hf_lib.load_hf(bad)


def test_other_bad_inputs(hf_dirs, tmp_path):
  _, src = hf_dirs["mistral"]
  bad = _copy(src, tmp_path / "extra")
  tensors = read_tensors(bad)
  tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(GritJaxError, match="unexpected tensor.*model.layers.2.mlp.up_proj.weight"):
    hf_lib.load_hf(bad)
  os.remove(os.path.join(bad, "model.safetensors"))
  with pytest.raises(GritJaxError, match="no \\*.safetensors"):
    hf_lib.load_hf(bad)
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump({"model_type": "phi3"}, f)
  with pytest.raises(GritJaxError, match="model_type=.phi3."):
    ModelConfig.from_hf(bad)
  idx = _copy(src, tmp_path / "index")
  with open(os.path.join(idx, hf_lib.INDEX_FILE), "w") as f:
    json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
  with pytest.raises(GritJaxError, match="model-00002-of-00002.safetensors"):
    hf_lib.load_hf(idx)


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors"])
def test_index_naming_shards_outside_the_folder_is_refused(hf_dirs, tmp_path, shard):
  _, src = hf_dirs["mistral"]
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.copy(os.path.join(src, "model.safetensors"), outside / "x.safetensors")
  idx = _copy(src, tmp_path / "model")
  os.remove(os.path.join(idx, "model.safetensors"))
  names = list(read_tensors(src))
  with open(os.path.join(idx, hf_lib.INDEX_FILE), "w") as f:
    json.dump({"weight_map": {n: shard for n in names}}, f)
  with pytest.raises(GritJaxError, match=rf"lists shard '{shard}', outside the model folder .*: refused"):
    hf_lib.load_hf(idx)


def test_damaged_weights_and_config_are_named(hf_dirs, tmp_path, capsys):
  """A truncated shard (header intact), a damaged params.safetensors under jax-to-hf, a config.json that is not
  UTF-8: one line naming the file, never a traceback."""
  _, src = hf_dirs["mistral"]
  cut = _copy(src, tmp_path / "cut")
  shard = os.path.join(cut, "model.safetensors")
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 1000)
  with pytest.raises(GritJaxError, match=r"model.safetensors: .*damaged|model.safetensors: unreadable"):
    hf_lib.load_hf(cut)
  jax_dir = str(tmp_path / "jax")
  assert cli.main(["convert", "hf-to-jax", src, jax_dir]) == 0
  params = os.path.join(jax_dir, hf_lib.JAX_PARAMS_FILE)
  for name, damage in (("header", lambda b: b"\xff" * 16 + b[16:]), ("data", lambda b: b[:-1000])):
    with open(params, "rb") as f:
      good = f.read()
    with open(params, "wb") as f:
      f.write(damage(good))
    assert cli.main(["convert", "jax-to-hf", jax_dir, str(tmp_path / f"out_{name}")]) == 2, name
    err = capsys.readouterr().err.strip()
    assert hf_lib.JAX_PARAMS_FILE in err and len(err.splitlines()) == 1, err
    with open(params, "wb") as f:
      f.write(good)
  latin = _copy(src, tmp_path / "latin")
  with open(os.path.join(latin, "config.json"), "ab") as f:
    f.write(b"\n\xe9\n")
  assert cli.main(["convert", "hf-to-jax", latin, str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert "config.json" in err and len(err.splitlines()) == 1, err
  with open(os.path.join(jax_dir, "config.json"), "ab") as f:
    f.write(b"\xe9")
  assert cli.main(["convert", "jax-to-hf", jax_dir, str(tmp_path / "o2")]) == 2
  err = capsys.readouterr().err.strip()
  assert "config.json" in err and len(err.splitlines()) == 1, err


def test_config_mapping():
  legacy = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0,
            "sliding_window": 4096, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5}  # GritLM-7B style
  from grit_jax.modeling import get_config
  assert ModelConfig.from_hf(legacy, dtype="bfloat16") == get_config("mistral_7b")
  mx = get_config("mixtral_8x7b", dtype="float32")
  hf_cfg = transformers.AutoConfig.for_model(**mx.to_hf_dict())
  assert type(hf_cfg).__name__ == "MixtralConfig"
  assert ModelConfig.from_hf(hf_cfg.to_dict()) == mx
  assert tensor_files.parse_size("5GB") == 5_000_000_000 and tensor_files.parse_size("2MiB") == 2 * 1024 ** 2
  with pytest.raises(GritJaxError, match="max_shard_size"):
    tensor_files.parse_size("lots")
