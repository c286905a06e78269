"""GritLM templates, generative labels and embedding pooling masks (reference run.py / data.py constants).

Embedding:  `<s><|user|>\\n{instruction}\\n<|embed|>\\n{text}`, or `<s><|embed|>\\n{text}` without instruction.
Generative: `<s>` + "\\n".join(`<|user|>\\n{u}\\n<|assistant|>\\n{a.strip()}</s>` per turn).

Pooling mask: the reference tokenizes the prefix (BOS + format + instruction) on its own and zeroes that many
positions; we do exactly that. The prefix ends in "\\n", a byte-fallback piece that never merges with the text
after it, so the pooled span is exactly the text (tests decode it back).

Generative labels: the reference derives user-span lengths from separately tokenized pieces, which for turns >= 2
misses the "\\n" turn separator and the dummy "▁" that starts a segment after `</s>`, shifting masks by a token or
two (grit_reference.md gotcha 4). We build the ids piece by piece with exact boundaries instead: the ids equal the
tokenization of the full string (tested), and every assistant span + its `</s>` is labelled exactly.
"""
from __future__ import annotations

from typing import Sequence

from grit_jax.errors import GritJaxError

BASE_BOS = "<s>"
USER_BOS = "<|user|>\n"
EMBED_BOS = "\n<|embed|>\n"     # closes an instruction
EMBED_ONLY = "<|embed|>\n"      # the whole format when there is no instruction
FORMAT_TOKENS = ("<|user|>", "<|embed|>", "<|assistant|>")
ASSISTANT_BOS = "\n<|assistant|>\n"
ASSISTANT_EOS = "</s>"
TURN_SEP = "\n"
IGNORE = -100
INSTRUCTION_STRIP = "\t\n :"
CHARS_PER_TOKEN_CAP = 10  # the reference cuts strings to 10 x max_len characters before tokenizing


class Encoded(tuple):
  """What the encoders return: the pair `(ids, pool_mask)` or `(ids, labels)` (unpacks as before), plus
  `truncated`: the text did not fit in max_len and was cut (training and `embed` count these)."""

  truncated: bool

  def __new__(cls, ids: list[int], other: list[int], truncated: bool):
    self = super().__new__(cls, (ids, other))
    self.truncated = bool(truncated)
    return self


def clean_instruction(instruction: str | None) -> str:
  return (instruction or "").strip(INSTRUCTION_STRIP)


def wrapped_instruction(instruction: str | None) -> bool:
  """True for an instruction already in gritlm's wrapped form, `gritlm_instruction(x)` = "<|user|>\\n{x}\\n<|embed|>\\n"
  (or "<|embed|>\\n" for no instruction): it is used verbatim, never wrapped twice. Format tokens anywhere else in
  an instruction are an error (a half-wrapped instruction would silently embed differently)."""
  instruction = instruction or ""
  if instruction == EMBED_ONLY or (instruction.startswith(USER_BOS) and instruction.endswith(EMBED_BOS)
                                   and not any(t in instruction[len(USER_BOS):-len(EMBED_BOS)]
                                               for t in FORMAT_TOKENS)):
    return True
  found = [t for t in FORMAT_TOKENS if t in instruction]
  if found:
    raise GritJaxError(f"instruction {instruction[:60]!r} contains {found[0]} but is not gritlm's wrapped form "
                       f"'<|user|>\\n...\\n<|embed|>\\n': pass the plain instruction")
  return False


def embed_prefix(instruction: str | None) -> str:
  """Everything before the text: BOS, format tokens and the (stripped) instruction. Never pooled. An instruction
  in gritlm's wrapped form is kept as it is (same tokens as its plain form when that is already stripped)."""
  if wrapped_instruction(instruction):
    return BASE_BOS + instruction
  instruction = clean_instruction(instruction)
  if instruction:
    return BASE_BOS + USER_BOS + instruction + EMBED_BOS
  return BASE_BOS + EMBED_ONLY


def embed_text(instruction: str | None, text: str) -> str:
  return embed_prefix(instruction) + text


def encode_embedding(tokenizer, instruction: str | None, text: str, max_len: int) -> Encoded:
  """(ids, pool_mask), both of length <= max_len (right-truncated, unpadded; `.truncated` says if it was cut).

  pool_mask is 0 over BOS, format and instruction tokens and 1 over the text tokens. Raises GritJaxError when the
  text is empty or the prefix alone leaves no room for text (the reference drops such rows).
  """
  if not text:
    raise GritJaxError("empty text")
  cut = len(text) > CHARS_PER_TOKEN_CAP * max_len
  text = text[:CHARS_PER_TOKEN_CAP * max_len]
  prefix = embed_prefix(instruction)
  n_prefix = len(tokenizer.encode(prefix))  # the reference's instruction length
  if n_prefix >= max_len:
    raise GritJaxError(f"instruction too long: its prefix is {n_prefix} tokens, max_len is {max_len}")
  full = tokenizer.encode(prefix + text)
  ids = full[:max_len]
  pool_mask = [0] * n_prefix + [1] * (len(ids) - n_prefix)
  return Encoded(ids, pool_mask, cut or len(full) > max_len)


def _user_piece(i: int, user: str) -> str:
  return (BASE_BOS if i == 0 else TURN_SEP) + USER_BOS + user + ASSISTANT_BOS


