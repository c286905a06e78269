"""The one way grit_jax writes a servable model directory: the Hugging Face weights and config.json, the tokenizer
files, the sentence-transformers modules and grit_settings.json, atomically. The trainer's end-of-run export,
`GritLM.save_pretrained`, `convert jax-to-hf` and `convert ckpt-to-hf` all write through it, so what one of them
writes, all of them write."""
from __future__ import annotations

from grit_jax.convert import hf, hf_files
from grit_jax.convert.tensor_files import atomic_dir
from grit_jax.convert import settings as settings_lib


def write_servable(path: str, params, model_config, tokenizer, settings: settings_lib.Settings | None, *,
                   tokenizer_files_from: str | None = None, dtype: str | None = None, max_shard_size="5GB",
                   overwrite: bool = True) -> str:
  """Writes `path` (replacing it only with `overwrite`): `params` as safetensors (`dtype`, else their own),
  tokenizer files copied from `tokenizer_files_from` (the base model's tokenizer.json etc.) and those made for
  `tokenizer`, the sentence-transformers modules and grit_settings.json of `settings` (None: the directory states
  no settings, as its source did not; its modules use the defaults)."""
  with atomic_dir(path, overwrite) as tmp:
    if tokenizer_files_from:
      hf.copy_tokenizer_files(tokenizer_files_from, tmp)
    hf.save_hf(params, model_config, tmp, max_shard_size=max_shard_size, dtype=dtype)
    hf_files.write_export_files(tokenizer, tmp, model_config, settings or settings_lib.Settings())
    if settings is not None:
      settings_lib.write(tmp, settings)
  return path
