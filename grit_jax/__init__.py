"""grit_jax: GRIT (Generative Representational Instruction Tuning) in JAX/Flax."""
