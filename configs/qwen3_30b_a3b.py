"""GRIT on Qwen3-30B-A3B (128 routed experts, 8 per token, every layer sparse): the GritLM-8x7B paper recipe
(configs/gritlm_8x7b.py: batch 256 + 256, "token" LM loss with lambda_gen 0.003, router load-balancing loss) with
Qwen's own router coefficient (0.001, its config.json) instead of Mixtral's 0.02: 128 experts make the Switch loss
E * sum(f * p) larger per unit of imbalance.

  grit-jax train --config configs/qwen3_30b_a3b.py --workdir runs/qwen3_30b_a3b \\
    --config.init_from=hf:/path/to/Qwen3-30B-A3B --config.data.tokenizer=/path/to/Qwen3-30B-A3B \\
    --config.data.train_dir=/path/to/grit_data --config.train.checkpoint_dir=gs://BUCKET/qwen3_30b_a3b
"""
from configs import gritlm_7b, gritlm_8x7b


def get_config():
  return gritlm_7b.on_backbone("qwen3_30b_a3b", gritlm_8x7b.get_config())
