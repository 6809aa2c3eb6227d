"""LoRA as a pure parameter transform: ``kernel + scale * down @ up`` on the targeted Dense kernels.

No model surgery: ``apply_lora(frozen, lora, scale=alpha / rank)`` returns a new parameter tree that any
unchanged Flax model consumes. Targets are regular expressions matched against the '/'-joined *module*
path of each 2-D ``kernel`` (e.g. ``text_model/encoder/layers/0/self_attn/q_proj`` or
``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q``).

The LoRA tree mirrors the module paths of the frozen tree, with ``{"down": [in, r], "up": [r, out]}`` in
place of the kernel (Flax ``[in, out]`` layout), so optax masks and orbax checkpoints see plain nested dicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.errors import FairdiffError

# CLIP text encoder: attention q/k/v/out and the MLP of every layer (the paper's text-encoder LoRA).
TEXT_ENCODER_TARGETS = (r"(^|/)self_attn/(q_proj|k_proj|v_proj|out_proj)$", r"(^|/)mlp/(fc1|fc2)$")
# U-Net: to_q, to_k, to_v, to_out.0 of every attention block (self- and cross-attention).
UNET_TARGETS = (r"(^|/)attn[12]/(to_q|to_k|to_v|to_out_0)$",)
DEFAULT_TARGETS = {"text_encoder": TEXT_ENCODER_TARGETS, "unet": UNET_TARGETS}

ModulePath = tuple[str, ...]


def lora_scale(rank: int, alpha: float) -> float:
    """The factor ``alpha / rank`` that multiplies ``down @ up`` (PEFT's ``scaling``)."""
    if int(rank) < 1 or float(alpha) <= 0:
        raise FairdiffError(f"LoRA rank must be >= 1 and alpha > 0 (got rank={rank}, alpha={alpha}); fix the config.")
    return float(alpha) / int(rank)


def _resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets not in DEFAULT_TARGETS:
            raise FairdiffError(
                f"unknown LoRA target set '{targets}'; use one of {sorted(DEFAULT_TARGETS)} or a list of regular "
                "expressions over module paths."
            )
        return DEFAULT_TARGETS[targets]
    return tuple(targets)


def find_lora_targets(frozen_params: Mapping, targets: str | Sequence[str]) -> list[ModulePath]:
    """Module paths (sorted) whose 2-D ``kernel`` matches one of ``targets`` (patterns or a default set name)."""
    patterns = [re.compile(p) for p in _resolve_targets(targets)]
    found = []
    for path, value in flatten_dict(dict(frozen_params)).items():
        if str(path[-1]) != "kernel":
            continue
        module = tuple(str(p) for p in path[:-1])
        if any(p.search("/".join(module)) for p in patterns):
            if len(np.shape(value)) != 2:
                raise FairdiffError(
                    f"LoRA target {'/'.join(module)} has a {len(np.shape(value))}-D kernel; only Dense (2-D) kernels "
                    "can be adapted — narrow the target patterns."
                )
            found.append(module)
    if not found:
        raise FairdiffError(
            f"no parameter matches the LoRA targets {list(_resolve_targets(targets))}; check the patterns against "
            "the model's module paths (e.g. text_model/encoder/layers/0/self_attn/q_proj)."
        )
    return sorted(found)


def init_lora(
    key: jax.Array,
    frozen_params: Mapping,
    targets: str | Sequence[str],
    rank: int,
    *,
    dtype=jnp.float32,
) -> dict:
    """LoRA factors for every targeted kernel: ``down`` [in, r] ~ N(0, (1/r)^2), ``up`` [r, out] zero.

    As diffusers' ``LoRALinearLayer`` (``normal_(down, std=1 / rank)``, ``zeros_(up)``), the layer the paper's
    authors train (sail-sg/finetune-fair-diffusion, exp-*/1-main-debias.py: ``LoRAAttnProcessor`` and
    ``LoraLoaderMixin._modify_text_encoder``); ``up = 0`` starts the adapted model exactly at the base model.
    The factor ``alpha / rank`` is applied by :func:`apply_lora`.
    """
    if int(rank) < 1:
        raise FairdiffError(f"LoRA rank must be >= 1 (got {rank}); the paper uses 50.")
    modules = find_lora_targets(frozen_params, targets)
    flat = flatten_dict(dict(frozen_params))
    keys = jax.random.split(key, len(modules))
    out = {}
    for module, module_key in zip(modules, keys):
        fan_in, fan_out = np.shape(flat[module + ("kernel",)])
        down = jax.random.normal(module_key, (fan_in, int(rank)), dtype) / int(rank)
        out[module] = {"down": down, "up": jnp.zeros((int(rank), fan_out), dtype)}
    return unflatten_dict(out)


def lora_modules(lora_params: Mapping) -> dict[ModulePath, dict]:
    """``{module path: {"down": [in, r], "up": [r, out]}}`` of a LoRA tree."""
    flat = flatten_dict(dict(lora_params))
    modules: dict[ModulePath, dict] = {}
    for path, value in flat.items():
        if str(path[-1]) not in ("down", "up"):
            raise FairdiffError(f"LoRA tree entry {'/'.join(map(str, path))} is not 'down' or 'up'; not a LoRA tree.")
        modules.setdefault(tuple(str(p) for p in path[:-1]), {})[str(path[-1])] = value
    return modules


def lora_delta(down: jax.Array, up: jax.Array, scale: float | jax.Array) -> jax.Array:
    """``scale * down @ up``: the [in, out] kernel update of one module (full float32 precision)."""
    return scale * jnp.matmul(down, up, precision=jax.lax.Precision.HIGHEST)


def apply_lora(frozen_params: Mapping, lora_params: Mapping, *, scale: float | jax.Array) -> dict:
    """The frozen tree with ``kernel + scale * down @ up`` on every module of ``lora_params``.

    Pure and jit/grad friendly; differentiate w.r.t. ``lora_params`` only. The result has the frozen
    kernels' dtype. Raises FairdiffError when a LoRA module or shape does not exist in the frozen tree
    (an adaptor applied to a different base model).
    """
    flat = flatten_dict(dict(frozen_params))
    for module, factors in lora_modules(lora_params).items():
        kernel_path = module + ("kernel",)
        name = "/".join(module)
        if kernel_path not in flat:
            raise FairdiffError(
                f"LoRA module {name} does not exist in the base model; the adaptor was made for a different "
                "model — apply it to the base model it was trained on."
            )
        kernel = flat[kernel_path]
        down, up = factors.get("down"), factors.get("up")
        if down is None or up is None:
            raise FairdiffError(f"LoRA module {name} lacks its 'down' or 'up' factor; the adaptor file is incomplete.")
        if np.shape(down)[0] != np.shape(kernel)[0] or np.shape(up)[1] != np.shape(kernel)[1]:
            raise FairdiffError(
                f"LoRA module {name} has factors {np.shape(down)} @ {np.shape(up)} but the base kernel is "
                f"{np.shape(kernel)}; the adaptor was made for a different base model."
            )
        delta = lora_delta(down, up, scale)
        flat[kernel_path] = (kernel.astype(delta.dtype) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)
