"""The grit_jax directory format: config.json ({"format": "grit_jax", "model": ModelConfig fields, "hf_dtype"})
+ params.safetensors with '/'-joined param paths (unscanned or scanned, as the params were)."""
from __future__ import annotations

import os

import numpy as np

from grit_jax.convert.hf import JAX_FORMAT, JAX_PARAMS_FILE, param_shapes
from grit_jax.convert.tensor_files import (flatten, get_tensor, host, map_shapes, numpy_dtype, open_safetensors,
                                           require_dir, require_finite, save_safetensors, unflatten, write_sorted_json)
from grit_jax.errors import GritJaxError
from grit_jax.fileio import read_json
from grit_jax.modeling.config import ModelConfig


def save_jax(params: dict, config: ModelConfig, out_dir: str, hf_dtype: str | None = None) -> str:
  """config.json + params.safetensors ('/'-joined names) into `out_dir` (created; see `atomic_dir`)."""
  import flax.linen as nn
  os.makedirs(out_dir, exist_ok=True)
  flat = {k: np.ascontiguousarray(host(v)) for k, v in flatten(nn.meta.unbox(params)).items()}
  save_safetensors(flat, os.path.join(out_dir, JAX_PARAMS_FILE), metadata={"format": JAX_FORMAT})
  write_sorted_json(os.path.join(out_dir, "config.json"),
                    {"format": JAX_FORMAT, "model": config.to_dict(), "hf_dtype": hf_dtype or config.param_dtype})
  return out_dir


def load_jax(path: str, **overrides) -> tuple[ModelConfig, dict, dict]:
  """(config, params in config.scan_layers' layout, metadata) from a grit_jax directory."""
  from grit_jax.modeling.model import params_for
  path = require_dir(path)
  cfg_path = os.path.join(path, "config.json")
  meta = read_json(cfg_path, "the model config")
  if not isinstance(meta, dict) or meta.get("format") != JAX_FORMAT or "model" not in meta:
    raise GritJaxError(f"{cfg_path}: not a grit_jax config (expected format={JAX_FORMAT!r} and a 'model' key)")
  config = ModelConfig.from_dict({**meta["model"], **overrides}, source=cfg_path)
  pfile = os.path.join(path, JAX_PARAMS_FILE)
  if not os.path.isfile(pfile):
    raise GritJaxError(f"{path}: missing {JAX_PARAMS_FILE}")
  with open_safetensors(pfile) as f:
    flat = {k: get_tensor(f, k, pfile) for k in f.keys()}
  for k, v in flat.items():
    require_finite(v, f"{pfile}: param {k!r}")
  params = unflatten(flat)
  params = params_for(params, config)
  _check_shapes(params, config, pfile)
  dtype = np.dtype(numpy_dtype(config.param_dtype))
  params = map_shapes(params, lambda a: a if a.dtype == dtype else a.astype(dtype))
  return config, params, meta


def _check_shapes(params: dict, config: ModelConfig, source: str) -> None:
  want = flatten(param_shapes(config))
  if config.scan_layers:
    from grit_jax.modeling.model import unscan_params
    params = unscan_params(params)
  got = {k: tuple(v.shape) for k, v in flatten(params).items()}
  missing = sorted(set(want) - set(got))
  if missing:
    raise GritJaxError(f"{source}: missing param(s) {missing[:5]}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise GritJaxError(f"{source}: unexpected param(s) {extra[:5]}")
  for k in want:
    if want[k] != got[k]:
      raise GritJaxError(f"{source}: param {k!r} has shape {got[k]}, the config expects {want[k]}")
