"""Load Stable Diffusion 1.x/2.x components from a local diffusers-layout folder, without torch.

    folder/model_index.json
    folder/unet/config.json + diffusion_pytorch_model.safetensors
    folder/vae/config.json + diffusion_pytorch_model.safetensors
    folder/text_encoder/config.json + model.safetensors
    folder/tokenizer/ (vocab.json, merges.txt, tokenizer_config.json)
    folder/scheduler/scheduler_config.json

Weights are read with numpy, mapped onto the Flax trees of diffusers' ``FlaxUNet2DConditionModel`` /
``FlaxAutoencoderKL`` and transformers' ``FlaxCLIPTextModel`` (shapes from ``jax.eval_shape``, so nothing
large is materialised twice), and cached as msgpack so a second start skips the conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.convert import convert_pt_state_dict
from fairdiff_jax.models.safetensors_io import read_safetensors

log = logging.getLogger(__name__)
_CACHE_FORMAT = "1"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# Weight dtypes a config may name (model.dtype).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class SchedulerSettings:
    """The training noise schedule of the model (from ``scheduler/scheduler_config.json``)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    # None when the config names none: each solver then follows diffusers' default (schedules.DEFAULT_SPACING)
    timestep_spacing: str | None = None

    @classmethod
    def from_dict(cls, config: dict) -> SchedulerSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t for t = 0..T-1, as diffusers computes it (float64 numpy)."""
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps) ** 2
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps)
        else:
            raise FairdiffError(
                f"scheduler beta_schedule '{self.beta_schedule}' is not supported; use 'scaled_linear' "
                "(Stable Diffusion) or 'linear'."
            )
        return np.cumprod(1.0 - betas)


@dataclasses.dataclass
class StableDiffusion:
    """Loaded components; ``*_params`` are plain nested dicts of arrays (frozen weights)."""

    path: str
    unet: Any = None
    unet_params: Any = None
    vae: Any = None
    vae_params: Any = None
    text_encoder: Any = None
    text_encoder_params: Any = None
    tokenizer: Any = None
    scheduler: SchedulerSettings | None = None
    vae_scaling_factor: float = 0.18215


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FairdiffError(
            f"missing {what}: {path} does not exist; point to a Stable Diffusion folder in the diffusers "
            "layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise FairdiffError(f"cannot parse {what} {path}: {err}") from err


def _check_folder(folder: str) -> str:
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise FairdiffError(
            f"model folder {folder} does not exist; pass the path of a local Stable Diffusion folder in "
            "the diffusers layout (with model_index.json)."
        )
    return folder


def _weight_files(subfolder: str, stem: str, variant: str | None) -> list[str]:
    """The safetensors file(s) of one component (single file or sharded with an index)."""
    names = [f"{stem}.{variant}.safetensors"] if variant else []
    names.append(f"{stem}.safetensors")
    for name in names:
        path = os.path.join(subfolder, name)
        if os.path.isfile(path):
            return [path]
        index = path + ".index.json"
        if os.path.isfile(index):
            weight_map = _read_json(index, "weight index")["weight_map"]
            return [os.path.join(subfolder, f) for f in sorted(set(weight_map.values()))]
    if os.path.isfile(os.path.join(subfolder, f"{stem}.bin")):
        raise FairdiffError(
            f"{subfolder} only has {stem}.bin (a torch pickle); fairdiff-jax reads safetensors without "
            "torch. Convert once with diffusers: pipe = StableDiffusionPipeline.from_pretrained(path); "
            "pipe.save_pretrained(path, safe_serialization=True)."
        )
    raise FairdiffError(
        f"missing weights: {os.path.join(subfolder, stem + '.safetensors')} does not exist; the folder is "
        "not a complete diffusers-layout Stable Diffusion model."
    )


def _cache_path(cache_dir: str, component: str, files: Sequence[str]) -> str:
    digest = hashlib.sha256(_CACHE_FORMAT.encode())
    digest.update(component.encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return os.path.join(cache_dir, f"{component}-{digest.hexdigest()[:24]}.msgpack")


def cache_root() -> str:
    """``$FAIRDIFF_CACHE`` or ``~/.cache/fairdiff_jax``: the root of every cache this project keeps."""
    return os.environ.get("FAIRDIFF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fairdiff_jax"))


def default_cache_dir() -> str:
    """``$FAIRDIFF_CACHE/converted`` or ``~/.cache/fairdiff_jax/converted``."""
    return os.path.join(cache_root(), "converted")


def _load_params(files, expected, component, cache_dir, dtype):
    """Converted float32 Flax params (from the cache when possible), cast to ``dtype``."""
    cached = _cache_path(cache_dir, component, files) if cache_dir else None
    params = None
    if cached and os.path.isfile(cached):
        try:
            with open(cached, "rb") as f:
                params = serialization.msgpack_restore(f.read())
            got = {k: v.shape for k, v in flatten_dict(params).items()}
            if got != {k: tuple(v.shape) for k, v in flatten_dict(dict(expected)).items()}:
                params = None
        except Exception as err:  # a corrupt cache entry is rebuilt, never fatal
            log.warning("ignoring unreadable conversion cache %s (%s)", cached, err)
            params = None
    if params is None:
        state = {}
        for path in files:
            state.update(read_safetensors(path))
        state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
        source = files[0] if len(files) == 1 else os.path.dirname(files[0])
        params = convert_pt_state_dict(state, expected, component=component, source=source)
        if cached:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cached}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(serialization.msgpack_serialize(params))
            os.replace(tmp, cached)
    flat = flatten_dict(params)
    return unflatten_dict({k: jnp.asarray(v, dtype=dtype) for k, v in flat.items()})


def _init_kwargs(cls, config: dict) -> dict:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "parent", "name", "dtype"}
    kwargs = {k: v for k, v in config.items() if k in accepted}
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    return kwargs


def build_unet(config: dict, dtype=jnp.float32):
    """A ``FlaxUNet2DConditionModel`` from a (PyTorch or Flax) diffusers U-Net config dict."""
    from diffusers import FlaxUNet2DConditionModel

    return FlaxUNet2DConditionModel(**_init_kwargs(FlaxUNet2DConditionModel, config), dtype=dtype)


def build_vae(config: dict, dtype=jnp.float32):
    """A ``FlaxAutoencoderKL`` from a diffusers VAE config dict."""
    from diffusers import FlaxAutoencoderKL

    return FlaxAutoencoderKL(**_init_kwargs(FlaxAutoencoderKL, config), dtype=dtype)


def build_text_encoder(config: dict, dtype=jnp.float32):
    """A transformers ``FlaxCLIPTextModel`` (no weights) from a CLIP text config dict."""
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    clip_config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return FlaxCLIPTextModel(clip_config, dtype=dtype, _do_init=False)


def unet_param_shapes(unet) -> dict:
    return jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))


def vae_param_shapes(vae) -> dict:
    return jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))


def text_encoder_param_shapes(text_encoder) -> dict:
    length = text_encoder.config.max_position_embeddings
    return jax.eval_shape(lambda key: text_encoder.init_weights(key, (1, length)), jax.random.PRNGKey(0))


def load_unet(folder: str, *, dtype=jnp.float32, variant: str | None = None, cache_dir: str | None = ""):
    """``(FlaxUNet2DConditionModel, params)`` from ``folder/unet``."""
    sub = os.path.join(_check_folder(folder), "unet")
    unet = build_unet(_read_json(os.path.join(sub, "config.json"), "U-Net config"), dtype)
    files = _weight_files(sub, "diffusion_pytorch_model", variant)
    cache = default_cache_dir() if cache_dir == "" else cache_dir
    return unet, _load_params(files, unet_param_shapes(unet), "unet", cache, dtype)


def load_vae(folder: str, *, dtype=jnp.float32, variant: str | None = None, cache_dir: str | None = ""):
    """``(FlaxAutoencoderKL, params)`` from ``folder/vae``."""
    sub = os.path.join(_check_folder(folder), "vae")
    vae = build_vae(_read_json(os.path.join(sub, "config.json"), "VAE config"), dtype)
    files = _weight_files(sub, "diffusion_pytorch_model", variant)
    cache = default_cache_dir() if cache_dir == "" else cache_dir
    return vae, _load_params(files, vae_param_shapes(vae), "vae", cache, dtype)


def load_text_encoder(folder: str, *, dtype=jnp.float32, variant: str | None = None, cache_dir: str | None = ""):
    """``(FlaxCLIPTextModel, params)`` from ``folder/text_encoder``."""
    sub = os.path.join(_check_folder(folder), "text_encoder")
    text_encoder = build_text_encoder(_read_json(os.path.join(sub, "config.json"), "text-encoder config"), dtype)
    files = _weight_files(sub, "model", variant)
    cache = default_cache_dir() if cache_dir == "" else cache_dir
    shapes = text_encoder_param_shapes(text_encoder)
    return text_encoder, _load_params(files, shapes, "text_encoder", cache, dtype)


def load_tokenizer(folder: str):
    """The CLIP tokenizer of ``folder/tokenizer`` (transformers ``CLIPTokenizer``)."""
    from transformers import CLIPTokenizer

    sub = os.path.join(_check_folder(folder), "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(sub, name)):
            raise FairdiffError(f"missing tokenizer file {os.path.join(sub, name)}; the folder is incomplete.")
    logging.getLogger("transformers.models.clip.tokenization_clip").setLevel(logging.ERROR)
    return CLIPTokenizer.from_pretrained(sub)


def load_scheduler(folder: str) -> SchedulerSettings:
    """Noise-schedule settings of ``folder/scheduler/scheduler_config.json``."""
    path = os.path.join(_check_folder(folder), "scheduler", "scheduler_config.json")
    return SchedulerSettings.from_dict(_read_json(path, "scheduler config"))


def load_stable_diffusion(
    folder: str,
    *,
    dtype=jnp.float32,
    components: Sequence[str] = COMPONENTS,
    variant: str | None = None,
    cache_dir: str | None = "",
) -> StableDiffusion:
    """Load the requested components of a diffusers-layout Stable Diffusion folder.

    Args:
      folder: local folder with ``model_index.json``.
      dtype: weight and compute dtype (``jnp.bfloat16`` on accelerators).
      components: any of ``unet, vae, text_encoder, tokenizer, scheduler``.
      variant: weight-file variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
      cache_dir: where converted trees are cached; ``""`` = default, ``None`` = no cache.
    """
    folder = _check_folder(folder)
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise FairdiffError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}.")
    _read_json(os.path.join(folder, "model_index.json"), "model index")
    sd = StableDiffusion(path=folder)
    kwargs = dict(dtype=dtype, variant=variant, cache_dir=cache_dir)
    if "unet" in components:
        sd.unet, sd.unet_params = load_unet(folder, **kwargs)
    if "vae" in components:
        sd.vae, sd.vae_params = load_vae(folder, **kwargs)
        sd.vae_scaling_factor = float(sd.vae.config.scaling_factor)
    if "text_encoder" in components:
        sd.text_encoder, sd.text_encoder_params = load_text_encoder(folder, **kwargs)
    if "tokenizer" in components:
        sd.tokenizer = load_tokenizer(folder)
    if "scheduler" in components:
        sd.scheduler = load_scheduler(folder)
    return sd
