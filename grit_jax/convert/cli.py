"""`grit-jax convert hf-to-jax SRC DST` and `grit-jax convert jax-to-hf SRC DST`.

hf-to-jax: an HF Mistral/Mixtral directory (config.json + safetensors, sharded or not) -> a grit_jax directory
(config.json + params.safetensors). jax-to-hf: the reverse, in the HF layout transformers loads (per-expert Mixtral
names, shards + index when larger than --max-shard-size). Tokenizer files and grit_settings.json (the settings the
model is served with) are copied along. DST is written through a temporary directory and renamed, so a failed
conversion leaves nothing behind.
"""
from __future__ import annotations

import argparse

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
  b.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="dtype of the written tensors (default: the dtype of the original HF checkpoint)")
  b.add_argument("--max-shard-size", default="5GB", help="split into shards above this size (default 5GB)")
  for sp in (a, b):
    sp.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  return p


def hf_to_jax(src: str, dst: str, param_dtype: str = "float32", overwrite: bool = False) -> str:
  from grit_jax.convert import hf, settings
  from grit_jax.modeling.config import ModelConfig
  config = ModelConfig.from_hf(hf._require_dir(src), param_dtype=param_dtype)
  source_dtype = hf.hf_dtype_of(src)
  params = hf.load_hf(src, config)
  with hf.atomic_dir(dst, overwrite) as tmp:
    hf.save_jax(params, config, tmp, hf_dtype=source_dtype)
    hf.copy_tokenizer_files(src, tmp)
    settings.copy(src, tmp)
  return dst


def jax_to_hf(src: str, dst: str, dtype: str | None = None, max_shard_size="5GB", overwrite: bool = False) -> str:
  from grit_jax.convert import hf, settings
  if not hf.is_jax_dir(hf._require_dir(src)):
    raise GritJaxError(f"{src}: not a grit_jax directory (config.json with format={hf.JAX_FORMAT!r})")
  config, params, meta = hf.load_jax(src)
  with hf.atomic_dir(dst, overwrite) as tmp:
    hf.save_hf(params, config, tmp, max_shard_size=max_shard_size, dtype=dtype or meta.get("hf_dtype"))
    hf.copy_tokenizer_files(src, tmp)
    settings.copy(src, tmp)
  return dst


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.direction == "hf-to-jax":
    out = hf_to_jax(args.src, args.dst, args.param_dtype, args.overwrite)
  else:
    out = jax_to_hf(args.src, args.dst, args.dtype, args.max_shard_size, args.overwrite)
  print(f"wrote {out}")
  return 0
