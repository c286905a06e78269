"""GRIT on Gemma-3-12B (the family of EmbeddingGemma): the GritLM-7B paper recipe (configs/gritlm_7b.py) with the
layers unrolled: Gemma 3 interleaves 5 sliding-window (1024) layers with 1 global layer, so the layers are not
identical and nn.scan cannot stack them (scan_layers=False; compiling takes longer). Bidirectional embedding passes
keep Gemma's symmetric window on the sliding layers (as transformers' use_bidirectional_attention); generation uses
its own chat template.

  grit-jax train --config configs/gemma3_12b.py --workdir runs/gemma3_12b \\
    --config.init_from=hf:/path/to/gemma-3-12b-pt --config.data.tokenizer=/path/to/gemma-3-12b-pt \\
    --config.data.train_dir=/path/to/grit_data --config.train.checkpoint_dir=gs://BUCKET/gemma3_12b
"""
from configs import gritlm_7b


def get_config():
  c = gritlm_7b.on_backbone("gemma3_12b")
  c.model.scan_layers = False  # mixed sliding / global layers
  return c
