"""Tiny random Hugging Face models of every family saved to temporary directories (parity-test fixtures)."""
from __future__ import annotations

import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
            initializer_range=0.1, tie_word_embeddings=False)


# Each family's tiny model sets what makes it differ, so that parity fails if any of it is ignored.
FAMILY_TINY = {
    "llama": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3": dict(head_dim=24),  # head_dim independent of hidden / heads
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                      mlp_only_layers=[1]),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                        query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}
_CLASSES = {"mistral": "Mistral", "mixtral": "Mixtral", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "qwen3_moe": "Qwen3Moe", "gemma3_text": "Gemma3"}


def make_hf_model(kind: str, path, seed: int = 0, **overrides):
  """A random *ForCausalLM of `kind` (an HF model_type; float32, eval mode) saved with save_pretrained to `path`.
  Weights use std 0.1; every norm scale and bias is random too, so logits are O(1) and every tensor matters."""
  import torch
  import transformers

  kw = dict(TINY, **FAMILY_TINY.get(kind, {}))
  kw.update(overrides)
  if kind == "mistral":
    kw.setdefault("sliding_window", None)
  elif kind == "mixtral":
    kw.setdefault("num_local_experts", 4)
    kw.setdefault("num_experts_per_tok", 2)
  elif kind not in _CLASSES:
    raise ValueError(kind)
  name = _CLASSES[kind]
  config = getattr(transformers, f"{name}TextConfig" if kind == "gemma3_text" else f"{name}Config")(**kw)
  cls = getattr(transformers, f"{name}ForCausalLM")
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:  # Gemma's scale is 1 + w
        p.copy_((0.0 if kind == "gemma3_text" else 1.0) + 0.2 * torch.randn_like(p))
      elif pname.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def random_batch(rng: np.random.RandomState, lengths, vocab: int, T: int | None = None):
  """Right-padded ids [B, T] (padding ids are random too: they must not matter) and mask [B, T] int32."""
  T = T or max(lengths)
  ids = rng.randint(3, vocab, size=(len(lengths), T)).astype(np.int32)
  mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


def torch_logits(model, ids, mask=None):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long))
  return out.logits.float().numpy()


def save_matching_tokenizer(sp_model: str, path) -> None:
  """tokenizer.json + tokenizer_config.json that tokenize like grit_jax's Tokenizer on `sp_model` (a SentencePiece
  BPE model with byte fallback): HF's legacy-Llama layout, where every text segment between special tokens gets
  the "▁" dummy prefix and BOS is added. For tests that feed a directory to AutoTokenizer-based tools (the gritlm
  package); the exporter's own tokenizer.json is tested on its own."""
  import transformers
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
  from transformers.convert_slow_tokenizer import SentencePieceExtractor

  spm = SentencePieceExtractor(sp_model).extract(models.BPE)
  tok = Tokenizer(models.BPE(vocab=spm["vocab"], merges=spm["merges"], unk_token="<unk>", fuse_unk=True,
                             byte_fallback=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", spm["vocab"]["<s>"])])
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>").save_pretrained(str(path))


CHATML_TEMPLATE = (  # SmolLM2's: ChatML with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello! How are you today?",
                 "user assistant system: retrieve the answer, embed the text.", "Paris is the capital of France.",
                 "<|user|>\n<|embed|>\n<|assistant|>\n", "1234567890 !?.,;:'\"()[]{}"]


def save_chatml_tokenizer(path):
  """A tiny byte-level BPE (SmolLM2-shaped: <|endoftext|>=0 unk, <|im_start|>=1 bos, <|im_end|>=2 eos and pad, no
  BOS added, a ChatML chat template; <|begin_of_text|>=3 for Llama-3-shaped variants) saved as tokenizer.json +
  tokenizer_config.json (+ chat_template.jinja) by transformers' save_pretrained. Trains in well under a second."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CHATML_CORPUS * 4, trainer)
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
      pad_token="<|im_end|>", add_bos_token=False, chat_template=CHATML_TEMPLATE).save_pretrained(str(path))


def read_tensors(path) -> dict:
  """{name: array} over every safetensors file of a directory."""
  import os

  from safetensors import safe_open
  out = {}
  for fname in sorted(os.listdir(path)):
    if fname.endswith(".safetensors"):
      with safe_open(os.path.join(path, fname), framework="np") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out
