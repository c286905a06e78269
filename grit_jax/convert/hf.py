"""Hugging Face safetensors of every family (modeling.families.FAMILIES) <-> grit_jax param pytrees, tensor by tensor.

The rename table (`hf_entries`) is the whole conversion: each HF tensor maps to one param leaf (or one expert's
slice of the stacked [E, ...] expert weights, or one layer's slice of the scanned `layers/` stack). Linear weights
are transposed (HF [out, in] -> Flax [in, out]) and reshaped to the leaf's shape (q_proj [D, H, Dh], o_proj
[H, Dh, D]); biases are reshaped (q_proj.bias [H * Dh] -> [H, Dh]); everything else is copied. Loading reads one tensor at a time from the memory-mapped safetensors files
into preallocated leaves, so only one full copy of the weights is ever held; saving writes shard by shard.

The file handling beneath (safetensors, atomic folders) is convert/tensor_files.py; the grit_jax directory format
convert/jax_dir.py; peft adapter directories convert/peft_adapter.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
from typing import Iterator

import numpy as np
from safetensors import safe_open

from grit_jax.convert.tensor_files import (get_tensor, host, map_shapes, numpy_dtype, open_safetensors,
                                           parse_size, require_dir, require_finite, save_safetensors,
                                           write_sorted_json)
from grit_jax.errors import GritJaxError
from grit_jax.fileio import read_json
from grit_jax.modeling.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# the grit_jax format (convert/jax_dir.py): its weights are never HF's, and is_jax_dir tells the formats apart
JAX_PARAMS_FILE = "params.safetensors"
JAX_FORMAT = "grit_jax"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some old checkpoints saved


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor. `path`: param path inside a layer (layer is not None) or at the top; `expert`: index into the
  leading [E] axis; `linear`: transpose + reshape with `in_dims` leading input dims on the Flax side."""
  name: str
  path: tuple[str, ...]
  layer: int | None = None
  expert: int | None = None
  linear: bool = False
  in_dims: int = 1
  bias: bool = False  # HF [prod(shape)] <-> the leaf's shape


# Expert weights: (Mixtral's name, Qwen3-MoE's name) for each stacked leaf
_EXPERT_NAMES = {"w1": ("w1", "gate_proj"), "w2": ("w2", "down_proj"), "w3": ("w3", "up_proj")}


def hf_entries(config: ModelConfig) -> list[Entry]:
  """The rename table, in the order HF files list tensors."""
  out = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"))]
  norms = (("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
           if config.gemma_norms else ("input_layernorm", "post_attention_layernorm"))
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    lin = lambda name, path, in_dims=1, expert=None: Entry(pre + name, path, i, expert, True, in_dims)
    bias = lambda name, path: Entry(pre + name, path, i, bias=True)
    for p in "qkvo":
      out.append(lin(f"self_attn.{p}_proj.weight", ("self_attn", f"{p}_proj", "kernel"), in_dims=2 if p == "o" else 1))
      if config.o_bias if p == "o" else config.qkv_bias:
        out.append(bias(f"self_attn.{p}_proj.bias", ("self_attn", f"{p}_proj", "bias")))
    if config.qk_norm:
      out += [Entry(pre + f"self_attn.{p}_norm.weight", ("self_attn", f"{p}_norm", "scale"), i) for p in "qk"]
    if config.layer_is_moe(i):
      mixtral = config.family == "mixtral"
      block = "block_sparse_moe" if mixtral else "mlp"
      out.append(lin(f"{block}.gate.weight", (block, "gate", "kernel")))
      for e in range(config.num_experts):
        out += [lin(f"{block}.experts.{e}.{names[not mixtral]}.weight", (block, w), expert=e)
                for w, names in _EXPERT_NAMES.items()]
    else:
      for p in ("gate", "up", "down"):
        out.append(lin(f"mlp.{p}_proj.weight", ("mlp", f"{p}_proj", "kernel")))
        if config.mlp_bias:
          out.append(bias(f"mlp.{p}_proj.bias", ("mlp", f"{p}_proj", "bias")))
    out += [Entry(pre + f"{n}.weight", (n, "scale"), i) for n in norms]
  out.append(Entry("model.norm.weight", ("norm", "scale")))
  if not config.tie_word_embeddings:
    out.append(Entry("lm_head.weight", ("lm_head", "kernel"), linear=True))
  return out


def param_shapes(config: ModelConfig) -> dict:
  """Nested dict of leaf shapes (unscanned layout), from the model itself."""
  import jax
  import jax.numpy as jnp
  from grit_jax.modeling.model import Transformer, unscan_params

  cfg = config.replace(scan_layers=False, remat_policy="none")
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda i: Transformer(cfg).init(jax.random.PRNGKey(0), i, causal=True)["params"], ids)
  return jax.tree.map(lambda x: tuple(x.shape), unscan_params(abstract))


