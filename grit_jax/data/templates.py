"""GritLM templates, generative labels and embedding pooling masks (reference run.py / data.py constants).

Embedding:  `<s><|user|>\\n{instruction}\\n<|embed|>\\n{text}`, or `<s><|embed|>\\n{text}` without instruction.
Generative: `<s>` + "\\n".join(`<|user|>\\n{u}\\n<|assistant|>\\n{a.strip()}</s>` per turn).

Pooling mask: the reference tokenizes the prefix (BOS + format + instruction) on its own and zeroes that many
positions; we do exactly that. The prefix ends in "\\n", a byte-fallback piece that never merges with the text
after it, so the pooled span is exactly the text (tests decode it back). In a byte-level BPE (SmolLM2, Llama 3,
Qwen) a text starting with two or more whitespace characters merges its first one into the prefix's "\\n" token;
that whitespace is then not pooled, as in the reference and sentence-transformers (both mask the prefix's length).

A model with its own chat template (tokenizer files, see TextFormat) keeps GRIT's embedding format (after its BOS
only when its tokenizer adds one) and trains and generates in its own chat format: labels are each assistant turn up
to and including the end-of-turn token, found by rendering prefixes of the conversation.

Generative labels: the reference derives user-span lengths from separately tokenized pieces, which for turns >= 2
misses the "\\n" turn separator and the dummy "▁" that starts a segment after `</s>`, shifting masks by a token or
two (grit_reference.md gotcha 4). We build the ids piece by piece with exact boundaries instead: the ids equal the
tokenization of the full string (tested), and every assistant span + its `</s>` is labelled exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Sequence

from grit_jax.common_types import IGNORE
from grit_jax.errors import GritJaxError

BASE_BOS = "<s>"
USER_BOS = "<|user|>\n"
EMBED_BOS = "\n<|embed|>\n"     # closes an instruction
EMBED_ONLY = "<|embed|>\n"      # the whole format when there is no instruction
FORMAT_TOKENS = ("<|user|>", "<|embed|>", "<|assistant|>")
ASSISTANT_BOS = "\n<|assistant|>\n"
ASSISTANT_EOS = "</s>"
TURN_SEP = "\n"
INSTRUCTION_STRIP = "\t\n :"
CHARS_PER_TOKEN_CAP = 10  # the reference cuts strings to 10 x max_len characters before tokenizing


@dataclasses.dataclass(frozen=True)
class TextFormat:
  """A model's special tokens and chat format, as its tokenizer files state them (data.tokenizer.read_text_format
  reads them; the defaults are GritLM's Mistral ones). Every template below takes it."""
  bos_token: str | None = BASE_BOS
  eos_token: str = ASSISTANT_EOS
  unk_token: str | None = "<unk>"
  pad_token: str | None = None  # None: id 0 (padding is masked everywhere)
  add_bos: bool = True  # the tokenizer adds BOS: embedding texts, GRIT chats and plain rows start with it
  chat_template: str | None = None  # the model's jinja chat template; None: GRIT's chat format
  specials: tuple[str, ...] = (BASE_BOS, ASSISTANT_EOS, "<unk>")  # special tokens a text may spell

  @property
  def bos(self) -> str:
    """What a text starts with: the BOS token when the tokenizer adds one, else nothing."""
    return self.bos_token if self.add_bos and self.bos_token else ""


GRIT = TextFormat()


def text_format(tokenizer) -> TextFormat:
  return getattr(tokenizer, "text_format", GRIT)


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


def embed_prefix(instruction: str | None, fmt: TextFormat = GRIT) -> str:
  """Everything before the text: BOS (when the tokenizer adds one), format tokens and the (stripped) instruction.
  Never pooled. An instruction in gritlm's wrapped form is kept as it is (same tokens as its plain form when that is
  already stripped)."""
  if wrapped_instruction(instruction):
    return fmt.bos + instruction
  instruction = clean_instruction(instruction)
  if instruction:
    return fmt.bos + USER_BOS + instruction + EMBED_BOS
  return fmt.bos + EMBED_ONLY


def embed_text(instruction: str | None, text: str, fmt: TextFormat = GRIT) -> str:
  return embed_prefix(instruction, fmt) + text


