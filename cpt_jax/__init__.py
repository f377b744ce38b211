"""cpt_jax: efficient continual pre-training of language models in JAX/Flax (see README.md)."""
