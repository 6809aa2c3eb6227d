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
from fairdiff_jax.adaptors.lora_branch import LoraBranch, with_branch


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
    prompt_padding: str = "max_length"  # config data.prompt_padding (soft_tokens.PROMPT_PADDINGS)

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the U-Net's input."""
        config = self.unet.config if hasattr(self.unet, "config") else self.unet
        size = int(config.sample_size)
        return int(config.in_channels), size, size


def tokenize(pipeline: Pipeline, prompts: Sequence[str], *, soft_tokens: bool, length: int | None = None) -> np.ndarray:
    """Token ids ``[P, L]``; with ``soft_tokens`` the adaptor's tokens are prepended to each prompt.

    ``L`` is ``length`` when given, else the text encoder's length (``prompt_padding="max_length"``) or the
    prompts' own longest length (``"prompt"``, the paper authors' ``padding=True``).
    """
    with_soft = soft_tokens and pipeline.num_soft_tokens
    texts = soft_lib.conditional_texts(prompts, pipeline.soft_token, pipeline.num_soft_tokens) if with_soft else prompts
    if length is None:
        prompt_length = pipeline.prompt_padding == "prompt"
        length = soft_lib.token_length(pipeline.tokenizer, texts) if prompt_length else pipeline.max_length
    soft_lib.warn_if_cut(pipeline.tokenizer, texts, length)  # e.g. a baseline's clause past the toy's 16 tokens
    ids, _ = soft_lib.padded_tokens(pipeline.tokenizer, list(texts), length)
    return ids


def uncond_ids(pipeline: Pipeline, prompt_ids: np.ndarray | jax.Array) -> np.ndarray:
    """Ids ``[1, L]`` of "" padded to the length of ``prompt_ids`` ``[P, L]`` (the authors' ``max_length=L``)."""
    return tokenize(pipeline, [""], soft_tokens=False, length=int(prompt_ids.shape[-1]))


def prompt_mask(pipeline: Pipeline, ids: jax.Array) -> jax.Array | None:
    """The attention mask ``[P, L]`` of ``"prompt"`` padding (1 up to and with the first EOS), else None (no mask,
    as diffusers' SD pipelines encode 77 tokens)."""
    if pipeline.prompt_padding != "prompt":
        return None
    is_eos = ids == int(pipeline.tokenizer.eos_token_id)
    last = jnp.where(is_eos.any(axis=-1), jnp.argmax(is_eos, axis=-1), ids.shape[-1] - 1)
    return (jnp.arange(ids.shape[-1])[None, :] <= last[:, None]).astype(jnp.int32)


def embed(pipeline: Pipeline, text_encoder_params, ids: jax.Array, *, branch: LoraBranch | None = None) -> jax.Array:
    """Text-encoder hidden states ``[P, L, D]`` for token ids ``[P, L]`` (with the attention mask of
    :func:`prompt_mask`, and ``branch``'s unmerged float32 LoRA when given).

    With soft tokens the module's table is grown; the frozen base parameters (the original model: x_ori, the
    "before" evaluation) get zero rows appended, which plain ids never index, so they give the base encoder's output.
    """
    if pipeline.num_soft_tokens:
        table = soft_lib.token_embedding(text_encoder_params)
        missing = int(pipeline.text_encoder.config.vocab_size) - table.shape[0]
        if missing > 0:
            zeros = jnp.zeros((missing, table.shape[1]), table.dtype)
            text_encoder_params = soft_lib.apply_soft_tokens(text_encoder_params, zeros)

    def encode(params, ids):
        return pipeline.text_encoder(ids, attention_mask=prompt_mask(pipeline, ids), params=params).last_hidden_state

    return with_branch(encode, branch)(text_encoder_params, ids)


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
    unet_branch: LoraBranch | None = None,
    guide: sampling.Guide | None = None,
    record: bool = False,
    replay: sampling.Trajectory | None = None,
) -> jax.Array | tuple[jax.Array, sampling.Trajectory]:
    """Images ``[B, H, W, 3]`` in [-1, 1] from noise ``[B, C, h, w]`` and conditioning ``[B, L, D]``; with
    ``unet_branch`` the U-Net runs with that unmerged float32 LoRA branch; ``guide`` replaces classifier-free
    guidance (a baseline's sampling-time guidance); ``record`` / ``replay`` as in
    :func:`fairdiff_jax.sampling.sample_latents` (with ``record`` the result is ``(images, trajectory)``)."""
    latents = sampling.sample_latents(
        with_branch(sampling.unet_apply_fn(pipeline.unet), unet_branch),
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
        record=record,
        replay=replay,
    )
    latents, trajectory = latents if record else (latents, None)
    if pipeline.vae is None:  # pixel space: the samples are the images
        images = jnp.clip(jnp.transpose(latents, (0, 2, 3, 1)), -1.0, 1.0)
    else:
        images = sampling.decode_latents(pipeline.vae, vae_params, latents, pipeline.vae_scaling_factor)
    return (images, trajectory) if record else images


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
    noise [B,...], branches={}, *guide_args) -> (images, predicted classes {attr: [B]}, valid [B])`` without
    gradient, ``num_steps`` steps; ``branches`` are the unmerged LoRA branches of
    ``adaptors.transform.adapt_weights``. A baseline may map the conditional embedding (``condition``,
    ``[B,L,D] -> [B,L,D]``) or guide the sampler with ``guide_for(*guide_args)`` (per-image arrays, batched like
    ``noise``)."""

    def generate(
        unet_params, te_params, vae_params, classifier_params, cond_ids, uncond_ids, noise, branches=None, *guide_args
    ):
        branches = branches or {}
        cond = embed(pipeline, te_params, cond_ids, branch=branches.get("text_encoder"))
        uncond = embed(pipeline, te_params, uncond_ids, branch=branches.get("text_encoder"))
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
            unet_branch=branches.get("unet"),
            guide=None if guide_for is None else guide_for(*guide_args),
        )
        logits, valid = classifier(classifier_params, images)
        return images, {name: jnp.argmax(value, -1) for name, value in logits.items()}, valid

    return jax.jit(generate)


def prompt_noise(pipeline: Pipeline, prompt_index: int, num_images: int, seed: int) -> jax.Array:
    """The fixed evaluation noise ``[M, C, h, w]`` of one prompt: the same for every model, so images pair up."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), prompt_index)
    return jax.random.normal(key, (num_images,) + pipeline.latent_shape, jnp.float32)
