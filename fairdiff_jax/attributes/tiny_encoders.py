"""Tiny random CLIP (both towers + tokenizer) and DINOv2 folders for tests, in the real transformers layout.

Weights are drawn with numpy from shapes obtained by ``jax.eval_shape`` and written with PyTorch key names and
layouts (``model.safetensors``), so PyTorch ``CLIPModel`` / ``Dinov2Model.from_pretrained`` load them unchanged
and writing a folder needs no torch.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.attributes.clip_text import CLIPTextFeatures
from fairdiff_jax.attributes.vision_features import CLIPImageFeatures, DINOv2Features, to_hf_state_dict
from fairdiff_jax.models.safetensors_io import write_safetensors
from fairdiff_jax.models.tiny import random_params
from fairdiff_jax.models.tokenizer_files import DEFAULT_WORDS, write_tokenizer_folder

TINY_CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
TINY_CLIP_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
}
TINY_DINOV2 = {
    "hidden_size": 32,
    "mlp_ratio": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 14,
    "layerscale_value": 0.5,
}


def _write(folder: str, config: dict, state: dict[str, np.ndarray]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    write_safetensors(os.path.join(folder, "model.safetensors"), state, {"format": "pt"})


def write_tiny_clip_folder(folder: str, *, seed: int = 0, projection_dim: int = 12) -> str:
    """A random ``CLIPModel`` folder (config.json, model.safetensors, CLIP tokenizer files); returns ``folder``."""
    from transformers import CLIPConfig

    max_length = TINY_CLIP_TEXT["max_position_embeddings"]
    vocab_size = write_tokenizer_folder(folder, DEFAULT_WORDS, max_length=max_length)
    special = {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}
    text = {**TINY_CLIP_TEXT, "vocab_size": vocab_size, **special}
    config = CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=projection_dim, **special)
    size = config.vision_config.image_size
    vision_module = CLIPImageFeatures(config.vision_config, projection_dim)
    text_module = CLIPTextFeatures(config.text_config, projection_dim)
    vision_shapes = jax.eval_shape(vision_module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    text_shapes = jax.eval_shape(text_module.init, jax.random.key(0), jnp.zeros((1, max_length), jnp.int32))["params"]
    state = {
        **to_hf_state_dict(random_params(vision_shapes, seed=2 * seed)),
        **to_hf_state_dict(random_params(text_shapes, seed=2 * seed + 1)),
        "logit_scale": np.array(np.log(1 / 0.07), np.float32),
    }
    _write(folder, config.to_dict(), state)
    return folder


def write_tiny_dinov2_folder(folder: str, *, seed: int = 0) -> str:
    """A random ``Dinov2Model`` folder (config.json, model.safetensors) at 28 px, patch 14; returns ``folder``."""
    from transformers import Dinov2Config

    config = Dinov2Config(**TINY_DINOV2)
    size = config.image_size
    shapes = jax.eval_shape(DINOv2Features(config).init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    params = random_params(shapes["model"], seed=seed)
    _write(folder, config.to_dict(), to_hf_state_dict(params))
    return folder