def encode_embedding(tokenizer, instruction: str | None, text: str, max_len: int) -> Encoded:
  """(ids, pool_mask), both of length <= max_len (right-truncated, unpadded; `.truncated` says if it was cut).

  pool_mask is 0 over BOS, format and instruction tokens and 1 over the text tokens. Raises GritJaxError when the
  text is empty or the prefix alone leaves no room for text (the reference drops such rows).
  """
  if not text:
    raise GritJaxError("empty text")
  cut = len(text) > CHARS_PER_TOKEN_CAP * max_len
  text = text[:CHARS_PER_TOKEN_CAP * max_len]
  prefix = embed_prefix(instruction, text_format(tokenizer))
  n_prefix = len(tokenizer.encode(prefix))  # the reference's instruction length
  if n_prefix >= max_len:
    raise GritJaxError(f"instruction too long: its prefix is {n_prefix} tokens, max_len is {max_len}")
  full = tokenizer.encode(prefix + text)
  ids = full[:max_len]
  pool_mask = [0] * n_prefix + [1] * (len(ids) - n_prefix)
  return Encoded(ids, pool_mask, cut or len(full) > max_len)


def _user_piece(i: int, user: str, fmt: TextFormat) -> str:
  return (fmt.bos if i == 0 else TURN_SEP) + USER_BOS + user + ASSISTANT_BOS


