"""GRIT on Llama-3.1-8B: the GritLM-7B paper recipe (configs/gritlm_7b.py: batch 2048 queries + 256 chats, lengths
256 / 2048 / 2048, temperature 0.02, bbcc, mean pooling, lr 2e-5, packed) on Meta's Llama 3.1 8B, unchanged: the
backbone has the same width, depth and GQA as Mistral-7B (its 128k vocabulary makes the LM head 4x larger; the
generative pass's logits are computed per packed row as for Mistral).

  grit-jax train --config configs/llama3_1_8b.py --workdir runs/llama3_1_8b \\
    --config.init_from=hf:/path/to/Llama-3.1-8B --config.data.tokenizer=/path/to/Llama-3.1-8B \\
    --config.data.train_dir=/path/to/grit_data --config.train.checkpoint_dir=gs://BUCKET/llama3_1_8b
"""
from configs import gritlm_7b


def get_config():
  return gritlm_7b.on_backbone("llama3_1_8b")
