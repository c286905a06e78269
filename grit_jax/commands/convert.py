"""`grit-jax convert hf-to-jax SRC DST`, `grit-jax convert jax-to-hf SRC DST`, `grit-jax convert ckpt-to-hf CKPT DST`,
`grit-jax convert gguf-to-hf FILE DST`, `grit-jax convert gguf-to-jax FILE DST`.

hf-to-jax: an HF Mistral/Mixtral directory (config.json + safetensors, sharded or not) -> a grit_jax directory
(config.json + params.safetensors). jax-to-hf: the reverse, in the HF layout transformers loads (per-expert Mixtral
names, shards + index when larger than --max-shard-size). ckpt-to-hf: the weights of a training checkpoint
(RUN/checkpoints/<step>, or RUN for its latest step) -> an HF directory, using the run's config.json. Tokenizer
files and grit_settings.json (the settings the model is served with) are copied along (a tokenizer.model or a
tokenizer.json); HF outputs also get the tokenizer.json / tokenizer_config.json and sentence-transformers files of
convert.hf_files. DST is written through a temporary directory and renamed, so a failed conversion leaves nothing
behind. gguf-to-hf / gguf-to-jax: a llama.cpp GGUF file (convert.gguf: dequantized, llama.cpp's Q/K permutation
undone, its tokenizer and chat template) -> an HF or grit_jax directory.
"""
from __future__ import annotations

import argparse

from grit_jax.data.tokenizer import Tokenizer
from grit_jax.errors import GritJaxError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="grit-jax convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="direction", required=True)
  a = sub.add_parser("hf-to-jax", help="Hugging Face directory -> grit_jax directory")
  a.add_argument("src")
  a.add_argument("dst")
  a.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="dtype of the stored params (default float32)")
  b = sub.add_parser("jax-to-hf", help="grit_jax directory -> Hugging Face directory")
  b.add_argument("src")
  b.add_argument("dst")
  c = sub.add_parser("ckpt-to-hf", help="training checkpoint (RUN/checkpoints/<step>, RUN) -> Hugging Face directory")
  c.add_argument("src", help="RUN/checkpoints/<step>, RUN/checkpoints or RUN (latest step)")
  c.add_argument("dst")
  c.add_argument("--run-config", default=None,
                 help="the run's config.json (default: found in SRC or its parent folders, as train writes it)")
  c.add_argument("--allow-unverified", action="store_true",
                 help="convert a step without grit_checksums.json (written before grit_jax checksummed its steps)")
  c.add_argument("--tokenizer", default=None,
                 help="tokenizer.model or tokenizer.json (default: the run's data.tokenizer)")
  c.add_argument("--merge", action="store_true",
                 help="LoRA run: write the base with the adapters merged into its weights (a plain model); without "
                      "it DST is an adapter directory that peft.PeftModel.from_pretrained(base, DST) loads")
  g = sub.add_parser("gguf-to-hf", help="GGUF file (llama.cpp) -> Hugging Face directory (float32)")
  g.add_argument("src")
  g.add_argument("dst")
  j = sub.add_parser("gguf-to-jax", help="GGUF file (llama.cpp) -> grit_jax directory")
  j.add_argument("src")
  j.add_argument("dst")
  j.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="dtype of the stored params (default float32)")
  for sp in (b, c):
    sp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="dtype of the written tensors (default: the dtype of the original HF checkpoint / the params)")
    sp.add_argument("--max-shard-size", default="5GB", help="split into shards above this size (default 5GB)")
  for sp in (a, b, c, g, j):
    sp.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  return p


def hf_to_jax(src: str, dst: str, param_dtype: str = "float32", overwrite: bool = False) -> str:
  from grit_jax.convert import hf, jax_dir, settings, tensor_files
  from grit_jax.modeling.config import ModelConfig
  config = ModelConfig.from_hf(tensor_files.require_dir(src), param_dtype=param_dtype)
  source_dtype = hf.hf_dtype_of(src)
  params = hf.load_hf(src, config)
  with tensor_files.atomic_dir(dst, overwrite) as tmp:
    jax_dir.save_jax(params, config, tmp, hf_dtype=source_dtype)
    hf.copy_tokenizer_files(src, tmp)
    settings.copy(src, tmp)
  return dst


def jax_to_hf(src: str, dst: str, dtype: str | None = None, max_shard_size="5GB", overwrite: bool = False) -> str:
  import os

  from grit_jax.convert import hf, jax_dir, servable, settings, tensor_files
  if not hf.is_jax_dir(tensor_files.require_dir(src)):
    raise GritJaxError(f"{src}: not a grit_jax directory (config.json with format={hf.JAX_FORMAT!r})")
  config, params, meta = jax_dir.load_jax(src)
  stated = settings.read(src) if os.path.isfile(os.path.join(src, settings.SETTINGS_FILE)) else None
  return servable.write_servable(dst, params, config, Tokenizer.from_dir(src), stated, tokenizer_files_from=src,
                                 dtype=dtype or meta.get("hf_dtype"), max_shard_size=max_shard_size,
                                 overwrite=overwrite)


def find_run_config(src: str) -> str:
  """The run's config.json for a checkpoint path: in SRC or the nearest parent folder that has one."""
  import os
  path = os.path.abspath(src)
  for _ in range(4):  # RUN/checkpoints/<step>/ -> RUN/
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
      return os.path.join(path, "config.json")
    path = os.path.dirname(path)
  raise GritJaxError(f"{src}: no run config.json in it or its parent folders (pass --run-config RUN/config.json)")


