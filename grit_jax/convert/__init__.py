"""Hugging Face <-> grit_jax weight conversion (see hf.py) and the `grit-jax convert` command (cli.py)."""
