"""The tokenizer: a SentencePiece model (`tokenizer.model`) or a Hugging Face `tokenizer.json`, with the HF Mistral
treatment of `<s>` / `</s>`.

The reference tokenizes with `add_special_tokens=False`, so the literal strings "<s>", "</s>" and "<unk>" inside a
text map to BOS (1), EOS (2) and UNK (0) and everything between them is plain SentencePiece text. As in the HF
Mistral tokenizer, every text segment between special tokens gets SentencePiece's dummy "▁" prefix (so
"<s><|embed|>\n" is [1, "▁<", "|", "embed", "|", ">", "\n"]). `<|user|>`, `<|embed|>`, `<|assistant|>` are NOT
special: they split into ordinary pieces.

Another model's special tokens and chat format come from its tokenizer files (`read_text_format`, the one statement
of that rule): e.g. SmolLM2's byte-level BPE tokenizer.json, whose literal "<|im_start|>"/"<|im_end|>" are its
BOS/EOS, adds no BOS and has a ChatML chat template.

Imports neither TensorFlow nor seqio (inference must not pay 10 s and 1 GB for them): the SentencePiece model is
loaded with `sentencepiece` exactly as seqio.SentencePieceVocabulary loads it (same proto, same ids; tested), and
the seqio vocabulary the training tasks need is built on first use (`Tokenizer.vocabulary`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re

from grit_jax.data import templates
from grit_jax.errors import GritJaxError

BOS_STR = "<s>"
EOS_STR = "</s>"
UNK_STR = "<unk>"
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Next to the tokenizer: its special tokens and chat template (transformers 5 writes the template to its own file).
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


def file_identity(path: str) -> dict:
  """{"path": absolute path, "sha256": of its bytes}: which tokenizer file a run trained with (run config.json);
  a model directory stands for its tokenizer file (`resolve`)."""
  from grit_jax.fileio import sha256_file
  path = resolve(path)
  return {"path": os.path.abspath(path), "sha256": sha256_file(path)}


class _SentencePiece:
  """Segments through sentencepiece: `prefix` selects the model with or without the dummy "▁" prefix."""

  def __init__(self, path: str):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with open(path, "rb") as f:
      raw = f.read()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
      proto.ParseFromString(raw)
      self.sp = spm.SentencePieceProcessor(model_proto=raw)
    except Exception as e:  # protobuf's DecodeError / sentencepiece's RuntimeError on a corrupt file
      raise GritJaxError(f"tokenizer: {path!r} is not a SentencePiece model ({e})") from e
    # The same model without the dummy prefix (seqio's normalizer_spec_overrides merge, on both specs): encodes
    # text that continues a segment (e.g. after "\n").
    no_prefix = sentencepiece_model_pb2.NormalizerSpec(add_dummy_prefix=False)
    proto.normalizer_spec.MergeFrom(no_prefix)
    proto.denormalizer_spec.MergeFrom(no_prefix)
    self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self.vocab_size = int(self.sp.get_piece_size())
    self.specials = (BOS_STR, EOS_STR, UNK_STR)
    self.adds_bos = True  # a bare SentencePiece model is GritLM's (Mistral's)

  def encode(self, text: str, prefix: bool) -> list[int]:
    return (self.sp if prefix else self.sp_cont).encode(text)

  def decode(self, ids: list[int]) -> str:
    return self.sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(i)

  def piece_to_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else int(i)


class _HFTokenizers:
  """Segments through a Hugging Face `tokenizer.json` (the `tokenizers` library). The continuation form is the
  same tokenizer without the dummy prefix: a Prepend("▁") normalizer dropped, or a Metaspace pre-tokenizer set to
  prepend_scheme="never"; a tokenizer with neither (byte-level BPE) has no dummy prefix to drop."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer

    try:
      with open(path, encoding="utf-8") as f:
        spec = json.load(f)
      self.tok = HFTokenizer.from_str(json.dumps(spec))
    except Exception as e:  # OSError, JSONDecodeError, or the bare Exception tokenizers raises on a bad spec
      raise GritJaxError(f"tokenizer: {path!r} is not a tokenizers JSON file ({e})") from e
    cont = _without_dummy_prefix(spec)
    self.tok_cont = HFTokenizer.from_str(json.dumps(cont))
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    self.specials = tuple(t["content"] for t in spec.get("added_tokens", []) if t.get("special"))
    single = (spec.get("post_processor") or {}).get("single") or [{}]
    self.adds_bos = "SpecialToken" in single[0]  # its post-processor puts a special token first (the BOS)

  def encode(self, text: str, prefix: bool) -> list[int]:
    return (self.tok if prefix else self.tok_cont).encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self.tok.id_to_token(i)

  def piece_to_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)


