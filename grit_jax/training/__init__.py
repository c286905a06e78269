"""Sharded GRIT training: mesh + logical rules (mesh), optimizer, sharded train state (state), the jitted step
(step), GradCache (gradcache), and the run loop (trainer, checkpoint, metrics_log, cli).

Submodules are imported explicitly (`from grit_jax.training import step`) so that `grit-jax --help` stays cheap.
"""
