"""vqkd_jax: VQ-KD tokenizers, pixel decoders and proposal networks in JAX/Flax."""

__version__ = "0.1.0"
