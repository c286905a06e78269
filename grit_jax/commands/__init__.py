"""The command-line front ends of `grit-jax` (grit_jax/cli.py dispatches): they parse arguments and call the
library; no library module parses arguments (except `perf.aot`'s compile tool, which shares the recipe flags)."""
