"""Text to conditioning, noise to images: the one place both training and evaluation generate.

A :class:`Pipeline` holds the static modules (what the apply functions need: U-Net, text encoder, tokenizer,
VAE, the noise schedule and the adaptor's soft-token layout); the weights travel separately as pytrees.
:class:`SamplerSettings` is built once from ``config.sampler`` and passed to :func:`generate_images`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax import sampling
from fairdiff_jax.adaptors import soft_tokens as soft_lib


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How images are sampled (``config.sampler``): solver, guidance, gradient mode, remat and step counts."""

    solver: str = "dpmpp_2m"
    guidance_scale: float = 7.5
    gradient_mode: str = "adjusted"
    remat_policy: str = "full"
    unroll: int = 1
    train_steps: tuple[int, int] = (19, 23)  # inclusive range, one count drawn per training iteration
    eval_steps: int = 25

    @classmethod
    def from_config(cls, sampler_cfg) -> SamplerSettings:
        return cls(
            solver=str(sampler_cfg.solver),
            guidance_scale=float(sampler_cfg.guidance_scale),
            gradient_mode=str(sampler_cfg.gradient_mode),
            remat_policy=str(sampler_cfg.remat_policy),
            unroll=int(sampler_cfg.unroll),
            train_steps=tuple(int(s) for s in sampler_cfg.train_steps),
            eval_steps=int(sampler_cfg.eval_steps),
        )

    @property
    def max_train_steps(self) -> int:
        """The static scan length of a training chain (the largest step count drawn)."""
        return self.train_steps[1]


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """The static modules of a text-to-image model. ``vae`` is None in pixel space (the samples are the images)."""

    unet: Any
    text_encoder: Any  # grown by the soft tokens when the adaptor has them
    tokenizer: Any  # with the soft tokens registered when the adaptor has them
    vae: Any
    vae_scaling_factor: float
    schedule: sampling.NoiseSchedule
    num_soft_tokens: int = 0
    soft_token: str = soft_lib.DEFAULT_TOKEN

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the U-Net's input."""
        config = self.unet.config if hasattr(self.unet, "config") else self.unet
        size = int(config.sample_size)
        return int(config.in_channels), size, size


def tokenize(pipeline: Pipeline, prompts: Sequence[str], *, soft_tokens: bool) -> np.ndarray:
    """Token ids ``[P, L]``; with ``soft_tokens`` the adaptor's tokens are prepended to each prompt."""
    if soft_tokens and pipeline.num_soft_tokens:
        return np.asarray(
            soft_lib.conditional_prompt_ids(
                pipeline.tokenizer, list(prompts), pipeline.soft_token, pipeline.num_soft_tokens
            )
        )
    return np.asarray(soft_lib.prompt_ids(pipeline.tokenizer, list(prompts), max_length=pipeline.max_length))


def embed(pipeline: Pipeline, text_encoder_params, ids: jax.Array) -> jax.Array:
    """Text-encoder hidden states ``[P, L, D]`` for token ids ``[P, L]``.

    With soft tokens the module's table is grown; the frozen base parameters (the original model: x_ori, the
    "before" evaluation) get zero rows appended, which plain ids never index, so they give the base encoder's output.
    """
    if pipeline.num_soft_tokens:
        table = soft_lib.token_embedding(text_encoder_params)
        missing = int(pipeline.text_encoder.config.vocab_size) - table.shape[0]
        if missing > 0:
            zeros = jnp.zeros((missing, table.shape[1]), table.dtype)
            text_encoder_params = soft_lib.apply_soft_tokens(text_encoder_params, zeros)
    return pipeline.text_encoder(ids, params=text_encoder_params).last_hidden_state


def generate_images(
    pipeline: Pipeline,
    sampler: SamplerSettings,
    unet_params,
    vae_params,
    cond: jax.Array,
    uncond: jax.Array,
    noise: jax.Array,
    num_steps,
    *,
    max_steps: int,
    gradient_mode: str,
    guide: sampling.Guide | None = None,
) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [-1, 1] from noise ``[B, C, h, w]`` and conditioning ``[B, L, D]``; ``guide``
    replaces classifier-free guidance (a baseline's sampling-time guidance)."""
    latents = sampling.sample_latents(
        sampling.unet_apply_fn(pipeline.unet),
        unet_params,
        noise,
        cond,
        uncond,
        num_steps,
        pipeline.schedule,
        max_steps=max_steps,
        solver=sampler.solver,
        guidance_scale=sampler.guidance_scale,
        gradient_mode=gradient_mode,
        remat_policy=sampler.remat_policy,
        unroll=sampler.unroll,
        guide=guide,
    )
    if pipeline.vae is None:  # pixel space: the samples are the images
        return jnp.clip(jnp.transpose(latents, (0, 2, 3, 1)), -1.0, 1.0)
    return sampling.decode_latents(pipeline.vae, vae_params, latents, pipeline.vae_scaling_factor)


def make_generator(
    pipeline: Pipeline,
    sampler: SamplerSettings,
    classifier,
    num_steps: int,
    *,
    condition: Callable[[jax.Array], jax.Array] | None = None,
    guide_for: Callable[..., sampling.Guide] | None = None,
):
    """A jitted ``generate(unet_params, te_params, vae_params, classifier_params, cond_ids [1,L], uncond_ids [1,L],
    noise [B,...], *guide_args) -> (images, predicted classes {attr: [B]}, valid [B])`` without gradient,
    ``num_steps`` steps. A baseline may map the conditional embedding (``condition``, ``[B,L,D] -> [B,L,D]``) or
    guide the sampler with ``guide_for(*guide_args)`` (per-image arrays, batched like ``noise``)."""

    def generate(unet_params, te_params, vae_params, classifier_params, cond_ids, uncond_ids, noise, *guide_args):
        cond = embed(pipeline, te_params, cond_ids)
        uncond = embed(pipeline, te_params, uncond_ids)
        if condition is not None:
            cond = condition(cond)
        cond = jnp.broadcast_to(cond, (noise.shape[0],) + cond.shape[1:])
        images = generate_images(
            pipeline,
            sampler,
            unet_params,
            vae_params,
            cond,
            uncond,
            noise,
            num_steps,
            max_steps=num_steps,
            gradient_mode="detached",
            guide=None if guide_for is None else guide_for(*guide_args),
        )
        logits, valid = classifier(classifier_params, images)
        return images, {name: jnp.argmax(value, -1) for name, value in logits.items()}, valid

    return jax.jit(generate)


def prompt_noise(pipeline: Pipeline, prompt_index: int, num_images: int, seed: int) -> jax.Array:
    """The fixed evaluation noise ``[M, C, h, w]`` of one prompt: the same for every model, so images pair up."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), prompt_index)
    return jax.random.normal(key, (num_images,) + pipeline.latent_shape, jnp.float32)
