"""GRIT on Qwen3-8B (the backbone of Qwen3-Embedding-8B): the GritLM-7B paper recipe (configs/gritlm_7b.py)
unchanged. Qwen3 has per-head q/k RMSNorm and 36 layers; generation uses its own chat template (the
tokenizer files of --config.data.tokenizer), embedding GRIT's instruction format without BOS (Qwen has none).

  grit-jax train --config configs/qwen3_8b.py --workdir runs/qwen3_8b \\
    --config.init_from=hf:/path/to/Qwen3-8B --config.data.tokenizer=/path/to/Qwen3-8B \\
    --config.data.train_dir=/path/to/grit_data --config.train.checkpoint_dir=gs://BUCKET/qwen3_8b
"""
from configs import gritlm_7b


def get_config():
  return gritlm_7b.on_backbone("qwen3_8b")
