"""The end of a run: a Hugging Face directory that GritLM.from_pretrained and transformers both load."""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from grit_jax.training import run as run_lib


def export_hf(params, config, model_config, out_dir: str) -> str:
  """Writes config.json + safetensors + tokenizer.model to `out_dir`. Collective (every process gathers the
  params); process 0 writes, atomically."""
  from grit_jax.convert import hf as hf_lib
  from grit_jax.convert import settings as settings_lib

  host = run_lib.to_host(params)
  if jax.process_index() == 0:
    with hf_lib.atomic_dir(out_dir, overwrite=True) as tmp:
      kind, _, src = config.init_from.partition(":")
      if kind == "hf":
        hf_lib.copy_tokenizer_files(os.path.expanduser(src), tmp)  # tokenizer.json etc. of the base model
      hf_lib.save_hf(jax.tree.map(np.asarray, host), model_config, tmp)
      shutil.copyfile(config.data.tokenizer, os.path.join(tmp, "tokenizer.model"))
      settings_lib.write(tmp, settings_lib.from_config(config))  # attn, pooling, ... to serve it as trained
  return out_dir
