"""Frozen image-feature extractors for the semantics-preservation loss: CLIP image embeddings and DINOv2 CLS
features, loaded without torch from local Hugging Face folders (``config.json`` + ``model.safetensors``).

A feature extractor is a function ``images [B, H, W, 3] in [-1, 1] -> [B, D]``; :class:`ImageEncoder` is one
with explicit parameters (``encoder.apply(params, images)``; ``encoder.bind()`` closes over them). The resize
to 224 and the normalisation run in JAX, so the features are differentiable with respect to the pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.attributes.image_ops import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, model_input
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.convert import IGNORED_PT_KEYS, flax_to_pt_layout, pt_to_flax_layout
from fairdiff_jax.models.safetensors_io import read_safetensors

_PT_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """A frozen vision network with its preprocessing: ``apply(params, images [B,H,W,3] in [-1,1]) -> [B, D]``."""

    module: nn.Module
    params: Any
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def apply(self, params: Any, images: jax.Array) -> jax.Array:
        pixels = model_input(images, self.image_size, self.mean, self.std)
        return self.module.apply({"params": params}, pixels)

    def bind(self, params: Any | None = None):
        """The feature-extractor function ``images -> [B, D]`` with ``params`` (default: the loaded ones)."""
        params = self.params if params is None else params
        return lambda images: self.apply(params, images)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.apply(self.params, images)


class CLIPImageFeatures(nn.Module):
    """CLIP vision tower + ``visual_projection`` (what ``CLIPModel.get_image_features`` returns). NHWC input."""

    config: Any  # transformers CLIPVisionConfig
    projection_dim: int

    def setup(self):
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer

        self.vision_model = FlaxCLIPVisionTransformer(self.config)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        pooled = self.vision_model(pixel_values=pixels, deterministic=True, return_dict=False)[1]
        return self.visual_projection(pooled)


class DINOv2Features(nn.Module):
    """DINOv2 backbone; returns ``pooler_output`` (the final-layernormed CLS token). NHWC input."""

    config: Any  # transformers Dinov2Config

    def setup(self):
        from transformers.models.dinov2.modeling_flax_dinov2 import FlaxDinov2Module

        self.model = FlaxDinov2Module(self.config)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.model(pixels, deterministic=True, return_dict=False)[1]


def read_hf_folder(folder: str, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json as a dict, PyTorch state dict of model.safetensors)`` of a Hugging Face model folder."""
    config_path = os.path.join(folder, "config.json")
    weights_path = os.path.join(folder, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FairdiffError(
                f"{kind} folder {folder} has no {os.path.basename(path)}; point to a local Hugging Face model folder "
                "saved with safetensors (config.json + model.safetensors)."
            )
    with open(config_path) as f:
        config = json.load(f)
    return config, read_safetensors(weights_path)


def convert_hf_vision_weights(
    state_dict: dict[str, np.ndarray], expected: Any, *, prefix: str, kind: str, source: str
) -> dict:
    """Map PyTorch transformers keys (``prefix`` + dotted module path) onto the Flax tree ``expected``.

    Parameters that are not kernels/scales/embeddings keep their own name (``cls_token``, ``class_embedding``).
    Keys outside ``prefix`` (e.g. a CLIP text tower) are ignored; unused keys inside it are an error.
    """
    out = {}
    used = set()
    for flax_path, spec in flatten_dict(expected).items():
        *module, leaf = (str(p) for p in flax_path)
        pt_key = prefix + ".".join([*module, _PT_LEAF.get(leaf, leaf)])
        if pt_key not in state_dict:
            raise FairdiffError(
                f"{kind}: {source} has no weight '{pt_key}'; the file does not match its config.json — use a "
                "complete folder saved by transformers' save_pretrained."
            )
        value = pt_to_flax_layout(flax_path, np.asarray(state_dict[pt_key], np.float32), tuple(spec.shape))
        if tuple(value.shape) != tuple(spec.shape):
            raise FairdiffError(
                f"{kind}: weight '{pt_key}' in {source} has shape {state_dict[pt_key].shape}, but config.json "
                f"implies {tuple(spec.shape)}; the weights and the config come from different models."
            )
        out[flax_path] = value
        used.add(pt_key)
    top_levels = {p.split(".")[0] for p in used}
    unexpected = [
        k for k in state_dict if k not in used and k.split(".")[0] in top_levels and not IGNORED_PT_KEYS.search(k)
    ]
    if unexpected:
        raise FairdiffError(
            f"{kind}: {source} has {len(unexpected)} weight(s) that config.json does not describe "
            f"({', '.join(sorted(unexpected)[:5])}); the weights and the config come from different models."
        )
    return unflatten_dict(out)


def to_hf_state_dict(params: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of :func:`convert_hf_vision_weights`: PyTorch transformers keys and layouts of a Flax tree."""
    state = {}
    for flax_path, value in flatten_dict(jax.tree_util.tree_map(np.asarray, params)).items():
        *module, leaf = (str(p) for p in flax_path)
        key = prefix + ".".join([*module, _PT_LEAF.get(leaf, leaf)])
        state[key] = np.ascontiguousarray(flax_to_pt_layout(flax_path, np.asarray(value, np.float32)))
    return state


def load_clip_image_encoder(folder: str, image_size: int | None = None) -> ImageEncoder:
    """CLIP image embeddings from a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` folder -> ImageEncoder."""
    config, state = read_hf_folder(folder, "CLIP")
    return clip_image_encoder_from_state(config, state, folder, image_size)


def clip_image_encoder_from_state(
    config: dict, state: dict[str, np.ndarray], folder: str, image_size: int | None = None
) -> ImageEncoder:
    """The CLIP image encoder of an already-read folder (``read_hf_folder``), so both towers share one read."""
    from transformers import CLIPConfig, CLIPVisionConfig

    model_type = config.get("model_type")
    if model_type == "clip":
        full = CLIPConfig.from_dict(config)
        vision_config, projection_dim = full.vision_config, full.projection_dim
    elif model_type == "clip_vision_model":
        vision_config = CLIPVisionConfig.from_dict(config)
        projection_dim = config.get("projection_dim", vision_config.projection_dim)
    else:
        raise FairdiffError(
            f"CLIP folder {folder} has model_type '{model_type}'; expected 'clip' (CLIPModel) or "
            "'clip_vision_model' (CLIPVisionModelWithProjection)."
        )
    if "visual_projection.weight" not in state:
        raise FairdiffError(
            f"CLIP folder {folder} has no 'visual_projection.weight'; save a CLIPModel or a "
            "CLIPVisionModelWithProjection (a plain CLIPVisionModel has no image-embedding projection)."
        )
    size = vision_config.image_size if image_size is None else image_size
    if size != vision_config.image_size:
        raise FairdiffError(
            f"CLIP folder {folder} was trained at {vision_config.image_size}px and cannot take {size}px inputs; "
            f"leave image_size unset (it defaults to {vision_config.image_size})."
        )
    module = CLIPImageFeatures(vision_config, projection_dim)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    params = {
        "vision_model": convert_hf_vision_weights(
            state, expected["vision_model"], prefix="vision_model.", kind="CLIP", source=folder
        ),
        "visual_projection": {"kernel": np.asarray(state["visual_projection.weight"], np.float32).T},
    }
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return ImageEncoder(module, params, size, CLIP_MEAN, CLIP_STD)


def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of PyTorch's bicubic resize (A = −0.75, align_corners=False, clamped borders)."""
    a = -0.75

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    weights = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for out_index in range(out_size):
        source = (out_index + 0.5) * scale - 0.5
        base = int(np.floor(source))
        frac = source - base
        for offset in range(-1, 3):
            weights[out_index, min(max(base + offset, 0), in_size - 1)] += kernel(offset - frac)
    return weights


def resize_position_embeddings(position_embeddings: np.ndarray, grid: int) -> np.ndarray:
    """DINOv2 ``[1, 1 + g², D]`` position table resized to a ``grid × grid`` patch grid as PyTorch does it."""
    old = int(round(np.sqrt(position_embeddings.shape[1] - 1)))
    if old == grid:
        return position_embeddings
    cls, patches = position_embeddings[:, :1], position_embeddings[0, 1:].reshape(old, old, -1)
    matrix = _torch_bicubic_matrix(old, grid)
    resized = np.einsum("yi,xj,ijd->yxd", matrix, matrix, patches.astype(np.float64)).astype(np.float32)
    return np.concatenate([cls, resized.reshape(1, grid * grid, -1)], axis=1)


def load_dinov2_encoder(folder: str, image_size: int = 224) -> ImageEncoder:
    """DINOv2 CLS features (``pooler_output``) from a ``Dinov2Model`` folder, for ``image_size`` inputs.

    The position table is resized once at load time with PyTorch's bicubic interpolation, which is what the
    PyTorch model does on the fly for a size other than the one it was trained at.
    """
    from transformers import Dinov2Config

    config, state = read_hf_folder(folder, "DINOv2")
    if config.get("model_type") != "dinov2":
        raise FairdiffError(f"DINOv2 folder {folder} has model_type '{config.get('model_type')}'; expected 'dinov2'.")
    prefix = "dinov2." if any(k.startswith("dinov2.") for k in state) else ""
    dino_config = Dinov2Config.from_dict({**config, "image_size": image_size})
    if image_size % dino_config.patch_size:
        raise FairdiffError(
            f"DINOv2 input size {image_size} is not a multiple of the patch size {dino_config.patch_size}; "
            "use a multiple of it, e.g. 224 for patch size 14."
        )
    module = DINOv2Features(dino_config)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))["params"]
    state = dict(state)
    table_key = prefix + "embeddings.position_embeddings"
    grid = image_size // dino_config.patch_size
    state[table_key] = resize_position_embeddings(np.asarray(state[table_key], np.float32), grid)
    params = convert_hf_vision_weights(state, expected["model"], prefix=prefix, kind="DINOv2", source=folder)
    # transformers' Flax layer scale multiplies its parameter by layerscale_value twice; PyTorch stores the product.
    layerscale = dino_config.layerscale_value
    flat = flatten_dict(params)
    for path in flat:
        if path[-1] == "lambda1":
            flat[path] = flat[path] / (layerscale**2)
    params = jax.tree_util.tree_map(jnp.asarray, {"model": unflatten_dict(flat)})
    return ImageEncoder(module, params, image_size, IMAGENET_MEAN, IMAGENET_STD)
