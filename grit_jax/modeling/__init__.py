"""Mistral / Mixtral in Flax Linen: config presets, the Transformer, its KV cache."""
from grit_jax.modeling.config import ModelConfig
from grit_jax.modeling.presets import get_config
from grit_jax.modeling.model import KVCache, Transformer, TransformerOutput, init_params, params_for

__all__ = ["ModelConfig", "get_config", "Transformer", "TransformerOutput", "KVCache", "init_params", "params_for"]
