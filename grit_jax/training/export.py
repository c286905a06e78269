"""The end of a run: a Hugging Face directory that GritLM.from_pretrained and transformers both load."""
from __future__ import annotations


import jax
import numpy as np

from grit_jax import contract
from grit_jax.training import run as run_lib


def export_hf(params, config, model_config, out_dir: str) -> str:
  """Writes config.json + safetensors + the tokenizer and sentence-transformers files to `out_dir`. Collective
  (every process gathers the params); process 0 writes, atomically."""
  from grit_jax.convert import hf as hf_lib

  host = run_lib.to_host(params)
  if jax.process_index() == 0:
    with hf_lib.atomic_dir(out_dir, overwrite=True) as tmp:
      kind, src = contract.init_source(config.init_from)
      if kind == "hf":
        hf_lib.copy_tokenizer_files(src, tmp)  # tokenizer.json etc. of the base model
      hf_lib.save_hf(jax.tree.map(np.asarray, host), model_config, tmp)
      write_export_files(config, model_config, tmp)
  return out_dir


def write_export_files(config, model_config, out_dir: str) -> None:
  """grit_settings.json (attn, pooling, ... to serve the model as trained), then the tokenizer files and
  sentence-transformers modules made to match them (convert.hf_files)."""
  from grit_jax.convert import hf_files
  from grit_jax.convert import settings as settings_lib
  from grit_jax.data.tokenizer import Tokenizer

  settings = settings_lib.from_config(config)
  hf_files.write_export_files(Tokenizer(config.data.tokenizer), out_dir, model_config, settings)
  settings_lib.write(out_dir, settings)
