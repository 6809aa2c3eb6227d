"""The toy world: a tiny model with a known gender skew, debiased on a laptop CPU in minutes.

The settings live in the package (``fairdiff_jax/toyworld/demo_config.py``) so that ``fairdiff demo`` finds
them from any install; this file is the ``--config configs/toy.py[:ARG]`` entry for ``fairdiff train``.
"""

from fairdiff_jax.toyworld.demo_config import get_config

__all__ = ["get_config"]
