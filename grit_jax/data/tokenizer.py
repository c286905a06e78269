"""SentencePiece tokenizer (seqio.SentencePieceVocabulary) with the HF Mistral treatment of `<s>` / `</s>`.

The reference tokenizes with `add_special_tokens=False`, so the literal strings "<s>" and "</s>" inside a text map to
BOS (1) and EOS (2) and everything between them is plain SentencePiece text. As in the HF Mistral tokenizer, every
text segment between special tokens gets SentencePiece's dummy "▁" prefix (so "<s><|embed|>\\n" is
[1, "▁<", "|", "embed", "|", ">", "\\n"]). `<|user|>`, `<|embed|>`, `<|assistant|>` are NOT special: they split into
ordinary pieces.
"""
from __future__ import annotations

import os
import re

import seqio
from sentencepiece import sentencepiece_model_pb2

from grit_jax.errors import GritJaxError

BOS_STR = "<s>"
EOS_STR = "</s>"
_SPECIAL_RE = re.compile(r"(<s>|</s>)")


class Tokenizer:
  """encode(text) -> ids without added BOS/EOS; literal "<s>"/"</s>" -> bos_id/eos_id."""

  def __init__(self, path: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise GritJaxError(f"tokenizer: no SentencePiece model at {path!r}")
    self.path = path
    self.vocabulary = seqio.SentencePieceVocabulary(path)
    try:
      self._sp = self.vocabulary.tokenizer  # sentencepiece.SentencePieceProcessor
    except Exception as e:  # a corrupt or non-SentencePiece file
      raise GritJaxError(f"tokenizer: {path!r} is not a SentencePiece model ({e})") from e
    # Same model without the dummy "▁" prefix: encodes text that continues a segment (e.g. after "\n").
    self._continuation_vocab = seqio.SentencePieceVocabulary(
        path, normalizer_spec_overrides=sentencepiece_model_pb2.NormalizerSpec(add_dummy_prefix=False))
    self._sp_cont = self._continuation_vocab.tokenizer
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.pad_id = 0  # = unk in Mistral's model; padding is masked everywhere, its id never matters
    self.vocab_size = int(self._sp.get_piece_size())
    if self.bos_id < 0 or self.eos_id < 0:
      raise GritJaxError(f"tokenizer: {path!r} has no BOS/EOS pieces (train it with bos_id=1, eos_id=2)")

  def encode(self, text: str, continuation: bool = False) -> list[int]:
    """Token ids of `text` (no BOS/EOS added).

    continuation=True: `text` continues a segment (it follows other text, not a special token), so its first
    segment gets no dummy "▁" prefix. Used to encode a template piece by piece with exact span boundaries.
    """
    ids: list[int] = []
    after_text = continuation
    for part in _SPECIAL_RE.split(text):
      if part == BOS_STR:
        ids.append(self.bos_id)
        after_text = False
      elif part == EOS_STR:
        ids.append(self.eos_id)
        after_text = False
      elif part:
        ids.extend((self._sp_cont if after_text else self._sp).encode(part))
        after_text = True
    return ids

  def decode(self, ids) -> str:
    """Text of `ids`, dropping BOS, EOS, padding and ignored (-100) positions."""
    drop = {self.bos_id, self.eos_id, self.pad_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in drop and 0 <= int(i) < self.vocab_size])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))