def ckpt_to_hf(src: str, dst: str, run_config: str | None = None, tokenizer: str | None = None,
               dtype: str | None = None, max_shard_size="5GB", overwrite: bool = False,
               allow_unverified: bool = False, merge: bool = False) -> str:
  import json
  import os

  import jax
  import ml_collections
  import numpy as np

  from grit_jax import contract
  from grit_jax.convert import peft_adapter, tensor_files
  from grit_jax.modeling.model import init_params
  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import export

  if not os.path.isdir(src):
    # A run keeps only its newest `train.keep_checkpoints` steps: name the ones that exist.
    parent = os.path.dirname(os.path.normpath(src)) or "."
    steps = sorted(int(n) for n in os.listdir(parent) if n.isdigit()) if os.path.isdir(parent) else []
    hint = f" (steps in {parent}: {', '.join(map(str, steps))})" if steps else ""
    raise GritJaxError(f"{src}: no such checkpoint directory{hint}")
  run_config = run_config or find_run_config(src)
  try:
    with open(run_config, encoding="utf-8") as f:
      raw = json.load(f)
    recorded = raw.pop("tokenizer_file", None)  # {"path", "sha256"}: written by runs since it was recorded
    config = ml_collections.ConfigDict(raw)
    model_config = contract.model_config(config, log=None)
    tok_path = tokenizer or (recorded["path"] if recorded else config.data.tokenizer)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
    raise GritJaxError(f"{run_config}: not a grit_jax run config ({e})") from e
  if not os.path.isfile(tok_path):
    if recorded and not tokenizer:
      raise GritJaxError(f"{run_config}: the run's tokenizer {tok_path} is gone (pass --tokenizer PATH to a copy; "
                         "its sha256 is checked)")
    raise GritJaxError(f"{run_config}: data.tokenizer={tok_path!r} does not exist here (pass --tokenizer PATH)")
  if recorded:
    from grit_jax.data.tokenizer import file_identity
    if file_identity(tok_path)["sha256"] != recorded.get("sha256"):
      raise GritJaxError(f"{tok_path}: not the tokenizer the run trained with ({recorded.get('path')}, sha256 "
                         f"{str(recorded.get('sha256'))[:16]}...): its sha256 differs")
  config.data.tokenizer = tok_path
  # Restore the params only, unsharded on one device, in the layout the run saved them (its model config).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(lambda: init_params(model_config)))
  if merge and not model_config.lora_rank:
    raise GritJaxError(f"{run_config}: --merge is for LoRA runs (model.lora_rank > 0); this run's checkpoints hold "
                       "the full weights already")
  if model_config.lora_rank:  # the checkpoint holds the adapters only
    from grit_jax.modeling import lora

    base_abstract, abstract = lora.split(abstract)
    adapters = jax.tree.map(np.asarray, ckpt_lib.restore_params(src, abstract, allow_unverified))
    if not merge:
      with tensor_files.atomic_dir(dst, overwrite) as tmp:
        peft_adapter.save_peft_adapter(adapters, model_config, tmp,
                                       base_model=contract.init_source(config.init_from)[1] if config.init_from else "")
      return dst
    base = _lora_base(config, model_config, os.path.dirname(os.path.abspath(run_config)), base_abstract,
                      allow_unverified)
    params = lora.merge(lora.combine(base, adapters), lora.scale(model_config), xp=np)
    model_config = lora.base_config(model_config)
  else:
    params = jax.tree.map(np.asarray, ckpt_lib.restore_params(src, abstract, allow_unverified))
  return export.write_run_servable(params, config, model_config, dst, dtype=dtype, max_shard_size=max_shard_size,
                                   overwrite=overwrite)


def _lora_base(config, model_config, run_dir: str, abstract, allow_unverified: bool):
  """The frozen base of a LoRA run, as numpy: from its init_from, else from RUN/lora_base (written once by train)."""
  import os

  import jax
  import numpy as np

  from grit_jax import contract
  from grit_jax.convert import hf
  from grit_jax.modeling import lora
  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import run as run_lib

  if config.init_from:
    kind, path = contract.init_source(config.init_from)
    if kind == "hf":
      return hf.load_hf(path, lora.base_config(model_config))
    return jax.tree.map(np.asarray, ckpt_lib.restore_params(path, abstract, allow_unverified))
  path = run_lib.base_dir(run_dir)
  if not os.path.isdir(path):
    raise GritJaxError(f"{path}: the LoRA run's saved base is missing (a LoRA run without init_from writes it once)")
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(path, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, model_config.lora_base_dtype, sharding=a.sharding), abstract)))


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.direction == "hf-to-jax":
    out = hf_to_jax(args.src, args.dst, args.param_dtype, args.overwrite)
  elif args.direction == "gguf-to-hf":
    from grit_jax.convert import gguf
    out = gguf.gguf_to_hf(args.src, args.dst, args.overwrite)
  elif args.direction == "gguf-to-jax":
    from grit_jax.convert import gguf
    out = hf_to_jax(gguf.model_dir(args.src), args.dst, args.param_dtype, args.overwrite)
  elif args.direction == "jax-to-hf":
    out = jax_to_hf(args.src, args.dst, args.dtype, args.max_shard_size, args.overwrite)
  else:
    out = ckpt_to_hf(args.src, args.dst, args.run_config, args.tokenizer, args.dtype, args.max_shard_size,
                     args.overwrite, args.allow_unverified, args.merge)
  print(f"wrote {out}")
  return 0
