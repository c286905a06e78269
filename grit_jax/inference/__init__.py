"""Inference: the GritLM class (loading, forward passes) and its encode / generate / rag front ends."""
