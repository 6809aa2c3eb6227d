"""Gradient-shaping identities shared by the sampler (the adjusted DFT's per-step c_i) and the regularisers
(the damped gradient inside the face box)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Identity in the forward pass; the backward pass multiplies the cotangent of ``x`` by ``scale``
    (broadcast to ``x``). ``scale`` itself gets no gradient."""
    return x


def _scale_gradient_fwd(x, scale):
    return x, scale


def _scale_gradient_bwd(scale, cotangent):
    return cotangent * scale.astype(cotangent.dtype), jnp.zeros_like(scale)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)
