"""LoRA as an unmerged float32 branch on the adapted Dense layers' outputs (for bfloat16 frozen weights).

Merging ``W + ΔW`` into a bfloat16 kernel rounds away every update below half a bf16 ulp of ``W``: with
|W| ≈ 0.03 and ΔW of std 1e-5 (a LoRA early in training at lr 5e-5) most of it. The paper's authors keep the
frozen weights in half precision and add a separate float32 ``LoRALinearLayer`` to each adapted layer
(sail-sg/finetune-fair-diffusion, exp-*/1-main-debias.py: ``LoRAAttnProcessor``,
``LoraLoaderMixin._modify_text_encoder(..., dtype=torch.float32)``). Here the frozen tree stays untouched
and, inside :func:`flax.linen.intercept_methods`, every ``nn.Dense`` whose module path is in the LoRA tree
returns ``dense(x).astype(float32) + scale * (x @ down) @ up`` computed in float32 (so the layer's
output is float32; the next bf16 layer casts its input as it always does). No model surgery: any
unchanged Flax model works, and the branch is differentiable with respect to the LoRA factors.

Generation gets the adapted weights from ``adaptors.transform.adapt_weights`` (LoRA merged where the kernels
are float32, a :class:`LoraBranch` per component otherwise) and wraps each model call with :func:`with_branch`;
for a single function :func:`lora_adapted` does both::

    unet_fn, unet_params = lora_adapted(unet_fn, frozen_unet, lora["unet"], scale=scale)
    eps = unet_fn(unet_params, latents, timesteps, context)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from fairdiff_jax.adaptors.lora import apply_lora, lora_modules
from fairdiff_jax.errors import FairdiffError

LORA_MODES = ("auto", "merge", "branch")


class LoraBranch(NamedTuple):
    """The unmerged LoRA of one component: its factor tree and ``alpha / rank`` (a pytree, so it can be jit input)."""

    factors: Any
    scale: Any


def lora_branch(
    inputs: jax.Array, down: jax.Array, up: jax.Array, scale: float | jax.Array, dtype=jnp.float32
) -> jax.Array:
    """``scale * (inputs @ down) @ up`` computed in ``dtype`` (float32): ``[..., in] -> [..., out]``."""
    hidden = jnp.matmul(inputs.astype(dtype), down.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return scale * jnp.matmul(hidden, up.astype(dtype), precision=jax.lax.Precision.HIGHEST)


def _interceptor(modules: Mapping[tuple[str, ...], dict], scale, hits: set):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        factors = modules.get(tuple(module.path))
        if factors is None:
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        if np.shape(factors["down"])[0] != inputs.shape[-1] or np.shape(factors["up"])[1] != module.features:
            raise FairdiffError(
                f"LoRA module {'/'.join(module.path)} has factors {np.shape(factors['down'])} @ "
                f"{np.shape(factors['up'])} but the layer maps {inputs.shape[-1]} -> {module.features} features; "
                "the adaptor was made for a different base model."
            )
        hits.add(tuple(module.path))
        base = next_fun(*args, **kwargs)
        dtype = jnp.promote_types(base.dtype, jnp.float32)  # float32, or float64 for a float64 model
        return base.astype(dtype) + lora_branch(inputs, factors["down"], factors["up"], scale, dtype)

    return intercept


def call_with_lora_branch(fn: Callable, lora_params: Mapping, *, scale: float | jax.Array) -> Callable:
    """``fn`` (any function that applies a Flax model) with the float32 LoRA branch on the LoRA tree's Dense layers.

    The wrapped function has ``fn``'s signature; pass it the *frozen* parameters. Raises FairdiffError when
    a LoRA module was never called as an ``nn.Dense`` (an adaptor for a different model).
    """
    modules = {tuple(str(p) for p in path): factors for path, factors in lora_modules(lora_params).items()}

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        hits: set = set()
        with nn.intercept_methods(_interceptor(modules, scale, hits)):
            out = fn(*args, **kwargs)
        missing = sorted("/".join(path) for path in set(modules) - hits)
        if missing:
            raise FairdiffError(
                f"LoRA module(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} were never called as a Dense "
                "layer of this model; the adaptor was made for a different model — apply it to its own base model."
            )
        return out

    return wrapped


def with_branch(fn: Callable, branch: LoraBranch | None) -> Callable:
    """``fn`` with ``branch``'s float32 LoRA branch (:func:`call_with_lora_branch`), or ``fn`` itself for None."""
    return fn if branch is None else call_with_lora_branch(fn, branch.factors, scale=branch.scale)


def kernels_are_float32(frozen_params: Mapping, lora_params: Mapping) -> bool:
    """Whether every frozen kernel that ``lora_params`` adapts is float32 (then merging loses nothing)."""
    flat = flatten_dict(dict(frozen_params))
    kernels = [flat.get(path + ("kernel",)) for path in lora_modules(lora_params)]
    return all(k is not None and np.dtype(k.dtype) == np.float32 for k in kernels)


def lora_adapted(
    fn: Callable, frozen_params: Mapping, lora_params: Mapping, *, scale: float | jax.Array, mode: str = "auto"
) -> tuple[Callable, dict]:
    """``(fn', params')`` such that ``fn'(params', ...)`` is ``fn`` on the LoRA-adapted model.

    ``mode="auto"`` merges (:func:`apply_lora`) when the adapted kernels are float32 and otherwise adds the
    unmerged float32 branch (:func:`call_with_lora_branch`) and keeps the frozen parameters as they are;
    ``"merge"`` / ``"branch"`` force one. ``fn`` takes the parameters first, e.g.
    ``lambda p, z, t, c: unet.apply({"params": p}, z, t, c).sample``.
    """
    if mode not in LORA_MODES:
        raise FairdiffError(f"unknown LoRA mode '{mode}'; use one of {list(LORA_MODES)} ('auto' is right for most).")
    if mode == "merge" or (mode == "auto" and kernels_are_float32(frozen_params, lora_params)):
        return fn, apply_lora(frozen_params, lora_params, scale=scale)
    return call_with_lora_branch(fn, lora_params, scale=scale), frozen_params
