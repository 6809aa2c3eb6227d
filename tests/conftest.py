"""Shared test set-up: 8 simulated CPU devices, JAX's persistent compilation cache, tiny SD folders."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from fairdiff_jax.models.tiny import TINY_UNET  # noqa: E402

_CACHE = os.environ.get(
    "FAIRDIFF_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fairdiff_jax", "xla_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A complete tiny Stable Diffusion folder (diffusers layout, random weights, seed 0)."""
    from fairdiff_jax.models import write_tiny_sd_folder

    return write_tiny_sd_folder(str(tmp_path_factory.mktemp("tiny_sd")), seed=0)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path):
    """The tiny folder loaded with fairdiff_jax's torch-free loader (float32), shared by all tests."""
    from fairdiff_jax.models import load_stable_diffusion

    return load_stable_diffusion(tiny_sd_path, cache_dir=None)


# the tiny SD U-Net in pixel space (RGB in, RGB out), as the toy world's model
TINY_TOY_UNET = {**TINY_UNET, "in_channels": 3, "out_channels": 3}


@pytest.fixture(scope="session")
def tiny_toy_world(tmp_path_factory):
    """A tiny (untrained) toy world, used instead of the shipped one through ``FAIRDIFF_TOY_WORLD``."""
    from fairdiff_jax.toyworld import build

    folder = os.path.join(str(tmp_path_factory.mktemp("cache")), "toy")
    build.build_toy_world(
        folder,
        steps=2,
        seed=1,
        progress=False,
        batch_size=8,
        classifier_steps=2,
        classifier_width=8,
        images_per_prompt=0,
        unet_config=TINY_TOY_UNET,
    )
    return folder