def normalize_turns(turns: Sequence[str]) -> list[str]:
  """Alternating [user, assistant, ...]; a trailing user turn is dropped (the reference does the same)."""
  turns = list(turns)
  return turns[:len(turns) // 2 * 2]


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  """A chat template compiled as transformers compiles it (sandboxed jinja2, trim_blocks, lstrip_blocks, loop
  controls, raise_exception, tojson, strftime_now)."""
  import datetime

  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise GritJaxError(f"chat template: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda f: datetime.datetime.now().strftime(f))
  return env.from_string(template)


def _messages(turns: Sequence[str]) -> list[dict]:
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": t if i % 2 == 0 else t.strip()}
          for i, t in enumerate(turns)]


def render_chat(turns: Sequence[str], add_generation_prompt: bool, fmt: TextFormat = GRIT) -> str:
  """The chat string of alternating [user, assistant, ...] turns (assistant turns stripped).

  With fmt.chat_template: that template, rendered as transformers renders it. Otherwise GRIT's format, stated here
  once (the exported chat template renders the same, convert/hf_files.CHAT_TEMPLATE, tested): BOS + `<|user|>\\n{u}`
  per user turn (after a "\\n" from the second on) + `\\n<|assistant|>\\n{a}</s>` per assistant turn, +
  `\\n<|assistant|>\\n` when add_generation_prompt."""
  if fmt.chat_template is not None:
    return _compiled(fmt.chat_template).render(
        messages=_messages(turns), add_generation_prompt=add_generation_prompt, bos_token=fmt.bos_token or "",
        eos_token=fmt.eos_token, unk_token=fmt.unk_token or "", pad_token=fmt.pad_token or "")
  out = [fmt.bos]
  for i, turn in enumerate(turns):
    if i % 2 == 0:
      out.append((TURN_SEP if i else "") + USER_BOS + turn)
    else:
      out.append(ASSISTANT_BOS + turn.strip() + fmt.eos_token)
  return "".join(out) + (ASSISTANT_BOS if add_generation_prompt else "")


PROBE = ("Hi", "Hello!", "How are you?", "Well.")  # a conversation that checks a chat template's shape


def check_chat_template(fmt: TextFormat, where: str) -> None:
  """Labels and prompts need each generation prompt to be a prefix of the conversation that continues it
  (render(messages[:k], add_generation_prompt=True) of render(messages[:k+1])), and each conversation a prefix of
  its next prompt; a template that re-renders earlier turns is refused."""
  for k in range(2, len(PROBE) + 1):  # from one message on: templates may read messages[0]
    before = render_chat(PROBE[:k - 1], add_generation_prompt=k % 2 == 0, fmt=fmt)
    if not render_chat(PROBE[:k], add_generation_prompt=k % 2 == 1, fmt=fmt).startswith(before):
      raise GritJaxError(f"{where}: its chat template does not render a conversation as its prompts followed by the "
                         "replies (a prefix of each next turn), so grit_jax cannot find the assistant turns")


def chat_text(turns: Sequence[str], fmt: TextFormat = GRIT) -> str:
  """The full training string of complete (user, assistant) turns."""
  return render_chat(normalize_turns(turns), add_generation_prompt=False, fmt=fmt)


def chat_prompt(messages: str | Sequence[str], fmt: TextFormat = GRIT) -> str:
  """Generation prompt: `<s><|user|>\\n{msg}\\n<|assistant|>\\n` (or the model's chat template); a list alternates
  user/assistant, ends with user. A single message already in the chat format (it starts with the format's BOS or
  its first special token, or with the user header that BOS precedes) is used as it is, never wrapped twice."""
  if isinstance(messages, str):
    messages = [messages]
  messages = list(messages)
  if not messages or len(messages) % 2 == 0:
    raise GritJaxError("chat_prompt: messages must alternate user/assistant and end with a user turn")
  if len(messages) == 1:
    lead = render_chat([_SENTINEL], add_generation_prompt=True, fmt=fmt).split(_SENTINEL)[0]
    marker = fmt.bos or next((t for t in fmt.specials if lead.startswith(t)), lead)
    if marker and messages[0].startswith(marker):
      return messages[0]
    if lead[len(fmt.bos):] and messages[0].startswith(lead[len(fmt.bos):]):  # gritlm's "<|user|>\n..." prompts
      return fmt.bos + messages[0]
  return render_chat(messages, add_generation_prompt=True, fmt=fmt)


_SENTINEL = "\x00grit_jax\x00"


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

  labels: IGNORE over BOS, user turns and format tokens; the assistant text and its `</s>` carry their ids.
  """
  turns = normalize_turns(turns)
  if not turns:
    raise GritJaxError("no complete (user, assistant) turn")
  fmt = text_format(tokenizer)
  if fmt.chat_template is not None:
    return _encode_templated_chat(tokenizer, fmt, turns, max_len)
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
    user_ids = tokenizer.encode(_user_piece(i, user[:cap], fmt))
    if i == 0 and len(user_ids) >= max_len:
      raise GritJaxError(f"first user turn too long: {len(user_ids)} tokens, max_len is {max_len}")
    answer_ids = tokenizer.encode(answer[:cap], continuation=True) + [tokenizer.eos_id]
    ids += user_ids + answer_ids
    labels += [IGNORE] * len(user_ids) + answer_ids
    if len(ids) >= max_len:
      cut = cut or 2 * (i + 1) < len(turns)  # later turns dropped
      break
  return Encoded(ids[:max_len], labels[:max_len], cut or len(ids) > max_len)


def _encode_templated_chat(tokenizer, fmt: TextFormat, turns: list[str], max_len: int) -> Encoded:
  """encode_chat in the model's chat template: the ids of the whole rendered string; each assistant turn is
  labelled from the end of its generation prompt through the template's first end-of-turn (EOS) token after it
  (what follows that token, e.g. ChatML's "\\n", is format the model never has to produce)."""
  cap = CHARS_PER_TOKEN_CAP * max_len
  cut = any(len(t if i % 2 == 0 else t.strip()) > cap for i, t in enumerate(turns))
  turns = [t[:cap] if i % 2 == 0 else t.strip()[:cap] for i, t in enumerate(turns)]
  if not all(turns[1::2]):
    raise GritJaxError(f"empty assistant turn {turns[1::2].index('')}")
  full = render_chat(turns, add_generation_prompt=False, fmt=fmt)
  ids = tokenizer.encode(full)
  labels = [IGNORE] * len(ids)

  def boundary(text: str) -> int:  # tokens of a prefix of `full`, which must not merge with what follows it
    part = tokenizer.encode(text)
    if not full.startswith(text) or ids[:len(part)] != part:
      raise GritJaxError(f"chat template: the conversation does not tokenize as its prefix {text[-40:]!r} + the rest")
    return len(part)

  for k in range(1, len(turns), 2):
    prompt = render_chat(turns[:k], add_generation_prompt=True, fmt=fmt)
    turn = render_chat(turns[:k + 1], add_generation_prompt=False, fmt=fmt)
    start = boundary(prompt)
    if k == 1 and start >= max_len:
      raise GritJaxError(f"first user turn too long: {start} tokens, max_len is {max_len}")
    if start >= max_len:
      break
    reply = turn.find(turns[k], len(prompt))
    eos = turn.find(fmt.eos_token, len(prompt) if reply < 0 else reply + len(turns[k]))
    end = boundary(turn[:eos + len(fmt.eos_token)] if eos >= 0 else turn)
    labels[start:end] = ids[start:end]
  return Encoded(ids[:max_len], labels[:max_len], cut or len(ids) > max_len)


def encode_plain(tokenizer, text: str, max_len: int) -> Encoded:
  """(ids, labels) of a plain-string generative row: `<s>{text}</s>` (BOS when the tokenizer adds one, and EOS,
  added when missing), trained on every token but the first."""
  if not text.strip():
    raise GritJaxError("empty text")
  fmt = text_format(tokenizer)
  cut = len(text) > CHARS_PER_TOKEN_CAP * max_len
  text = text[:CHARS_PER_TOKEN_CAP * max_len]
  if not text.startswith(fmt.bos):
    text = fmt.bos + text
  if not text.endswith(fmt.eos_token):
    text = text + fmt.eos_token
  full = tokenizer.encode(text)
  ids = full[:max_len]
  return Encoded(ids, [IGNORE] + ids[1:], cut or len(full) > max_len)
