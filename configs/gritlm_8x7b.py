"""GritLM-8x7B (paper recipe, App. I): Mixtral-8x7B, unified GRIT training.

As GritLM-7B except: embedding batch 256, generative batch 256; "token" LM loss (sum of token losses / sequences)
with lambda_gen 0.003, plus the Mixtral router load-balancing loss with coefficient 0.02 on the generative pass.

  grit-jax train --config configs/gritlm_8x7b.py --workdir runs/gritlm_8x7b \\
    --config.init_from=hf:/path/to/Mixtral-8x7B-v0.1 --config.train.checkpoint_dir=gs://BUCKET/gritlm_8x7b
"""
from configs import gritlm_7b
from configs import base


def get_config():
  c = base.get_config("mixtral_8x7b")
  ref = gritlm_7b.get_config()
  # Start from the 7B recipe for every non-model setting, then apply the 8x7B differences.
  for key in ("attn", "data", "loss", "optimizer", "mesh", "train"):
    c[key] = ref[key]
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat_policy = "full"
  c.model.attention_impl = "auto"       # the target's fused kernel: splash on TPU, cuDNN on GPU (xla on CPU)
  c.model.router_aux_loss_coef = 0.02

  c.data.embedding_batch_size = 256
  c.data.generative_batch_size = 256
  c.loss.lm_loss_mode = "token"
  c.loss.lm_token_factor = 1.0
  c.loss.lambda_gen = 0.003
  c.loss.lm_loss_sub_batches = 1
  c.train.gradcache_chunk = 0           # 256 queries fit without GradCache on a v5p-256-sized slice
  return c
