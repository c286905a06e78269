"""The tokenizer: a SentencePiece model (`tokenizer.model`) or a Hugging Face `tokenizer.json`, with the HF Mistral
treatment of `<s>` / `</s>`.

The reference tokenizes with `add_special_tokens=False`, so the literal strings "<s>", "</s>" and "<unk>" inside a
text map to BOS (1), EOS (2) and UNK (0) and everything between them is plain SentencePiece text. As in the HF
Mistral tokenizer, every text segment between special tokens gets SentencePiece's dummy "▁" prefix (so
"<s><|embed|>\n" is [1, "▁<", "|", "embed", "|", ">", "\n"]). `<|user|>`, `<|embed|>`, `<|assistant|>` are NOT
special: they split into ordinary pieces.

Imports neither TensorFlow nor seqio (inference must not pay 10 s and 1 GB for them): the SentencePiece model is
loaded with `sentencepiece` exactly as seqio.SentencePieceVocabulary loads it (same proto, same ids; tested), and
the seqio vocabulary the training tasks need is built on first use (`Tokenizer.vocabulary`).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re

from grit_jax.errors import GritJaxError

BOS_STR = "<s>"
EOS_STR = "</s>"
UNK_STR = "<unk>"
_SPECIAL_RE = re.compile(r"(<s>|</s>|<unk>)")
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"


def file_identity(path: str) -> dict:
  """{"path": absolute path, "sha256": of its bytes}: which tokenizer file a run trained with (run config.json)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return {"path": os.path.abspath(path), "sha256": h.hexdigest()}


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
    self.bos_id, self.eos_id, self.unk_id = int(self.sp.bos_id()), int(self.sp.eos_id()), int(self.sp.unk_id())
    self.vocab_size = int(self.sp.get_piece_size())

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
    self.tok_cont = HFTokenizer.from_str(json.dumps(_without_dummy_prefix(spec)))
    self.bos_id = _token_id(self.tok, BOS_STR, path)
    self.eos_id = _token_id(self.tok, EOS_STR, path)
    self.unk_id = _token_id(self.tok, UNK_STR, path)
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str, prefix: bool) -> list[int]:
    return (self.tok if prefix else self.tok_cont).encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self.tok.id_to_token(i)

  def piece_to_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)


def _token_id(tok, token: str, path: str) -> int:
  i = tok.token_to_id(token)
  if i is None:
    raise GritJaxError(f"tokenizer: {path!r} has no {token!r} token (GritLM's templates need <s>, </s>, <unk>)")
  return int(i)


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


