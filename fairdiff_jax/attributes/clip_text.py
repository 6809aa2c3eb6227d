"""CLIP text embeddings (text tower + ``text_projection``, what ``CLIPModel.get_text_features`` returns), loaded
without torch from a local Hugging Face CLIP folder together with that folder's own tokenizer.

Used by evaluation for CLIP-T (image–prompt similarity); the image tower lives in ``vision_features``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.attributes.vision_features import convert_hf_vision_weights, read_hf_folder
from fairdiff_jax.errors import FairdiffError


class CLIPTextFeatures(nn.Module):
    """CLIP text transformer + ``text_projection``: token ids ``[B, L]`` -> text embeddings ``[B, D]``."""

    config: Any  # transformers CLIPTextConfig
    projection_dim: int

    def setup(self):
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextTransformer

        self.text_model = FlaxCLIPTextTransformer(self.config)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        # CLIP's text tower is causal and pools at the first end-of-text token, so padding after it never matters.
        pooled = self.text_model(input_ids, jnp.ones_like(input_ids), positions, deterministic=True, return_dict=False)[
            1
        ]
        return self.text_projection(pooled)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A frozen CLIP text tower with its tokenizer: ``encoder(prompts) -> [P, D]`` (numpy, float32)."""

    module: nn.Module
    params: Any
    tokenizer: Any  # transformers CLIPTokenizer
    max_length: int
    _embed: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        module = self.module
        object.__setattr__(
            self, "_embed", jax.jit(lambda params, ids: jax.lax.stop_gradient(module.apply({"params": params}, ids)))
        )

    def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids ``[P, max_length]``, padded and truncated as CLIP was trained (end token kept)."""
        return np.asarray(
            self.tokenizer(
                list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
            )["input_ids"],
            np.int32,
        )

    def apply(self, params: Any, input_ids: jax.Array) -> jax.Array:
        """Text embeddings ``[B, D]`` of token ids ``[B, L]``."""
        return self.module.apply({"params": params}, input_ids)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._embed(self.params, jnp.asarray(self.token_ids(prompts))), np.float32)


def load_clip_tokenizer(folder: str):
    """The ``CLIPTokenizer`` saved in a CLIP model folder (``vocab.json`` + ``merges.txt``)."""
    from transformers import CLIPTokenizer

    missing = [n for n in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FairdiffError(
            f"CLIP folder {folder} has no {' / '.join(missing)}; CLIP-T needs the model's own tokenizer — save the "
            "CLIPProcessor (or CLIPTokenizer) into the same folder as the model."
        )
    logging.getLogger("transformers.models.clip.tokenization_clip").setLevel(logging.ERROR)
    return CLIPTokenizer.from_pretrained(folder)


def clip_text_encoder_from_state(config: dict, state: dict[str, np.ndarray], folder: str) -> TextEncoder:
    """The CLIP text encoder of an already-read folder (``read_hf_folder``), so both towers share one read."""
    from transformers import CLIPConfig, CLIPTextConfig

    model_type = config.get("model_type")
    if model_type == "clip":
        full = CLIPConfig.from_dict(config)
        text_config, projection_dim = full.text_config, full.projection_dim
    elif model_type == "clip_text_model":
        text_config = CLIPTextConfig.from_dict(config)
        projection_dim = config.get("projection_dim", text_config.projection_dim)
    else:
        raise FairdiffError(
            f"CLIP folder {folder} has model_type '{model_type}'; CLIP-T needs the text tower: expected 'clip' "
            "(CLIPModel) or 'clip_text_model' (CLIPTextModelWithProjection)."
        )
    if "text_projection.weight" not in state:
        raise FairdiffError(
            f"CLIP folder {folder} has no 'text_projection.weight'; save a CLIPModel or a "
            "CLIPTextModelWithProjection (a plain CLIPTextModel has no text-embedding projection)."
        )
    tokenizer = load_clip_tokenizer(folder)
    max_length = min(int(text_config.max_position_embeddings), int(tokenizer.model_max_length))
    module = CLIPTextFeatures(text_config, projection_dim)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, max_length), jnp.int32))["params"]
    params = {
        "text_model": convert_hf_vision_weights(
            state, expected["text_model"], prefix="text_model.", kind="CLIP text", source=folder
        ),
        "text_projection": {"kernel": np.asarray(state["text_projection.weight"], np.float32).T},
    }
    if params["text_projection"]["kernel"].shape != tuple(expected["text_projection"]["kernel"].shape):
        raise FairdiffError(
            f"CLIP folder {folder}: text_projection.weight has shape {state['text_projection.weight'].shape}, but "
            f"config.json implies {expected['text_projection']['kernel'].shape[::-1]}; weights and config differ."
        )
    return TextEncoder(module, jax.tree_util.tree_map(jnp.asarray, params), tokenizer, max_length)


def load_clip_text_encoder(folder: str) -> TextEncoder:
    """CLIP text embeddings from a ``CLIPModel`` or ``CLIPTextModelWithProjection`` folder -> TextEncoder."""
    config, state = read_hf_folder(folder, "CLIP")
    return clip_text_encoder_from_state(config, state, folder)
