"""The files of a Hugging Face export besides the weights, so that every tool reads the model the way grit_jax does.

- `tokenizer.json` + `tokenizer_config.json`: the SentencePiece model converted by transformers' LlamaConverter
  (legacy mode: every text segment between special tokens gets the dummy "▁" prefix, as grit_jax and the reference
  tokenize), a post-processor that adds BOS, `<unk>` (id 0, grit_jax's pad id) as the pad token, right padding (the
  embedding pass reads positions from the left) and the GritLM chat template. transformers' AutoTokenizer on the
  export gives grit_jax's ids (tests/test_interop.py). A model with its own special tokens or chat template (its
  tokenizer files say so, data.tokenizer.read_text_format) exports its tokenizer files as they are.
- sentence-transformers modules: the model, mean pooling over the text only (`include_prompt=False`: the BOS +
  instruction prompt is attended to but not pooled, as in grit_jax), L2 normalisation. GritLM embeds
  bidirectionally, so config.json says `is_causal: true` (what transformers does anyway: generation stays causal)
  and the sentence-transformers module overrides it with `is_causal: false` (transformers >= 5.2). So
  `SentenceTransformer(dir).encode(texts, prompt=gritlm_instruction(instruction))` equals
  `GritLM.encode(texts, instruction=...)`; without a prompt the model's default prompt (`<|embed|>\\n`) applies.
  Prompts `query` (GritLM's query template: the settings' query_instruction wrapped, or `<|embed|>\\n` when there is
  none, as encode_queries) and `document`: `encode_query` equals `GritLM.encode_queries`, `encode_document`
  `GritLM.encode_corpus`. The prompts leave out the BOS (the tokenizer adds it when the model has one).
  The module loads the class config.json names (`transformer_task: text-generation`, e.g. MistralForCausalLM, as
  gritlm's unified mode does) and pools its last hidden states (`hidden_states[-1]`, after the final norm): the
  bare model (`AutoModel`) would have no place for `lm_head.weight` and transformers would print a load report
  naming it UNEXPECTED at every load. Left padding (what sentence-transformers sets for that task) gives the same
  embeddings: RoPE attention depends on relative positions only, and the pooling skips the padding and the prompt.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from grit_jax import common_types
from grit_jax.convert import settings as settings_lib
from grit_jax.data import templates
from grit_jax.errors import GritJaxError
from grit_jax.fileio import write_json

log = logging.getLogger(__name__)
PAD_TOKEN = "<unk>"  # id 0 = grit_jax's Tokenizer.pad_id
ST_MAX_SEQ_LENGTH = settings_lib.GRITLM_MAX_LENGTH  # = embedding_max_len of the default settings

# The GritLM chat format of data/templates.py: `<s><|user|>\n{u}\n<|assistant|>\n{a}</s>` turns joined by "\n";
# with add_generation_prompt the prompt ends in the assistant header, as templates.chat_prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ " + json.dumps(templates.TURN_SEP) + " }}{% endif %}"
    "{{ " + json.dumps(templates.USER_BOS) + " + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ " + json.dumps(templates.ASSISTANT_BOS) + " + message['content'] | trim + eos_token }}"
    "{% else %}{{ raise_exception('GritLM chats have user and assistant messages only') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ " + json.dumps(templates.ASSISTANT_BOS) + " }}{% endif %}")
# The tokenizer files a model states its own format in, copied as they are by write_tokenizer_files.
OWN_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
             "special_tokens_map.json")


def _converted_sentencepiece(model_path: str):
  """tokenizers.Tokenizer of a SentencePiece BPE model, by transformers' LlamaConverter (legacy: Prepend("▁") +
  Replace(" ", "▁") normalizer, byte fallback). transformers 5.x's SentencePieceExtractor.extract takes the model
  class where LlamaConverter still passes the vocabulary, hence the adapter."""
  import sentencepiece as spm
  from tokenizers.models import BPE
  from transformers.convert_slow_tokenizer import LlamaConverter, SentencePieceExtractor

  class _Extractor(SentencePieceExtractor):
    def extract(self, *_):
      out = super().extract(BPE)
      return out["vocab"], out["merges"]

  class _Converter(LlamaConverter):
    SpmExtractor = _Extractor

  sp = spm.SentencePieceProcessor(model_file=model_path)
  if sp.get_piece_size() < 3 or [sp.id_to_piece(i) for i in (1, 2)] != ["<s>", "</s>"]:
    raise GritJaxError(f"{model_path}: expected <unk>, <s>, </s> as ids 0, 1, 2 (a Llama/Mistral-style model)")

  class _Original:  # what LlamaConverter reads of a slow tokenizer
    vocab_file, legacy, add_prefix_space = model_path, True, True

    @staticmethod
    def convert_ids_to_tokens(i):
      return sp.id_to_piece(i)

  return _Converter(_Original()).converted()


def write_tokenizer_files(tokenizer, out_dir: str, model_max_length: int) -> list[str]:
  """Writes tokenizer.json + tokenizer_config.json for grit_jax's `tokenizer` (data.tokenizer.Tokenizer) into
  `out_dir`, and copies its tokenizer.model when it has one. Returns the names written."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import processors

  fmt = tokenizer.text_format
  if (fmt.bos_token, fmt.eos_token, fmt.chat_template) != (templates.GRIT.bos_token, templates.GRIT.eos_token, None):
    return _copy_own_tokenizer_files(tokenizer, out_dir)
  if tokenizer.kind == "sentencepiece":
    backend = _converted_sentencepiece(tokenizer.path)
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.model"))
    written = ["tokenizer.model"]
  else:
    backend = HFTokenizer.from_file(tokenizer.path)
    written = []
  bos = templates.BASE_BOS
  backend.add_special_tokens([PAD_TOKEN])  # "<unk>" in a text is the unk id, as grit_jax and transformers read it
  backend.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
  backend.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      # PreTrainedTokenizerFast reads tokenizer.json as it is (transformers 4 and 5); a Llama class would rebuild
      # the pipeline (transformers 5 replaces the normalizer with a Metaspace that drops the dummy prefix of a
      # text starting with a space).
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": bos, "eos_token": templates.ASSISTANT_EOS, "unk_token": PAD_TOKEN, "pad_token": PAD_TOKEN,
      "add_bos_token": True, "add_eos_token": False, "padding_side": "right", "clean_up_tokenization_spaces": False,
      "model_max_length": int(model_max_length), "chat_template": CHAT_TEMPLATE,
  }
  write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
  write_json(os.path.join(out_dir, "special_tokens_map.json"),
             {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
  return written + ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _copy_own_tokenizer_files(tokenizer, out_dir: str) -> list[str]:
  """The model's tokenizer files as they are; GritLM's chat template (after its BOS only when it adds one) goes
  into tokenizer_config.json when the model has none, since grit_jax then chats in GRIT's format."""
  folder = os.path.dirname(os.path.abspath(tokenizer.path))
  written = [n for n in OWN_FILES if os.path.isfile(os.path.join(folder, n))]
  for name in written:
    shutil.copyfile(os.path.join(folder, name), os.path.join(out_dir, name))
  if tokenizer.text_format.chat_template is None:
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    bos = "{{ bos_token }}"
    config["chat_template"] = CHAT_TEMPLATE if tokenizer.text_format.add_bos else CHAT_TEMPLATE[len(bos):]
    write_json(path, config)
  return written


# grit_jax pooling (common_types.TOKEN_POOLINGS) -> sentence-transformers Pooling flag
POOLING_MODES = dict(zip(common_types.TOKEN_POOLINGS, ("pooling_mode_mean_tokens", "pooling_mode_weightedmean_tokens",
                                                       "pooling_mode_lasttoken")))


def write_sentence_transformers_files(out_dir: str, hidden_size: int, bidirectional: bool = True,
                                      pooling: str = "mean", normalize: bool = True,
                                      max_seq_length: int = ST_MAX_SEQ_LENGTH,
                                      text_format: templates.TextFormat = templates.GRIT,
                                      query_instruction: str | None = None) -> list[str]:
  """modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/ (and 2_Normalize/ when
  `normalize`) into an HF directory that already has config.json; `bidirectional`: the embedding passes'
  attention (attn "bb.."); `text_format`: the tokenizer's (its BOS is left to the tokenizer); `query_instruction`:
  the one of the `query` prompt (GritLM.encode_queries' default: the settings' query_instruction, else none)."""
  if pooling not in POOLING_MODES:
    raise GritJaxError(f"pooling={pooling!r}: expected one of {tuple(POOLING_MODES)}")
  cfg_path = os.path.join(out_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise GritJaxError(f"{out_dir}: write the model's config.json before the sentence-transformers files")
  with open(cfg_path) as f:
    model_config = json.load(f)
  if model_config.get("model_type") == "gemma3_text":
    # EmbeddingGemma's switch (symmetric windows on sliding layers). Its config turns sliding_window W into the
    # exclusive bound W // 2 + 1 only when the flag is in config.json, not when it comes as a load argument (as
    # config_args do): so the bound is given here too (tests/test_families.py pins it).
    config_args = {"use_bidirectional_attention": bidirectional}
    if bidirectional and model_config.get("sliding_window"):
      config_args["sliding_window"] = model_config["sliding_window"] // 2 + 1
  else:
    model_config["is_causal"] = True  # declared, so that sentence_bert_config's config_args can switch it off
    write_json(cfg_path, model_config)
    config_args = {"is_causal": not bidirectional}
  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
  write_json(os.path.join(out_dir, "modules.json"), modules)
  write_json(os.path.join(out_dir, "sentence_bert_config.json"),
              {"max_seq_length": int(max_seq_length), "do_lower_case": False, "config_args": config_args,
               # the causal-LM class of config.json (no UNEXPECTED lm_head.weight), its last hidden states pooled
               "transformer_task": "text-generation",
               "modality_config": {"text": {"method": "forward", "method_output_name": ["hidden_states", -1]}},
               "module_output_name": "token_embeddings"})
  write_json(os.path.join(out_dir, "config_sentence_transformers.json"),
              {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine",
               # GritLM.encode without an instruction embeds `<s><|embed|>\n{text}` (`<s>`: when the model has a BOS);
               # encode_queries with the query instruction (none by default)
               "prompts": {name: templates.embed_prefix(instr, text_format)[len(text_format.bos):]
                           for name, instr in (("query", query_instruction or ""), ("document", ""))},
               "default_prompt_name": "document"})
  os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
  write_json(os.path.join(out_dir, "1_Pooling", "config.json"),
              {"word_embedding_dimension": int(hidden_size), "pooling_mode_cls_token": False,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
               **{flag: name == pooling for name, flag in POOLING_MODES.items()}, "include_prompt": False})
  written = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling"]
  if normalize:
    os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
    written.append("2_Normalize")
  return written


def write_export_files(tokenizer, out_dir: str, model_config, settings) -> list[str]:
  """Everything above for an HF directory holding `model_config`'s weights and config.json, served with `settings`
  (convert.settings.Settings: attention, pooling, normalisation, query_instruction, and the embedding max length,
  settings.embedding_max_len, as the sentence-transformers max_seq_length). The sentence-transformers modules need
  a tokenizer and a pooling they have (not cls)."""
  if tokenizer is None:
    return []
  written = write_tokenizer_files(tokenizer, out_dir, model_config.max_position_embeddings)
  check_transformers_tokenizer(out_dir, tokenizer)
  if settings.pooling not in POOLING_MODES:
    log.warning("%s: no sentence-transformers modules: pooling=%r has no sentence-transformers equivalent that "
                "excludes the prompt", out_dir, settings.pooling)
    return written
  return written + write_sentence_transformers_files(
      out_dir, model_config.hidden_size, bidirectional=common_types.parse_attn(settings.attn).bidirectional,
      pooling=settings.pooling, normalize=settings.normalize,
      max_seq_length=settings_lib.embedding_max_len(settings), text_format=tokenizer.text_format,
      query_instruction=settings.query_instruction)


TOKENIZER_PROBES = ("Hello world", "The capital of France is Paris.", "  two leading spaces", "x\n\ny", "日本語 🙂 é")


def check_transformers_tokenizer(out_dir: str, tokenizer) -> bool:
  """Whether transformers' AutoTokenizer on the export gives grit_jax's ids on a few probe texts; one warning line
  naming the class it picked when not (transformers 5 ties some model types to their own tokenizer class whatever
  tokenizer_config.json says, e.g. qwen2 -> Qwen2Tokenizer, which re-tokenizes a non-Qwen vocabulary)."""
  try:
    import transformers
  except ImportError:
    return True
  hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
  bos = [tokenizer.bos_id] if tokenizer.text_format.add_bos else []
  for text in TOKENIZER_PROBES:
    want, got = bos + tokenizer.encode(text), list(hf_tok(text).input_ids)
    if got != want:
      log.warning("%s: transformers loads this tokenizer as %s, which tokenizes %r as %s, not as the model does (%s): "
                  "load it with PreTrainedTokenizerFast(tokenizer_file=...) or use grit_jax's encode",
                  out_dir, type(hf_tok).__name__, text, got, want)
      return False
  return True

