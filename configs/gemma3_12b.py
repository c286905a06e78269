"""GRIT on Gemma-3-12B (the family of EmbeddingGemma): the GritLM-7B paper recipe (configs/gritlm_7b.py). Gemma 3
interleaves 5 sliding-window (1024) layers with 1 global layer; the pattern repeats every 6 layers, so the layers
are scanned as 8 blocks of 6 (ModelConfig.scan_period; unrolled, the 48 layers did not compile for TPU in 900 s).
Bidirectional embedding passes keep Gemma's symmetric window on the sliding layers (as transformers'
use_bidirectional_attention); generation uses its own chat template.

  grit-jax train --config configs/gemma3_12b.py --workdir runs/gemma3_12b \\
    --config.init_from=hf:/path/to/gemma-3-12b-pt --config.data.tokenizer=/path/to/gemma-3-12b-pt \\
    --config.data.train_dir=/path/to/grit_data --config.train.checkpoint_dir=gs://BUCKET/gemma3_12b
"""
from configs import gritlm_7b


def get_config():
  c = gritlm_7b.on_backbone("gemma3_12b")
  # nn.scan over 8 blocks of (5 sliding + 1 full) layers: compile time stays that of one block, not 48 layers
  # (the unrolled stack's TPU compile did not finish in 900 s; BENCHMARKS.md "Today's backbones")
  c.model.scan_layers = True
  return c
