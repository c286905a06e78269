"""The end of a run: a Hugging Face directory that GritLM.from_pretrained and transformers both load."""
from __future__ import annotations

import jax
import numpy as np

from grit_jax import contract
from grit_jax.training import run as run_lib


def export_hf(params, config, model_config, out_dir: str) -> str:
  """The run's servable directory (convert.servable) at `out_dir`, with the base model's tokenizer files when it
  started from one. Collective (every process gathers the params); process 0 writes, atomically."""
  host = run_lib.to_host(params)
  if jax.process_index() == 0:
    kind, src = contract.init_source(config.init_from)
    write_run_servable(jax.tree.map(np.asarray, host), config, model_config, out_dir,
                       tokenizer_files_from=src if kind == "hf" else None)
  return out_dir


def write_run_servable(params, config, model_config, out_dir: str, **kwargs) -> str:
  """A run's weights served as trained: its tokenizer and its settings (attn, pooling, ... from the run config)."""
  from grit_jax.convert import servable
  from grit_jax.convert import settings as settings_lib
  from grit_jax.data.tokenizer import Tokenizer
  return servable.write_servable(out_dir, params, model_config, Tokenizer(config.data.tokenizer),
                                 settings_lib.from_config(config), **kwargs)
