"""A tiny training world for tests: the tiny SD folder, a random 2-class CNN as the gender classifier.

Also runnable as a script (``python tests/train_world.py SD_FOLDER WORKDIR NUM_STEPS``) so that a test can
kill a training process and start it again.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.attributes import MultiHeadConvNet
from fairdiff_jax.config import load_config
from fairdiff_jax.models import load_stable_diffusion
from fairdiff_jax.run import Run, assemble_run
from fairdiff_jax.worlds import World

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy.py")
PROMPTS = ["a photo of a doctor", "a photo of a nurse", "a photo of a pilot", "a photo of a chef"]


def tiny_config(sd_folder: str, *overrides: str):
    """The toy config on the tiny SD folder: text-encoder LoRA, rolled remat chain, constant lr (the paper's
    defaults, not the toy demo's U-Net LoRA / unrolled chain / cosine decay)."""
    return load_config(
        CONFIG + ":text_lora",
        [
            f"--config.model.path={sd_folder}",
            "--config.sampler.unroll=1",
            "--config.sampler.remat_policy=full",
            "--config.train.lr_schedule=constant",
            "--config.sampler.train_steps=(2, 3)",
            "--config.train.images_per_prompt=8",
            "--config.train.prompts_per_step=2",
            "--config.loss.num_ot_samples=8",
            "--config.train.lr=0.01",
            "--config.data.prompts=()",  # the world's prompts (tiny_run)
            *overrides,
        ],
        validate=False,
    )


def write_finished_run(workdir: str, run: Run, shift: float = 0.3) -> None:
    """A run folder holding one checkpoint (step 1) whose adaptor is the initial one + ``shift`` (so it changes
    the images), as ``fairdiff train`` would leave it; for evaluation tests."""
    from fairdiff_jax import adaptors
    from fairdiff_jax.checkpoints import Checkpointer

    adaptors.write_adaptor_metadata(workdir, run.spec)
    params = adaptors.init_adaptor(jax.random.PRNGKey(0), run.spec, run.frozen["unet"], run.frozen["text_encoder"])
    params = jax.tree.map(lambda x: x + shift, params)
    with Checkpointer(workdir, save_every=1) as ckpt:
        ckpt.save(1, {"params": params, "ema": params}, {"count": np.zeros(())}, {"prompts": {}})


def tiny_run(sd_folder: str, cfg, adaptor_spec=None) -> Run:
    """The tiny SD folder as a world with a random 2-class CNN as the gender classifier and its logits as features
    (``adaptor_spec``: an adaptor folder's spec instead of ``config.adaptor``'s)."""
    sd = load_stable_diffusion(sd_folder, cache_dir=None)
    net = MultiHeadConvNet({"gender": 2})
    classifier_params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]

    def classify(params, images):
        return net.apply({"params": params}, images), jnp.ones(images.shape[:1], bool)

    def features(params, images):
        return net.apply({"params": params}, images)["gender"]

    world = World(
        model_folder=sd_folder,
        components=(),
        classifier=classify,
        classifier_params=classifier_params,
        feature_fns=(features,),
        feature_params=(classifier_params,),
        prompts={"train": list(PROMPTS), "test": list(PROMPTS)},
    )
    return assemble_run(cfg, sd, world, adaptor_spec)


def training_process(sd_folder: str, workdir: str, steps: int):
    """This file run as a training process on 2 simulated devices (so a test can signal or kill it)."""
    import subprocess

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), sd_folder, workdir, str(steps)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


if __name__ == "__main__":
    jax.config.update(
        "jax_compilation_cache_dir",
        os.environ.get("FAIRDIFF_JAX_CACHE", os.path.expanduser("~/.cache/fairdiff_jax/xla_cache")),
    )
    from fairdiff_jax.train import train

    folder, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = tiny_config(
        folder, f"--config.num_steps={steps}", "--config.checkpoint_every=1", "--config.keep_checkpoints=10"
    )
    result = train(cfg, workdir, run=tiny_run(folder, cfg), progress=False)
    sys.exit(0 if result.finished else 128 + (result.signal or 15))  # as `fairdiff train` exits
