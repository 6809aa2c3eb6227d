"""Narrow numerical fixes to diffusers' Flax modules so they compute what the PyTorch originals compute.

diffusers 0.39's ``FlaxGEGLU`` (the feed-forward of every U-Net transformer block) calls ``flax.linen.gelu``,
whose default is the tanh approximation, while PyTorch diffusers' ``GEGLU`` uses the exact erf GELU that
Stable Diffusion was trained with. On random tiny weights the difference alone is a 1.3e-4 relative error
in the noise prediction (measured in float64 on both sides). We swap the ``nn`` name that
``diffusers.models.attention_flax`` resolves at call time for a view of ``flax.linen`` whose ``gelu`` is
exact; every other attribute is flax.linen's own.

Two speed patches keep the numbers and change how they are computed:
- convolutions of the U-Net and the VAE go through ``models.conv.backend_conv_general_dilated``
  (canonical-layout gradients on CPU, the stock convolution elsewhere), via the same ``nn`` views;
- the U-Net's and VAE's attention and the CLIP towers' attention go through ``models.attention`` (subclasses
  with the original parameters, swapped in for the class names diffusers / transformers resolve at setup).
"""

from __future__ import annotations

import functools
import logging
import types

import flax.linen
import jax

from fairdiff_jax.models.conv import backend_conv_general_dilated


class _LinenWithFastConv(types.ModuleType):
    """``flax.linen`` whose ``Conv`` routes through the backend-chosen convolution (same fields and parameters)."""

    Conv = staticmethod(functools.partial(flax.linen.Conv, conv_general_dilated=backend_conv_general_dilated))

    def __getattr__(self, name):
        return getattr(flax.linen, name)


class _LinenWithExactGelu(_LinenWithFastConv):
    gelu = staticmethod(functools.partial(jax.nn.gelu, approximate=False))


class _DropPinnedFlaxDeprecation(logging.Filter):
    """We pin the last diffusers/transformers releases with Flax classes on purpose (DESIGN.md §2), so
    their per-instance "Flax classes are deprecated" warnings carry no information for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("classes are deprecated" in message and ("Flax" in message or "JAX" in message))


def apply_patches() -> None:
    """Idempotently install the fixes (called when ``fairdiff_jax.models`` is imported)."""
    from diffusers.models import attention_flax, resnet_flax, vae_flax
    from diffusers.models.unets import unet_2d_condition_flax
    from diffusers.utils import logging as diffusers_logging
    from transformers.models.clip import modeling_flax_clip
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):
        for handler in library_logging._get_library_root_logger().handlers:
            if not any(isinstance(f, _DropPinnedFlaxDeprecation) for f in handler.filters):
                handler.addFilter(_DropPinnedFlaxDeprecation())

    if not isinstance(attention_flax.nn, _LinenWithExactGelu):
        attention_flax.nn = _LinenWithExactGelu("flax.linen")
    for module in (resnet_flax, vae_flax, unet_2d_condition_flax):
        if not isinstance(module.nn, _LinenWithFastConv):
            module.nn = _LinenWithFastConv("flax.linen")

    from fairdiff_jax.models import attention

    attention_flax.FlaxAttention = attention.FusedFlaxAttention
    vae_flax.FlaxAttentionBlock = attention.FusedVAEAttentionBlock
    modeling_flax_clip.FlaxCLIPAttention = attention.FusedCLIPAttention
