"""Tiny random Stable Diffusion components for tests, written in the real diffusers folder layout.

One attention block with 32 channels (diffusers' Flax U-Net hard-codes GroupNorm(32), so channel counts
are multiples of 32), a 2-layer text encoder and a VAE that upsamples 2x. Weights are drawn with numpy
from shapes obtained by ``jax.eval_shape``, so writing a folder compiles nothing.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.models import loader
from fairdiff_jax.models.convert import flax_to_pt_state_dict
from fairdiff_jax.models.safetensors_io import write_safetensors
from fairdiff_jax.models.tokenizer_files import DEFAULT_WORDS, write_tokenizer_folder

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "block_out_channels": [32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 16,
    "scaling_factor": 0.18215,
}

TINY_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def random_params(shapes: Mapping, seed: int = 0) -> dict:
    """Random float32 numpy weights for a tree of shapes: fan-in scaled kernels, perturbed norms."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, spec in sorted(flatten_dict(dict(shapes)).items(), key=lambda kv: "/".join(map(str, kv[0]))):
        shape = tuple(spec.shape)
        leaf = str(path[-1])
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "embedding":
            value = 0.5 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        out[path] = value.astype(np.float32)
    return unflatten_dict(out)


def _write_json(path: str, data: Mapping) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def write_component(folder: str, name: str, config: Mapping, params: Mapping) -> None:
    """Write ``folder/name/config.json`` and its safetensors weights (PyTorch names and layouts)."""
    sub = os.path.join(folder, name)
    _write_json(os.path.join(sub, "config.json"), config)
    filename = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    write_safetensors(os.path.join(sub, filename), flax_to_pt_state_dict(params), {"format": "pt"})


def write_tiny_sd_folder(
    folder: str,
    *,
    seed: int = 0,
    unet_config: Mapping | None = None,
    vae_config: Mapping | None = None,
    text_encoder_config: Mapping | None = None,
    words: Iterable[str] = DEFAULT_WORDS,
    params: Mapping[str, Mapping] | None = None,
) -> str:
    """Write a complete tiny Stable Diffusion folder in the diffusers layout and return its path.

    ``params`` may give the Flax weights of ``unet`` / ``vae`` / ``text_encoder`` (e.g. a trained toy
    model); missing ones are random with ``seed``.
    """
    params = dict(params or {})
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), SD15_SCHEDULER)
    text_config = copy.deepcopy(dict(text_encoder_config or TINY_TEXT_ENCODER))
    vocab_size = write_tokenizer_folder(
        os.path.join(folder, "tokenizer"), words, max_length=text_config["max_position_embeddings"]
    )
    text_config.setdefault("vocab_size", vocab_size)
    # CLIP's pooled output reads the eos position; token ids of the tiny vocabulary
    text_config.update(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    builders = {
        "unet": (dict(unet_config or TINY_UNET), loader.build_unet, loader.unet_param_shapes),
        "vae": (dict(vae_config or TINY_VAE), loader.build_vae, loader.vae_param_shapes),
        "text_encoder": (text_config, loader.build_text_encoder, loader.text_encoder_param_shapes),
    }
    for offset, (name, (config, build, shapes_of)) in enumerate(builders.items()):
        weights = params.get(name)
        if weights is None:
            weights = random_params(shapes_of(build(config)), seed=seed * 7 + offset)
        write_component(folder, name, config, weights)
    return folder