def _token(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value  # older configs store AddedToken dicts


def read_text_format(path: str, impl) -> templates.TextFormat:
  """The model's special tokens and chat format: bos_token, eos_token, unk_token, pad_token, add_bos_token and
  chat_template of the tokenizer_config.json next to the tokenizer (the template from chat_template.jinja when that
  exists, as transformers 5 saves it). Without that file everything is GritLM's (Mistral's: <s>, </s>, <unk>, pad id
  0, BOS added, GRIT's chat format); a missing add_bos_token is whether the tokenizer itself adds a BOS. A template
  that renders GRIT's format is GRIT's (served by the exact piece-by-piece encoder)."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
  if not os.path.isfile(config_path):
    return templates.GRIT
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    template_path = os.path.join(os.path.dirname(config_path), TEMPLATE_FILE)
    template = config.get("chat_template")
    if os.path.isfile(template_path):
      with open(template_path, encoding="utf-8") as f:
        template = f.read()
  except (OSError, ValueError) as e:
    raise GritJaxError(f"tokenizer: {config_path!r} is not readable JSON ({e})") from e
  if not isinstance(template, (str, type(None))):  # a list of named templates: the default one
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  eos = _token(config.get("eos_token")) or EOS_STR
  fmt = templates.TextFormat(
      bos_token=_token(config.get("bos_token", BOS_STR)), eos_token=eos,
      unk_token=_token(config.get("unk_token", UNK_STR)), pad_token=_token(config.get("pad_token")),
      add_bos=bool(config.get("add_bos_token", impl.adds_bos)), chat_template=template,
      specials=tuple(dict.fromkeys(impl.specials + tuple(
          t for t in (_token(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")) if t))))
  if template is not None:
    import jinja2
    grit = dataclasses.replace(fmt, chat_template=None)
    try:
      if all(templates.render_chat(templates.PROBE[:k], g, fmt) == templates.render_chat(templates.PROBE[:k], g, grit)
             for k in (1, 2, 3) for g in (False, True)):
        return grit
    except jinja2.TemplateError as e:
      raise GritJaxError(f"tokenizer: the chat template of {config_path!r} does not render ({e})") from e
    templates.check_chat_template(fmt, config_path)
  return fmt


def _without_dummy_prefix(spec: dict) -> dict:
  spec = copy.deepcopy(spec)

  def strip(node):
    if not isinstance(node, dict):
      return node
    if node.get("type") == "Sequence":
      key = "normalizers" if "normalizers" in node else "pretokenizers"
      node[key] = [n for n in (strip(c) for c in node.get(key, [])) if n is not None]
      return node
    if node.get("type") == "Prepend" and node.get("prepend") == "▁":
      return None
    if node.get("type") == "Metaspace":
      node["prepend_scheme"] = "never"
      node.pop("add_prefix_space", None)  # tokenizers < 0.14 spelling
    return node

  spec["normalizer"] = strip(spec.get("normalizer"))
  spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"))
  return spec


def resolve(path) -> str:
  """The tokenizer file a path names: the file itself; a model directory's tokenizer.model, else tokenizer.json. A
  GGUF file is converted above this floor (contract.tokenizer_path, convert.load)."""
  path = os.path.expanduser(os.fspath(path))
  if path.endswith(".gguf"):
    raise GritJaxError(f"tokenizer: {path!r} is a GGUF file: load the model with GritLM.from_pretrained, or name "
                       "it as config.data.tokenizer, which converts it once")
  if os.path.isdir(path):
    found = [os.path.join(path, n) for n in (SP_FILE, HF_FILE) if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise GritJaxError(f"tokenizer: {path!r} holds neither {SP_FILE} nor {HF_FILE}")
    path = found[0]
  return path


# ASCII only: a SentencePiece model and the tokenizer.json transformers converts from it agree on it with or
# without byte fallback
PROBE = "Hello, world! It costs 12.50 dollars.\nA second line: two  spaces, (brackets) and CAPITALS."


def _check_same(sp, json_path: str, sp_path: str) -> None:
  """A folder's tokenizer.model is what grit_jax tokenizes with and its tokenizer.json what transformers (and
  GritLM.tokenizer) use: a stale one of the two would give other ids without a word, so they must agree."""
  hf = _HFTokenizers(json_path)
  a, b = sp.encode(PROBE, True), hf.encode(PROBE, True)
  if sp.vocab_size != hf.vocab_size or a != b:
    raise GritJaxError(f"tokenizer: {sp_path} and {json_path} disagree ({sp.vocab_size} vs {hf.vocab_size} tokens; "
                       f"{PROBE[:12]!r}... -> {a[:6]} vs {b[:6]}): one of them is stale; remove it or re-export")


class Tokenizer:
  """encode(text) -> ids without added BOS/EOS; the literal BOS/EOS/UNK strings of its format (GritLM's "<s>",
  "</s>", "<unk>") -> bos_id/eos_id/unk_id. `text_format`: the model's special tokens and chat format
  (read_text_format), which data.templates follows.

  `path`: a SentencePiece model (tokenizer.model) or a Hugging Face tokenizer.json; both give the same ids for the
  same vocabulary (tests/test_interop.py). A model directory stands for its tokenizer (`resolve`)."""

  def __init__(self, path: str):
    path = resolve(path)
    if not os.path.isfile(path):
      raise GritJaxError(f"tokenizer: no SentencePiece model or tokenizer.json at {path!r}")
    self.path = path
    self.kind = "tokenizers" if path.endswith(".json") else "sentencepiece"
    self._impl = _HFTokenizers(path) if self.kind == "tokenizers" else _SentencePiece(path)
    if self.kind == "sentencepiece" and os.path.isfile(os.path.join(os.path.dirname(path), HF_FILE)):
      _check_same(self._impl, os.path.join(os.path.dirname(path), HF_FILE), path)
    self.text_format = fmt = read_text_format(path, self._impl)
    self.vocab_size = self._impl.vocab_size
    self.eos_id = self._id(fmt.eos_token)
    self.bos_id = self._id(fmt.bos_token) if fmt.bos_token else self.eos_id  # filler rows need one real token
    self.unk_id = self._id(fmt.unk_token) if fmt.unk_token else None
    self.pad_id = self._id(fmt.pad_token) if fmt.pad_token else 0  # masked everywhere: its id never matters
    self._specials = {t: i for t, i in ((fmt.bos_token, self.bos_id), (fmt.eos_token, self.eos_id),
                                        (fmt.unk_token, self.unk_id)) if t}
    self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self._specials) + ")")

  def _id(self, token: str) -> int:
    i = self._impl.piece_to_id(token)
    if i is None or i < 0:
      raise GritJaxError(f"tokenizer: {self.path!r} has no {token!r} token (its special tokens come from "
                         f"{CONFIG_FILE} next to it; without one, GritLM's <s>, </s>, <unk>)")
    return int(i)

  @classmethod
  def from_dir(cls, directory: str) -> "Tokenizer | None":
    """The tokenizer stored in a model directory (`resolve`); None when it holds none."""
    if not any(os.path.isfile(os.path.join(directory, n)) for n in (SP_FILE, HF_FILE)):
      return None
    return cls(directory)

  @functools.cached_property
  def vocabulary(self):
    """The seqio vocabulary of the training tasks (imports TensorFlow): seqio.SentencePieceVocabulary of the same
    model, or for a tokenizer.json one that only declares the size (the tasks tokenize in Python, data.batching)."""
    import seqio
    if self.kind == "sentencepiece":
      return seqio.SentencePieceVocabulary(self.path)
    return seqio.PassThroughVocabulary(size=self.vocab_size, eos_id=self.eos_id)

  def encode(self, text: str, continuation: bool = False) -> list[int]:
    """Token ids of `text` (no BOS/EOS added).

    continuation=True: `text` continues a segment (it follows other text, not a special token), so its first
    segment gets no dummy "▁" prefix. Used to encode a template piece by piece with exact span boundaries.
    """
    ids: list[int] = []
    after_text = continuation
    special = self._specials
    for part in self._special_re.split(text):
      if part in special:
        ids.append(special[part])
        after_text = False
      elif part:
        ids.extend(self._impl.encode(part, prefix=not after_text))
        after_text = True
    return ids

  def decode(self, ids) -> str:
    """Text of `ids`, dropping BOS, EOS, padding and ignored (IGNORE) positions."""
    drop = {self.bos_id, self.eos_id, self.pad_id}
    return self._impl.decode([int(i) for i in ids if int(i) not in drop and 0 <= int(i) < self.vocab_size])

  def id_to_piece(self, i: int) -> str:
    return self._impl.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int | None:
    """The id of a vocabulary piece (e.g. "<0x0A>"); None when the vocabulary has no such piece."""
    return self._impl.piece_to_id(piece)
