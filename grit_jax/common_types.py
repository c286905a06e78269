"""The project's vocabulary, stated once: the values several modules share (the ignored label, the pooling methods,
the data modes and the passes each runs, the `attn` string, the batch keys). Bottom floor: imports nothing of
grit_jax but errors, and no jax.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from grit_jax.errors import GritJaxError

# -- labels ----------------------------------------------------------------------------------------------------------

IGNORE = -100  # a label that is no target (prompt, padding, the first token of a sequence)

# -- pooling ---------------------------------------------------------------------------------------------------------

POOLINGS = ("mean", "weightedmean", "lasttoken", "cls")  # cls: the first token's state (BOS), as gritlm's
# Weighted sums over the text tokens: what training pools with (grit_jax.objectives.pool) and what
# sentence-transformers' Pooling module expresses with the prompt excluded (cls would pool the BOS of the prompt).
TOKEN_POOLINGS = POOLINGS[:3]

# -- data modes ------------------------------------------------------------------------------------------------------

DATA_MODES = ("unified", "embedding", "generative")  # config.data.mode (and GritLM's mode=)


def passes(mode: str, key: str = "config.data.mode") -> tuple[bool, bool]:
  """(embedding passes run, generative pass runs) for a data mode."""
  if mode not in DATA_MODES:
    raise GritJaxError(f"{key}={mode!r}: expected one of {', '.join(DATA_MODES)}")
  return mode != "generative", mode != "embedding"


# -- attention -------------------------------------------------------------------------------------------------------

SERVED_ATTNS = ("bbcc", "cccc", "bb", "cc")  # what inference serves: queries and passages embedded alike


class AttnMode(NamedTuple):
  """The reference's `attn` string, parsed (`parse_attn`): chars 1-2 the embedding passes (query, passage), 3-4 the
  generative pass (always causal); b = bidirectional, c = causal."""
  query_causal: bool
  passage_causal: bool

  @property
  def bidirectional(self) -> bool:
    """Both embedding passes bidirectional (attn 'bb..')."""
    return not (self.query_causal or self.passage_causal)

  @property
  def embedding_causal(self) -> bool:
    """`causal` of inference's embedding pass, which embeds queries and passages alike: the mixed cb/bc training
    ablations are not served (as in gritlm)."""
    if self.query_causal != self.passage_causal:
      raise GritJaxError(_mixed("".join("c" if c else "b" for c in self) + "cc", "attn"))
    return self.query_causal


CAUSAL = AttnMode(True, True)  # gritlm's attn=None: the model stays causal


def parse_attn(attn: Any, key: str = "config.attn") -> AttnMode:
  """'bbcc' | 'cccc' | 'bb' | 'cc' (and the mixed 'cb'/'bc' embedding ablations); the generative chars, when
  given, must be 'cc' (generation is always causal). An AttnMode is returned as it is."""
  if isinstance(attn, AttnMode):
    return attn
  if not isinstance(attn, str) or len(attn) not in (2, 4) or set(attn) - {"b", "c"}:
    raise GritJaxError(f"{key}={attn!r}: expected 2 or 4 characters of b (bidirectional) / c (causal), e.g. bbcc")
  if attn[2:] and attn[2:] != "cc":
    raise GritJaxError(f"{key}={attn!r}: the generative pass (chars 3-4) must be causal (cc)")
  return AttnMode(attn[0] == "c", attn[1] == "c")


def parse_served_attn(attn: Any, key: str = "attn") -> AttnMode:
  """GritLM's `attn`: a string as `parse_attn` whose embedding passes agree (`AttnMode.embedding_causal`), or None
  (gritlm's "leave the model causal")."""
  mode = CAUSAL if attn is None else parse_attn(attn, key=key)
  if mode.query_causal != mode.passage_causal:
    raise GritJaxError(_mixed(attn, key))
  return mode


def _mixed(attn, key: str) -> str:
  return (f"{key}={attn!r}: mixed query/passage attention is not served (as in gritlm); expected "
          f"{', '.join(SERVED_ATTNS)} or None")


# -- batch keys ------------------------------------------------------------------------------------------------------
# A global batch (docs/DESIGN.md) is a dict of int32 arrays named `{pass}_{field}`. Padded passes: ids, mask and
# pool_mask (embedding) or labels (generative), [B, T]. Packed passes (grit_jax.data.packing): ids, segment_ids,
# positions and pool_mask / labels [U, R, L], lengths [U, n]. Besides, one row per query (QUERY_ROW_KEYS, the same
# for padded and packed passes): pos_key [Bq, 2] int32 (duplicate positives), no_in_batch_neg [Bq] int32 (1 = the
# query is contrasted with its own candidates only: config.data.no_in_batch_negatives), teacher_scores [Bq, g]
# float32 (a teacher's scores of the query's positive and hard negatives; NaN = none; config.loss.distill_weight).

QUERY, PASSAGE, GEN = "query", "passage", "gen"
EMBEDDING_PASSES = (QUERY, PASSAGE)
PASSES = (QUERY, PASSAGE, GEN)

IDS, MASK, POOL_MASK, LABELS = "ids", "mask", "pool_mask", "labels"
SEGMENT_IDS, POSITIONS, LENGTHS = "segment_ids", "positions", "lengths"
TRUNCATED, WEIGHT = "truncated", "weight"  # per-example: cut to max length; 1 = a real example (eval filler rows 0)
POS_KEY = "pos_key"
NO_IN_BATCH_NEG = "no_in_batch_neg"
TEACHER_SCORES = "teacher_scores"
QUERY_ROW_KEYS = (POS_KEY, NO_IN_BATCH_NEG, TEACHER_SCORES)


def per_token(pass_name: str) -> str:
  """The per-token field besides ids / mask of a pass: pool_mask (embedding) or labels (generative)."""
  return LABELS if pass_name == GEN else POOL_MASK


def key(pass_name: str, field: str) -> str:
  """The batch key of one field of a pass, e.g. key(GEN, LABELS) == 'gen_labels'."""
  return f"{pass_name}_{field}"


def padded_keys(pass_name: str) -> tuple[str, ...]:
  """The arrays of a padded pass: ids, mask and its per-token field."""
  return tuple(key(pass_name, f) for f in (IDS, MASK, per_token(pass_name)))


def packed_fields(pass_name: str) -> tuple[str, ...]:
  """The [U, R, L] fields of a packed pass (besides `lengths` [U, n])."""
  return (IDS, SEGMENT_IDS, POSITIONS, per_token(pass_name))


def is_packed(batch, pass_name: str) -> bool:
  """A pass is packed when the batch has its segment ids."""
  return key(pass_name, SEGMENT_IDS) in batch


def has_pass(batch, pass_name: str) -> bool:
  return key(pass_name, IDS) in batch


# The keys named most often.
QUERY_IDS, QUERY_MASK, QUERY_POOL_MASK = padded_keys(QUERY)
PASSAGE_IDS, PASSAGE_MASK, PASSAGE_POOL_MASK = padded_keys(PASSAGE)
GEN_IDS, GEN_MASK, GEN_LABELS = padded_keys(GEN)
GEN_SEGMENT_IDS, GEN_POSITIONS, GEN_LENGTHS = (key(GEN, f) for f in (SEGMENT_IDS, POSITIONS, LENGTHS))
QUERY_LENGTHS = key(QUERY, LENGTHS)
