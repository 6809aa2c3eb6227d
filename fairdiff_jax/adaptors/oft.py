"""Orthogonal finetuning (OFT, Qiu et al., NeurIPS 2023) as a pure parameter transform.

Each adapted Dense layer's input is rotated by a block-diagonal orthogonal matrix before the frozen kernel:
``y = (x @ blockdiag(R_1..R_r)) @ kernel + bias``, so the merged kernel is ``blockdiag(R) @ kernel`` (Flax
``[in, out]`` layout). Each block ``R_b`` [s, s] comes from a skew-symmetric ``Q_b`` through the Cayley
transform ``R = (I + Q)^-1 (I - Q)``, or through PEFT's truncated Neumann series
``I + 2Q + 2Q^2 + ... + 2Q^(h-1) + Q^h`` (an approximation of ``(I - Q)^-1 (I + Q)``), and ``Q_b`` is
stored as its strictly upper triangle, row-major: ``{"skew": [r, s(s-1)/2]}`` per module, zero at
initialisation (``R = I``: the adapted model starts at the base model).

This is the parametrisation of ``peft.tuners.oft`` (peft 0.21: ``OFTRotationModule``), so an adaptor
exported by :func:`peft_oft_state_dict` loads into PyTorch with ``PeftModel.from_pretrained`` and gives the
same outputs. COFT (``coft=True``) keeps every ``Q_b`` within a Frobenius ball of radius
``eps / sqrt(number of blocks)``; PEFT projects its parameter in place before every forward pass, here the
projection is applied inside the transform with a straight-through gradient, and :func:`project_oft` can
be applied to the parameters after each optimiser update to match PEFT's in-place projection exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.adaptors.lora import DEFAULT_TARGETS
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.convert import pt_module_name
from fairdiff_jax.models.safetensors_io import write_safetensors

ModulePath = tuple[str, ...]
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_HIGHEST = jax.lax.Precision.HIGHEST
# the PEFT release whose OFT parametrisation this module reproduces (PEFT < 0.18 used another Neumann series)
PEFT_FORMAT_VERSION = "0.21.2"


@dataclasses.dataclass(frozen=True)
class OFTSettings:
    """How the rotations are shaped and parametrised; give exactly one of ``block_size`` or ``num_blocks``.

    Defaults follow ``peft.OFTConfig`` except ``cayley_neumann``: the exact Cayley transform of the OFT paper.
    """

    block_size: int = 32  # s: the size of each orthogonal block (PEFT ``oft_block_size``)
    num_blocks: int = 0  # r: blocks per layer (PEFT ``r``); 0 = derived from block_size per layer
    coft: bool = False  # constrained OFT: keep each Q_b within an eps-ball
    eps: float = 6e-5  # COFT radius (PEFT's default)
    block_share: bool = False  # one block shared by every block position of a layer
    cayley_neumann: bool = False  # PEFT's Neumann-series approximation instead of the exact inverse
    num_neumann_terms: int = 5

    def __post_init__(self):
        if (int(self.block_size) > 0) == (int(self.num_blocks) > 0):
            raise FairdiffError(
                f"OFT needs exactly one of block_size or num_blocks > 0 (got block_size={self.block_size}, "
                f"num_blocks={self.num_blocks}); set the other to 0 (e.g. block_size=32, num_blocks=0)."
            )
        if self.coft and float(self.eps) <= 0:
            raise FairdiffError(f"COFT needs eps > 0 (got {self.eps}); PEFT's default is 6e-5.")
        if self.cayley_neumann and int(self.num_neumann_terms) < 1:
            raise FairdiffError(f"num_neumann_terms must be >= 1 (got {self.num_neumann_terms}); PEFT uses 5.")

    def block_layout(self, in_features: int, name: str = "layer") -> tuple[int, int]:
        """``(num_blocks, block_size)`` for a layer with ``in_features`` inputs (they must divide exactly)."""
        given = int(self.block_size) or int(self.num_blocks)
        if in_features % given:
            which = "block_size" if self.block_size else "num_blocks"
            raise FairdiffError(
                f"OFT {which}={given} does not divide the {in_features} inputs of {name}; choose a divisor "
                "(SD 1.5's attention widths 320/640/1280/768 are all multiples of 32)."
            )
        if self.block_size:
            return in_features // given, given
        return given, in_features // given


def find_oft_targets(frozen_params: Mapping, targets: str | Sequence[str]) -> list[ModulePath]:
    """Sorted module paths whose 2-D ``kernel`` matches ``targets`` (regexes, or ``"unet"``/``"text_encoder"``)."""
    if isinstance(targets, str):
        if targets not in DEFAULT_TARGETS:
            raise FairdiffError(f"unknown OFT target set '{targets}'; use one of {sorted(DEFAULT_TARGETS)} or regexes.")
        targets = DEFAULT_TARGETS[targets]
    patterns = [re.compile(p) for p in targets]
    found = []
    for path, value in flatten_dict(dict(frozen_params)).items():
        module = tuple(str(p) for p in path[:-1])
        if str(path[-1]) == "kernel" and any(p.search("/".join(module)) for p in patterns):
            if np.ndim(value) != 2:
                raise FairdiffError(f"OFT target {'/'.join(module)} is not a Dense layer; narrow the target patterns.")
            found.append(module)
    if not found:
        raise FairdiffError(f"no Dense kernel matches the OFT targets {list(targets)}; check them against the model.")
    return sorted(found)


def init_oft(frozen_params: Mapping, targets: str | Sequence[str], settings: OFTSettings, *, dtype=jnp.float32) -> dict:
    """Zero skew parameters ``{"skew": [r or 1, s(s-1)/2]}`` for every targeted kernel (identity rotations)."""
    flat = flatten_dict(dict(frozen_params))
    out = {}
    for module in find_oft_targets(frozen_params, targets):
        num_blocks, size = settings.block_layout(np.shape(flat[module + ("kernel",)])[0], "/".join(module))
        out[module] = {"skew": jnp.zeros((1 if settings.block_share else num_blocks, size * (size - 1) // 2), dtype)}
    return unflatten_dict(out)


def _block_size_of(num_elements: int) -> int:
    size = int(round((1 + np.sqrt(1 + 8 * num_elements)) / 2))
    if size * (size - 1) // 2 != num_elements:
        raise FairdiffError(f"an OFT skew vector of length {num_elements} is not s(s-1)/2 for any block size s.")
    return size


def skew_matrices(skew: jax.Array) -> jax.Array:
    """``[r, n]`` strict-upper-triangle entries -> skew-symmetric ``Q`` ``[r, s, s]`` (``Q = U - U^T``)."""
    size = _block_size_of(skew.shape[-1])
    rows, cols = np.triu_indices(size, 1)
    upper = jnp.zeros((skew.shape[0], size, size), skew.dtype).at[:, rows, cols].set(skew)
    return upper - jnp.swapaxes(upper, -1, -2)


def cayley(skew: jax.Array, settings: OFTSettings) -> jax.Array:
    """Orthogonal blocks ``[r, s, s]`` from skew parameters ``[r, n]`` (exact Cayley or PEFT's Neumann series)."""
    q = skew_matrices(skew)
    eye = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
    if not settings.cayley_neumann:
        return jnp.linalg.solve(eye + q, eye - q)  # (I + Q)^-1 (I - Q); the two factors commute
    terms = int(settings.num_neumann_terms)
    if terms == 1:
        return eye
    # PEFT 0.21 (_cayley_batch): I + 2Q + ... + 2Q^(h-1) + Q^h with h = max(terms - 1, 3); terms = 2 gives I + 2Q
    highest = 1 if terms == 2 else max(terms - 1, 3)
    rotation, power = eye, eye
    for k in range(1, highest + 1):
        power = jnp.matmul(power, q, precision=_HIGHEST)
        rotation = rotation + (1.0 if k == highest and terms > 2 else 2.0) * power
    return rotation


def project_skew(skew: jax.Array, eps: float) -> jax.Array:
    """COFT: each block's ``Q_b`` scaled back onto the Frobenius ball of radius ``eps / sqrt(len(skew))``."""
    radius = float(eps) / np.sqrt(skew.shape[0])
    norm = jnp.sqrt(2.0) * jnp.linalg.norm(skew, axis=-1, keepdims=True)  # ||Q_b||_F counts both triangles
    return jnp.where(norm <= radius, skew, radius * skew / jnp.maximum(norm, 1e-30))


def project_oft(oft_params: Mapping, settings: OFTSettings) -> dict:
    """The OFT tree with every skew projected (COFT); the identity when ``settings.coft`` is off."""
    if not settings.coft:
        return dict(oft_params)
    return jax.tree_util.tree_map(lambda skew: project_skew(skew, settings.eps), dict(oft_params))


def block_rotations(skew: jax.Array, settings: OFTSettings, num_blocks: int) -> jax.Array:
    """The ``[num_blocks, s, s]`` rotations of one layer (COFT projection with a straight-through gradient)."""
    skew = skew.astype(jnp.float32)
    if settings.coft:
        skew = skew + jax.lax.stop_gradient(project_skew(skew, settings.eps) - skew)
    rotations = cayley(skew, settings)
    if settings.block_share:
        rotations = jnp.broadcast_to(rotations, (num_blocks, *rotations.shape[1:]))
    return rotations


def rotate_kernel(kernel: jax.Array, skew: jax.Array, settings: OFTSettings, name: str = "layer") -> jax.Array:
    """``blockdiag(R) @ kernel`` for a Flax kernel ``[in, out]`` (float32 arithmetic, kernel dtype out)."""
    fan_in, fan_out = np.shape(kernel)
    num_blocks, size = settings.block_layout(fan_in, name)
    stored = 1 if settings.block_share else num_blocks
    if tuple(np.shape(skew)) != (stored, size * (size - 1) // 2):
        raise FairdiffError(
            f"OFT parameters of {name} have shape {tuple(np.shape(skew))}, expected {(stored, size * (size - 1) // 2)} "
            "for this base model and settings; the adaptor was made for a different model or block size."
        )
    rotations = block_rotations(skew, settings, num_blocks)
    blocks = kernel.astype(jnp.float32).reshape(num_blocks, size, fan_out)
    rotated = jnp.einsum("rkc,rco->rko", rotations, blocks, precision=_HIGHEST)
    return rotated.reshape(fan_in, fan_out).astype(kernel.dtype)


def oft_modules(oft_params: Mapping) -> dict[ModulePath, jax.Array]:
    """``{module path: skew [r, n]}`` of an OFT tree."""
    modules = {}
    for path, value in flatten_dict(dict(oft_params)).items():
        if str(path[-1]) != "skew":
            raise FairdiffError(f"OFT tree entry {'/'.join(map(str, path))} is not 'skew'; not an OFT tree.")
        modules[tuple(str(p) for p in path[:-1])] = value
    return modules


def apply_oft(frozen_params: Mapping, oft_params: Mapping, settings: OFTSettings) -> dict:
    """The frozen tree with every kernel of ``oft_params`` replaced by ``blockdiag(R) @ kernel`` (pure, jit-able)."""
    flat = flatten_dict(dict(frozen_params))
    for module, skew in oft_modules(oft_params).items():
        name = "/".join(module)
        if module + ("kernel",) not in flat:
            raise FairdiffError(
                f"OFT module {name} does not exist in the base model; apply the adaptor to the model it was made for."
            )
        flat[module + ("kernel",)] = rotate_kernel(flat[module + ("kernel",)], skew, settings, name)
    return unflatten_dict(flat)


# ------------------------------------------------------------------------------------------- PEFT format


def peft_oft_config(settings: OFTSettings, modules: Sequence[ModulePath]) -> dict:
    """The ``adapter_config.json`` of a PEFT OFT adaptor on exactly ``modules`` (PyTorch module names)."""
    return {
        "peft_type": "OFT",
        "r": int(settings.num_blocks),
        "oft_block_size": int(settings.block_size),
        "target_modules": sorted(pt_module_name(m) for m in modules),
        "module_dropout": 0.0,
        "coft": bool(settings.coft),
        "eps": float(settings.eps),
        "block_share": bool(settings.block_share),
        "use_cayley_neumann": bool(settings.cayley_neumann),
        "num_cayley_neumann_terms": int(settings.num_neumann_terms),
        "bias": "none",
        "init_weights": True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "peft_version": PEFT_FORMAT_VERSION,
    }


def peft_oft_state_dict(oft_params: Mapping, settings: OFTSettings) -> dict[str, np.ndarray]:
    """``{"base_model.model.<module>.oft_R.weight": [r, n]}`` float32, as ``PeftModel.save_pretrained`` writes.

    With COFT the stored skews are the projected ones, which is what PEFT's parameter holds after a forward pass.
    """
    state = {}
    for module, skew in oft_modules(project_oft(oft_params, settings)).items():
        value = np.asarray(jax.device_get(skew), dtype=np.float32)
        state[f"base_model.model.{pt_module_name(module)}.oft_R.weight"] = np.ascontiguousarray(value)
    return state


def export_peft_oft(oft_params: Mapping, settings: OFTSettings, out_dir: str) -> str:
    """Write a PEFT adaptor folder (``adapter_config.json`` + ``adapter_model.safetensors``); returns ``out_dir``.

    Load it in PyTorch with ``PeftModel.from_pretrained(unet, out_dir)`` (or the text encoder, for text targets).
    """
    os.makedirs(out_dir, exist_ok=True)
    modules = list(oft_modules(oft_params))
    with open(os.path.join(out_dir, PEFT_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(peft_oft_config(settings, modules), f, indent=2)
    write_safetensors(
        os.path.join(out_dir, PEFT_WEIGHTS_NAME), peft_oft_state_dict(oft_params, settings), {"format": "pt"}
    )
    return out_dir
