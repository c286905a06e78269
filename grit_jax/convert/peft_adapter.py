"""LoRA adapters -> a peft adapter directory (adapter_config.json + adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(<the HF base model>, dir)` loads: each adapter named and flattened as its HF
projection (convert/hf.py's rename table)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from grit_jax.convert import hf
from grit_jax.convert.tensor_files import host, save_safetensors, write_sorted_json
from grit_jax.errors import GritJaxError
from grit_jax.modeling.config import ModelConfig


PEFT_CONFIG = "adapter_config.json"


PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_tensors(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """peft's adapter tensors (its key names for a CausalLM: base_model.model.<HF module>.lora_A.weight [r, in],
  .lora_B.weight [out, r]) of the LoRA params (scanned or not) of `config`: each adapter flattened as its HF
  projection's weight is (`to_hf`), so peft's W x + (alpha / r) B A x equals ours."""
  import flax.linen as nn
  params = nn.meta.unbox(params)
  out = {}
  for e in hf.hf_entries(config.replace(lora_rank=0)):
    if not e.linear or e.expert is not None or e.layer is None:
      continue
    node_ref = dataclasses.replace(e, path=e.path[:-1])
    node, idx = hf.leaf_ref(params, node_ref)
    if "lora_a" not in node:
      continue
    a, b = host(node["lora_a"][idx] if idx else node["lora_a"]), host(node["lora_b"][idx] if idx else node["lora_b"])
    r = a.shape[-1]
    module = "base_model.model." + e.name.removesuffix(".weight")
    out[module + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T.astype(np.float32))  # [r, in]
    out[module + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T.astype(np.float32))  # [out, r]
  if not out:
    raise GritJaxError("params: no LoRA adapters (lora_a / lora_b) to export")
  return out


def save_peft_adapter(params: dict, config: ModelConfig, out_dir: str, base_model: str = "") -> str:
  """An unmerged LoRA adapter directory (adapter_config.json + adapter_model.safetensors) that
  `peft.PeftModel.from_pretrained(<the HF base model>, out_dir)` loads. Not atomic on its own (`atomic_dir`)."""
  from grit_jax.modeling.config import LORA_TARGETS

  os.makedirs(out_dir, exist_ok=True)
  save_safetensors(peft_tensors(params, config), os.path.join(out_dir, PEFT_WEIGHTS),
                   metadata={"format": "pt"})
  write_sorted_json(os.path.join(out_dir, PEFT_CONFIG), {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
      "r": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
      "target_modules": sorted(LORA_TARGETS[t] for t in config.lora_targets), "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
      "init_lora_weights": True, "modules_to_save": None})
  return out_dir