class Tokenizer:
  """encode(text) -> ids without added BOS/EOS; literal "<s>"/"</s>"/"<unk>" -> bos_id/eos_id/unk_id.

  `path`: a SentencePiece model (tokenizer.model) or a Hugging Face tokenizer.json; both give the same ids for the
  same vocabulary (tests/test_interop.py)."""

  def __init__(self, path: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise GritJaxError(f"tokenizer: no SentencePiece model or tokenizer.json at {path!r}")
    self.path = path
    self.kind = "tokenizers" if path.endswith(".json") else "sentencepiece"
    self._impl = _HFTokenizers(path) if self.kind == "tokenizers" else _SentencePiece(path)
    self.bos_id, self.eos_id, self.unk_id = self._impl.bos_id, self._impl.eos_id, self._impl.unk_id
    self.pad_id = 0  # = unk in Mistral's model; padding is masked everywhere, its id never matters
    self.vocab_size = self._impl.vocab_size
    if self.bos_id < 0 or self.eos_id < 0:
      raise GritJaxError(f"tokenizer: {path!r} has no BOS/EOS pieces (train it with bos_id=1, eos_id=2)")

  @classmethod
  def from_dir(cls, directory: str) -> "Tokenizer | None":
    """The tokenizer stored in a model directory: tokenizer.model, else tokenizer.json; None when neither."""
    for name in (SP_FILE, HF_FILE):
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return cls(path)
    return None

  @functools.cached_property
  def vocabulary(self):
    """seqio.SentencePieceVocabulary of the same model, for the training tasks (imports TensorFlow)."""
    if self.kind != "sentencepiece":
      raise GritJaxError(f"tokenizer: the training pipeline needs a SentencePiece model, got {self.path!r}")
    import seqio
    return seqio.SentencePieceVocabulary(self.path)

  def encode(self, text: str, continuation: bool = False) -> list[int]:
    """Token ids of `text` (no BOS/EOS added).

    continuation=True: `text` continues a segment (it follows other text, not a special token), so its first
    segment gets no dummy "▁" prefix. Used to encode a template piece by piece with exact span boundaries.
    """
    ids: list[int] = []
    after_text = continuation
    special = {BOS_STR: self.bos_id, EOS_STR: self.eos_id, UNK_STR: self.unk_id}
    for part in _SPECIAL_RE.split(text):
      if part in special:
        ids.append(special[part])
        after_text = False
      elif part:
        ids.extend(self._impl.encode(part, prefix=not after_text))
        after_text = True
    return ids

  def decode(self, ids) -> str:
    """Text of `ids`, dropping BOS, EOS, padding and ignored (-100) positions."""
    drop = {self.bos_id, self.eos_id, self.pad_id}
    return self._impl.decode([int(i) for i in ids if int(i) not in drop and 0 <= int(i) < self.vocab_size])

  def id_to_piece(self, i: int) -> str:
    return self._impl.id_to_piece(int(i))

  # The two calls of transformers' tokenizer API that gritlm scripts make on `model.tokenizer`.
  def apply_chat_template(self, conversation, tokenize: bool = True, add_generation_prompt: bool = False,
                          return_tensors: str | None = None):
    """The GritLM chat string of `conversation` ({"role", "content"} messages alternating user/assistant, or plain
    strings), as transformers renders the exported chat template; tokenize=True: its ids (a list, or an int32
    [1, T] array with return_tensors="np"/"jax"/"pt")."""
    from grit_jax.data import templates
    text = templates.render_chat(templates.turns_of(conversation, "conversation"), add_generation_prompt)
    if not tokenize:
      return text
    ids = self.encode(text)
    if return_tensors is None:
      return ids
    if return_tensors not in ("np", "jax", "pt"):
      raise GritJaxError(f"apply_chat_template: return_tensors={return_tensors!r}; use None, 'np', 'jax' or 'pt'")
    import numpy as np
    out = np.asarray([ids], np.int32)
    if return_tensors == "jax":
      import jax.numpy as jnp
      return jnp.asarray(out)
    if return_tensors == "pt":
      try:
        import torch
      except ImportError:
        raise GritJaxError("apply_chat_template: return_tensors='pt' needs torch; 'np' needs nothing") from None
      return torch.as_tensor(out, dtype=torch.long)
    return out

  def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
    """Texts of a batch of id rows (lists or a [B, T] array), as transformers decodes them with the exported
    tokenizer: `<s>`, `</s>` and `<unk>` (also the padding, id 0) spelled out and the "▁" after them kept as a space,
    unless skip_special_tokens (then dropped, as `decode` does)."""
    return [self.decode(row) if skip_special_tokens else self._decode_with_specials(row) for row in sequences]

  def _decode_with_specials(self, ids) -> str:
    spelled = {self.bos_id: BOS_STR, self.eos_id: EOS_STR, self.unk_id: UNK_STR}
    parts, run = [], []

    def flush():
      if run:  # a segment's leading "▁" is a space except at the very start (the decoders strip only that one)
        lead = " " if parts and self._impl.id_to_piece(run[0]).startswith("▁") else ""
        parts.append(lead + self._impl.decode(run))
        run.clear()

    for i in (int(i) for i in ids):
      if i in spelled:
        flush()
        parts.append(spelled[i])
      elif 0 <= i < self.vocab_size:
        run.append(i)
    flush()
    return "".join(parts)

  def piece_to_id(self, piece: str) -> int | None:
    """The id of a vocabulary piece (e.g. "<0x0A>"); None when the vocabulary has no such piece."""
    return self._impl.piece_to_id(piece)
