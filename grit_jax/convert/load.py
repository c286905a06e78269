"""One loader for every model path a user gives: a GGUF file (converted once, convert.gguf), a grit_jax
directory or a Hugging Face directory (convert.hf)."""
from __future__ import annotations

import os

from grit_jax.convert import gguf, hf, jax_dir
from grit_jax.convert.tensor_files import require_dir
from grit_jax.errors import GritJaxError
from grit_jax.modeling import ModelConfig


def load_pretrained(path: str, **overrides) -> tuple[ModelConfig, dict]:
  """(config, numpy params) from an HF directory or a grit_jax directory; `overrides` replace config fields
  (e.g. dtype="bfloat16", scan_layers=True). A GGUF file loads as the directory converted from it."""
  path = require_dir(gguf.model_dir(path))
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise GritJaxError(f"{path}: no config.json")
  if hf.is_jax_dir(path):
    config, params, _ = jax_dir.load_jax(path, **overrides)
    return config, params
  config = ModelConfig.from_hf(path, **overrides)
  return config, hf.load_hf(path, config)