def normalize_turns(turns: Sequence[str]) -> list[str]:
  """Alternating [user, assistant, ...]; a trailing user turn is dropped (the reference does the same)."""
  turns = list(turns)
  return turns[:len(turns) // 2 * 2]


def render_chat(turns: Sequence[str], add_generation_prompt: bool) -> str:
  """The chat string of alternating [user, assistant, ...] turns: `<s>` + `<|user|>\\n{u}` per user turn (after a
  "\\n" from the second on) + `\\n<|assistant|>\\n{a.strip()}</s>` per assistant turn, + `\\n<|assistant|>\\n`
  when add_generation_prompt. The one statement of the chat format; the exported chat template renders the same
  (convert/hf_files.CHAT_TEMPLATE, tested)."""
  out = [BASE_BOS]
  for i, turn in enumerate(turns):
    if i % 2 == 0:
      out.append((TURN_SEP if i else "") + USER_BOS + turn)
    else:
      out.append(ASSISTANT_BOS + turn.strip() + ASSISTANT_EOS)
  return "".join(out) + (ASSISTANT_BOS if add_generation_prompt else "")


def chat_text(turns: Sequence[str]) -> str:
  """The full training string of complete (user, assistant) turns."""
  return render_chat(normalize_turns(turns), add_generation_prompt=False)


def chat_prompt(messages: str | Sequence[str]) -> str:
  """Generation prompt: `<s><|user|>\\n{msg}\\n<|assistant|>\\n`; a list alternates user/assistant, ends with user."""
  if isinstance(messages, str):
    messages = [messages]
  messages = list(messages)
  if not messages or len(messages) % 2 == 0:
    raise GritJaxError("chat_prompt: messages must alternate user/assistant and end with a user turn")
  return render_chat(messages, add_generation_prompt=True)


def turns_of(item, where: str) -> list[str]:
  """One conversation as alternating user/assistant strings: a user message, a list of strings, or chat messages
  [{"role": "user" | "assistant", "content": str}, ...] (the GritLM chat format has no system turn)."""
  if isinstance(item, str):
    return [item]
  if isinstance(item, (list, tuple)) and item and all(isinstance(m, str) for m in item):
    return list(item)
  if isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) for m in item):
    turns = []
    for i, m in enumerate(item):
      want = "user" if i % 2 == 0 else "assistant"
      if m.get("role") != want or not isinstance(m.get("content"), str):
        raise GritJaxError(f"{where}[{i}]: expected {{'role': {want!r}, 'content': str}} (roles alternate user/"
                           f"assistant, starting with user), got {str(m)[:60]}")
      turns.append(m["content"])
    return turns
  raise GritJaxError(f"{where} {str(item)[:60]!r}: expected a string, a list of message strings or a list of "
                     "{'role', 'content'} messages")


def encode_chat(tokenizer, turns: Sequence[str], max_len: int) -> Encoded:
  """(ids, labels) of a chat, right-truncated to max_len (truncation can drop the final `</s>`, as in the reference;
  `.truncated` says if anything was cut).

  labels: -100 over BOS, user turns and format tokens; the assistant text and its `</s>` carry their ids.
  """
  turns = normalize_turns(turns)
  if not turns:
    raise GritJaxError("no complete (user, assistant) turn")
  cap = CHARS_PER_TOKEN_CAP * max_len
  ids: list[int] = []
  labels: list[int] = []
  cut = False
  for i, (user, answer) in enumerate(zip(turns[::2], turns[1::2])):
    cut = cut or len(user) > cap or len(answer.strip()) > cap
    answer = answer.strip()
    if not answer:
      raise GritJaxError(f"empty assistant turn {i}")
    # A user piece starts a new SentencePiece segment (after BOS or `</s>`); the answer continues it after "\n".
    user_ids = tokenizer.encode(_user_piece(i, user[:cap]))
    if i == 0 and len(user_ids) >= max_len:
      raise GritJaxError(f"first user turn too long: {len(user_ids)} tokens, max_len is {max_len}")
    answer_ids = tokenizer.encode(answer[:cap], continuation=True) + [tokenizer.eos_id]
    ids += user_ids + answer_ids
    labels += [IGNORE] * len(user_ids) + answer_ids
    if len(ids) >= max_len:
      cut = cut or 2 * (i + 1) < len(turns)  # later turns dropped
      break
  return Encoded(ids[:max_len], labels[:max_len], cut or len(ids) > max_len)


def encode_plain(tokenizer, text: str, max_len: int) -> Encoded:
  """(ids, labels) of a plain-string generative row: `<s>{text}</s>` (BOS/EOS added when missing), trained on
  every token but the first."""
  if not text.strip():
    raise GritJaxError("empty text")
  cut = len(text) > CHARS_PER_TOKEN_CAP * max_len
  text = text[:CHARS_PER_TOKEN_CAP * max_len]
  if not text.startswith(BASE_BOS):
    text = BASE_BOS + text
  if not text.endswith(ASSISTANT_EOS):
    text = text + ASSISTANT_EOS
  full = tokenizer.encode(text)
  ids = full[:max_len]
  return Encoded(ids, [IGNORE] + ids[1:], cut or len(full) > max_len)
