"""fairdiff-jax: finetune text-to-image diffusion models for fairness (Shen et al., ICLR 2024) in JAX."""

from fairdiff_jax.errors import FairdiffError

__version__ = "0.1.0"
__all__ = ["FairdiffError", "__version__"]