def leaf_ref(params: dict, entry: Entry):
  """(leaf array, index tuple) that `entry` reads or writes, in any layout (`model.scanned_period`)."""
  from grit_jax.modeling.model import stacked_ref
  node, idx = (params, ()) if entry.layer is None else stacked_ref(params, entry.layer)
  for key in entry.path:
    node = node[key]
  return node, idx + (() if entry.expert is None else (entry.expert,))


def _hf_shape(entry: Entry, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if entry.bias:
    return (math.prod(flax_shape),)
  if not entry.linear:
    return tuple(flax_shape)
  return (math.prod(flax_shape[entry.in_dims:]), math.prod(flax_shape[:entry.in_dims]))


def to_flax(entry: Entry, tensor: np.ndarray, flax_shape) -> np.ndarray:
  return tensor.T.reshape(flax_shape) if entry.linear else tensor.reshape(flax_shape)


def to_hf(entry: Entry, value: np.ndarray) -> np.ndarray:
  if not entry.linear:
    return value.reshape(_hf_shape(entry, value.shape))
  return value.reshape(_hf_shape(entry, value.shape)[::-1]).T


# ---------------------------------------------------------------------------------------------------------------
# Reading Hugging Face directories


def weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file, from model.safetensors.index.json or the *.safetensors files."""
  path = require_dir(path)
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    try:
      weight_map = read_json(index, "the safetensors index")["weight_map"]
    except (KeyError, TypeError) as e:
      raise GritJaxError(f"{index}: not a safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise GritJaxError(f"{index}: not a safetensors index (weight_map must map names to shard file names)")
    for fname in sorted(set(weight_map.values())):
      # A shard is a file of this folder: an index naming ../x or /abs/x would read weights from elsewhere.
      if os.path.isabs(fname) or os.path.normpath(fname).split(os.sep)[0] in ("..", "") or "\\" in fname:
        raise GritJaxError(f"{index}: lists shard {fname!r}, outside the model folder {path}: refused")
      if not os.path.isfile(os.path.join(path, fname)):
        raise GritJaxError(f"{index}: lists shard {fname!r}, which is missing from {path}")
    return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != JAX_PARAMS_FILE)
  if not files:
    raise GritJaxError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not read)")
  out = {}
  for fname in files:
    full = os.path.join(path, fname)
    try:
      with safe_open(full, framework="np") as f:
        out.update({name: full for name in f.keys()})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise GritJaxError(f"{full}: unreadable safetensors file ({e})") from e
  return out


def _alloc(shapes: dict, dtype, period: int, num_layers: int) -> dict:
  """Uninitialised numpy leaves in the layout `model.scanned_period` calls `period` (0 = unscanned; 1 = layers
  stacked on a leading axis; P > 1 = layers/layers_{j} stacked over the num_layers // P blocks)."""
  layer_keys = [f"layers_{i}" for i in range(num_layers)]
  out = {k: map_shapes(v, lambda s: np.empty(s, dtype)) for k, v in shapes.items() if k not in layer_keys}
  if period == 1:
    out["layers"] = map_shapes(shapes["layers_0"], lambda s: np.empty((num_layers,) + s, dtype))
  elif period:
    out["layers"] = {f"layers_{j}": map_shapes(shapes[f"layers_{j}"],
                                                lambda s: np.empty((num_layers // period,) + s, dtype))
                     for j in range(period)}
  else:
    out.update({k: map_shapes(shapes[k], lambda s: np.empty(s, dtype)) for k in layer_keys})
  return out


def load_hf(path: str, config: ModelConfig | None = None) -> dict:
  """Params (numpy, config.param_dtype, in config.scan_layers' layout) from an HF Mistral/Mixtral directory.
  `config` defaults to the directory's config.json. Missing, extra or misshapen tensors raise GritJaxError."""
  path = require_dir(path)
  config = config or ModelConfig.from_hf(path)
  files = weight_files(path)
  dtype = np.dtype(numpy_dtype(config.param_dtype))
  shapes = param_shapes(config)
  params = _alloc(shapes, dtype, config.scan_period if config.scan_layers else 0, config.num_layers)
  entries = hf_entries(config)
  known = {e.name for e in entries}
  extra = sorted(n for n in files if n not in known and not _IGNORED.match(n))
  if extra:
    raise GritJaxError(f"{path}: unexpected tensor(s) for a {config.num_layers}-layer {config.family} model: "
                       f"{extra[:5]}")
  with contextlib.ExitStack() as stack:
    handles = {}
    for e in entries:
      if e.name not in files:
        raise GritJaxError(f"{path}: missing weight tensor {e.name!r}")
      fname = files[e.name]
      if fname not in handles:
        handles[fname] = stack.enter_context(open_safetensors(fname))
      leaf, idx = leaf_ref(params, e)
      flax_shape = leaf[idx].shape
      tensor = get_tensor(handles[fname], e.name, fname)
      want = _hf_shape(e, flax_shape)
      if tuple(tensor.shape) != want:
        raise GritJaxError(f"{fname}: tensor {e.name!r} has shape {tuple(tensor.shape)}, the config "
                           f"({config.num_layers} layers, hidden {config.hidden_size}) expects {want}")
      require_finite(tensor, f"{fname}: tensor {e.name!r}")
      leaf[idx] = to_flax(e, tensor, flax_shape).astype(dtype)
  return params


# ---------------------------------------------------------------------------------------------------------------
# Writing Hugging Face directories


def hf_tensors(params: dict, config: ModelConfig, dtype=None) -> Iterator[tuple[str, tuple, object]]:
  """(HF name, HF shape, numpy dtype, thunk -> contiguous numpy tensor) in file order; params scanned or not."""
  import flax.linen as nn
  params = nn.meta.unbox(params)
  for e in hf_entries(config):
    try:
      leaf, idx = leaf_ref(params, e)
    except KeyError as err:
      raise GritJaxError(f"params: missing leaf {err} for HF tensor {e.name!r}") from err
    shape = tuple(leaf.shape[len(idx):])

    def thunk(e=e, leaf=leaf, idx=idx):
      value = host(leaf[idx] if idx else leaf)
      if dtype is not None:
        value = value.astype(dtype)
      return np.ascontiguousarray(to_hf(e, value))

    yield e.name, _hf_shape(e, shape), np.dtype(dtype or leaf.dtype), thunk


def save_hf(params: dict, config: ModelConfig, out_dir: str, *, max_shard_size="5GB", dtype=None) -> str:
  """Write config.json + safetensors (one file, or shards + model.safetensors.index.json when larger than
  `max_shard_size`) into `out_dir` (created). `dtype` (e.g. "bfloat16") casts on the way out; default: the params'
  dtype. Not atomic on its own: write into a temporary directory (see `atomic_dir`)."""
  os.makedirs(out_dir, exist_ok=True)
  limit = parse_size(max_shard_size)
  np_dtype = None if dtype is None else np.dtype(numpy_dtype(dtype))
  shards, current, size = [], [], 0
  tensors = list(hf_tensors(params, config, np_dtype))
  for name, shape, dt, thunk in tensors:
    nbytes = math.prod(shape) * dt.itemsize
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = [], 0
    current.append((name, thunk))
    size += nbytes
  shards.append(current)
  n = len(shards)
  weight_map, total = {}, 0
  for k, shard in enumerate(shards):
    fname = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    arrays = {name: thunk() for name, thunk in shard}
    total += sum(a.nbytes for a in arrays.values())
    save_safetensors(arrays, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in arrays})
    del arrays
  if n > 1:
    write_sorted_json(os.path.join(out_dir, INDEX_FILE),
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
  out_dtype = str(np_dtype) if np_dtype is not None else str(tensors[0][2])
  write_sorted_json(os.path.join(out_dir, "config.json"), config.to_hf_dict(torch_dtype=out_dtype))
  return out_dir


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  copied = []
  for fname in TOKENIZER_FILES:
    src = os.path.join(src_dir, fname)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(dst_dir, fname))
      copied.append(fname)
  return copied


def hf_dtype_of(path: str) -> str:
  """The dtype of an HF directory's embedding tensor ("float32", "bfloat16" or "float16")."""
  name = "model.embed_tokens.weight"
  files = weight_files(path)
  if name not in files:
    raise GritJaxError(f"{path}: missing weight tensor {name!r}")
  with safe_open(files[name], framework="np") as f:
    code = f.get_slice(name).get_dtype()
  return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(code, "float32")


def is_jax_dir(path: str) -> bool:
  cfg = os.path.join(path, "config.json")
  if not os.path.isfile(cfg):
    return False
  try:
    return read_json(cfg).get("format") == JAX_FORMAT
  except (GritJaxError, AttributeError):  # unreadable: the HF reader names it
    return False
