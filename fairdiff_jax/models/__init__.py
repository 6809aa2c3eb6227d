"""Stable Diffusion components loaded from local diffusers-layout folders, and tiny ones for tests."""

from fairdiff_jax.models.patches import apply_patches

apply_patches()


from fairdiff_jax.models.loader import (  # noqa: E402
    SchedulerSettings,
    StableDiffusion,
    load_scheduler,
    load_stable_diffusion,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
)
from fairdiff_jax.models.tiny import write_tiny_sd_folder  # noqa: E402

__all__ = [
    "SchedulerSettings",
    "StableDiffusion",
    "load_scheduler",
    "load_stable_diffusion",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
    "write_tiny_sd_folder",
]
