"""Name and layout mapping between PyTorch (diffusers/transformers) state dicts and Flax parameter trees.

Pure numpy: no torch import. The mapping is driven by the *expected* Flax tree (from ``jax.eval_shape``),
so every expected key and shape is checked, and the same rules run backwards to write PyTorch-layout
files from Flax parameters (used for tiny test folders and for adaptor export).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.errors import FairdiffError

# Flax module names ``name_N`` that are ``name.N`` (list entries) in PyTorch.
_INDEXED_MODULES = (
    "down_blocks",
    "up_blocks",
    "attentions",
    "resnets",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
)
_INDEXED_RE = re.compile(r"^(" + "|".join(_INDEXED_MODULES) + r")_(\d+)$")

# The Flax VAE attention block names its projections differently from PyTorch diffusers. The first
# PyTorch name is the current one; the second is the legacy name found in older checkpoints.
_VAE_ATTENTION_NAMES = {
    "query": ("to_q", "query"),
    "key": ("to_k", "key"),
    "value": ("to_v", "value"),
    "proj_attn": ("to_out.0", "proj_attn"),
}

# PyTorch keys that are buffers or otherwise carry no trainable weight in the Flax model.
IGNORED_PT_KEYS = re.compile(r"(^|\.)position_ids$")

FlaxPath = tuple[str, ...]


def pt_module_name(flax_module_path: FlaxPath) -> str:
    """Dotted PyTorch module name of a Flax module path, e.g. ``('down_blocks_0', 'attentions_0')``."""
    parts = []
    for part in flax_module_path:
        part = str(part)
        match = _INDEXED_RE.match(part)
        parts.append(f"{match.group(1)}.{match.group(2)}" if match else part)
    return ".".join(parts)


def pt_key_candidates(flax_path: FlaxPath) -> list[str]:
    """PyTorch state-dict keys that may hold the Flax parameter at ``flax_path`` (preferred first)."""
    *module, leaf = (str(p) for p in flax_path)
    pt_leaf = "bias" if leaf == "bias" else "weight"
    candidates = []
    if module and module[-1] in _VAE_ATTENTION_NAMES and len(module) >= 2 and module[-2].startswith("attentions_"):
        prefix = pt_module_name(tuple(module[:-1]))
        for name in _VAE_ATTENTION_NAMES[module[-1]]:
            candidates.append(f"{prefix}.{name}.{pt_leaf}")
    else:
        candidates.append(f"{pt_module_name(tuple(module))}.{pt_leaf}")
        if leaf in ("scale", "bias") and module and "norm" in module[-1]:
            # very old checkpoints name LayerNorm parameters gamma/beta
            candidates.append(f"{pt_module_name(tuple(module))}.{'gamma' if leaf == 'scale' else 'beta'}")
    return candidates


def pt_to_flax_layout(flax_path: FlaxPath, array: np.ndarray, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Convert one PyTorch tensor to the Flax layout of the parameter at ``flax_path``."""
    leaf = str(flax_path[-1])
    if leaf == "kernel":
        if array.ndim == 4 and len(expected_shape) == 4:  # conv [O, I, H, W] -> [H, W, I, O]
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 4 and len(expected_shape) == 2 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0].T  # legacy 1x1-conv attention projections
        elif array.ndim == 2 and len(expected_shape) == 4 and expected_shape[:2] == (1, 1):
            array = array.T[None, None]  # linear projection stored where Flax expects a 1x1 conv
        elif array.ndim == 2:  # linear [O, I] -> [I, O]
            array = array.T
    return array


def flax_to_pt_layout(flax_path: FlaxPath, array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pt_to_flax_layout` for the canonical layouts."""
    if str(flax_path[-1]) == "kernel":
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
        if array.ndim == 2:
            return array.T
    return array


def convert_pt_state_dict(
    state_dict: Mapping[str, np.ndarray],
    expected: Mapping,
    *,
    component: str,
    source: str,
) -> dict:
    """Map a PyTorch state dict (numpy arrays) onto the Flax tree whose shapes are ``expected``.

    Args:
      state_dict: PyTorch key -> numpy array, as read from a safetensors file.
      expected: a nested dict of ``jax.ShapeDtypeStruct`` (or arrays) from ``jax.eval_shape``.
      component: ``unet``, ``vae`` or ``text_encoder``; used in error messages.
      source: the file the state dict came from; used in error messages.

    Returns: the nested Flax parameter dict of numpy arrays (float32 unless the file said otherwise).
    Raises FairdiffError naming the first missing key, shape mismatch, or unexpected keys.
    """
    flat_expected = flatten_dict(dict(expected))
    used: set[str] = set()
    out = {}
    for flax_path, spec in flat_expected.items():
        candidates = pt_key_candidates(flax_path)
        pt_key = next((c for c in candidates if c in state_dict), None)
        if pt_key is None:
            raise FairdiffError(
                f"{component}: {source} has no weight '{candidates[0]}' (needed for Flax parameter "
                f"{'/'.join(map(str, flax_path))}); the file does not match {component}/config.json — "
                "point to a complete Stable Diffusion folder in the diffusers layout."
            )
        used.add(pt_key)
        value = pt_to_flax_layout(flax_path, np.asarray(state_dict[pt_key]), tuple(spec.shape))
        if tuple(value.shape) != tuple(spec.shape):
            raise FairdiffError(
                f"{component}: weight '{pt_key}' in {source} has shape {tuple(state_dict[pt_key].shape)}, "
                f"but {component}/config.json implies {tuple(spec.shape)} (Flax layout) — the weights and "
                "the config come from different models."
            )
        out[flax_path] = value
    unexpected = sorted(k for k in state_dict if k not in used and not IGNORED_PT_KEYS.search(k))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise FairdiffError(
            f"{component}: {source} has {len(unexpected)} weight(s) that {component}/config.json does not "
            f"describe ({shown}); the weights and the config come from different models."
        )
    return unflatten_dict(out)


def flax_to_pt_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """PyTorch-layout state dict (preferred key names) of a Flax parameter tree."""
    state = {}
    for flax_path, value in flatten_dict(dict(params)).items():
        state[pt_key_candidates(flax_path)[0]] = np.ascontiguousarray(flax_to_pt_layout(flax_path, np.asarray(value)))
    return state
