"""A reply's text as its token ids arrive: what `grit-jax serve` sends in each streamed chunk, and (everything
pushed at once) the whole non-streamed reply, so the two always agree.

The text is the decoder's output for all ids so far (SentencePiece / BPE decoding is not piecewise): a piece is the
new text since the last one. Text is held back while it ends inside a UTF-8 character, while the decoder is
rewriting text already sent, and while its tail could still begin a stop string; at the first stop string the
reply ends, the stop excluded (as OpenAI's `stop`). `</s>` ends it too and is not text."""
from __future__ import annotations

import os
from typing import Sequence


class TextStream:

  def __init__(self, tokenizer, stops: Sequence[str], eos_id: int):
    self.tokenizer, self.stops, self.eos_id = tokenizer, [s for s in stops if s], eos_id
    self.ids: list[int] = []
    self.sent = ""            # the text sent so far
    self.finish: str | None = None  # "stop" (</s> or a stop string) or "length", once the reply has ended

  def push(self, new_ids: Sequence[int], last: bool = False) -> str:
    """The text to send for `new_ids` ("" = nothing yet). `last`: no more ids will come (what is held back for a
    character or a possible stop is released). Ids after the end are ignored."""
    if self.finish:
      return ""
    new_ids = list(new_ids)
    if self.eos_id in new_ids:
      new_ids, last, self.finish = new_ids[:new_ids.index(self.eos_id)], True, "stop"
    self.ids += new_ids
    text = self.tokenizer.decode(self.ids)
    if not last and (text.endswith("\ufffd") or not text.startswith(self.sent)):
      return ""
    # a rewrite at the very end cannot take back what was sent: send what follows the common prefix
    start = len(os.path.commonprefix([text, self.sent]))
    at = min((i for i in (text.find(s, max(0, start - len(s) + 1)) for s in self.stops) if i >= 0), default=-1)
    if at >= 0:
      end, self.finish = at, "stop"
    else:
      end = len(text) if last else len(text) - _stop_prefix_len(text, self.stops)
    piece = text[start:end] if end > start else ""
    self.sent = self.sent[:start] + piece
    if last and not self.finish:
      self.finish = "length"
    return piece


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
  """The length of the longest tail of `text` that is the beginning of some stop string (0: none)."""
  return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)

