"""Fair Diffusion: semantic guidance towards and away from attribute concepts at sampling time.

Friedrich, Brack, Struppek, Hintersdorf, Schramowski, Luccioni, Kersting, "Fair Diffusion: Instructing
Text-to-Image Generation Models on Fairness" (arXiv 2302.10893), built on SEGA (Brack et al., NeurIPS 2023).
For every image a target class is drawn from the target distribution; guidance then pushes towards that
class's concept (``"female person"``) and away from the others' (``"male person"``). At step ``i``, with the
unconditional, text and concept predictions ``u``, ``t``, ``e_c`` and direction ``d_c`` in {+1, -1}:

    g_c   = s_e d_c (e_c - u), zeroed where |g_c| is below its ``threshold`` quantile (per image and channel)
    edit  = sum_c g_c + s_m m;     m <- beta m + (1 - beta) edit        (m starts at 0, updated every step)
    eps   = u + w (t - u) + [i >= warmup] edit

This is SEGA as diffusers' ``SemanticStableDiffusionPipeline`` computes it (equal edit weights, no cooldown),
with the settings of the Fair Diffusion authors' ``generate_images.py`` (ml-research/Fair-Diffusion): edit
scale 4, threshold 0.95, warmup 5 steps, momentum scale 0.5, beta 0.6. Several attributes (gender x race)
are guided at once, each with its own concepts and an independently drawn class (the target is their
product); per-image directions generalise the pipeline's per-batch ``reverse_editing_direction``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.baselines.class_words import DEFAULT_CLASS_WORDS
from fairdiff_jax.errors import FairdiffError

# (params, latents [N,C,h,w], timesteps [N], context [N,L,D]) -> model output [N,C,h,w]
UNetFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FairDiffusionConfig:
    """SEGA hyper-parameters (defaults: the Fair Diffusion authors' gender editing run)."""

    edit_guidance_scale: float = 4.0
    threshold: float = 0.95
    warmup_steps: int = 5
    momentum_scale: float = 0.5
    momentum_beta: float = 0.6
    edit_prompt: str = "{word} person"
    class_words: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CLASS_WORDS))

    def __post_init__(self):
        if not 0.0 <= float(self.threshold) < 1.0:
            raise FairdiffError(
                f"Fair Diffusion's threshold must lie in [0, 1) (got {self.threshold}); SEGA uses 0.95."
            )
        if int(self.warmup_steps) < 0:
            raise FairdiffError(f"warmup_steps must be >= 0 (got {self.warmup_steps}); the authors use 5.")


def edit_prompts(attributes: Sequence[str], config: FairDiffusionConfig = FairDiffusionConfig()) -> list[str]:
    """The concept prompts, attribute by attribute in class order (``["female person", "male person", ...]``)."""
    missing = [a for a in attributes if a not in config.class_words]
    if not attributes or missing:
        raise FairdiffError(
            f"Fair Diffusion has no class words for attribute(s) {missing or '(none given)'}; known: "
            f"{sorted(config.class_words)}. Add them to the method's class_words."
        )
    return [config.edit_prompt.format(word=w) for a in attributes for w in config.class_words[a]]


def draw_directions(key: jax.Array, targets: Sequence[np.ndarray | Sequence[float]], num_images: int) -> jax.Array:
    """``[B, E]`` directions: per image and attribute, +1 for a class drawn from its target, -1 for the others."""
    columns = []
    for target, attribute_key in zip(targets, jax.random.split(key, len(targets))):
        probs = jnp.asarray(target, jnp.float32)
        drawn = jax.random.choice(attribute_key, probs.shape[0], (int(num_images),), p=probs)
        columns.append(jnp.where(jax.nn.one_hot(drawn, probs.shape[0]) > 0, 1.0, -1.0))
    return jnp.concatenate(columns, axis=1)


def semantic_guidance(
    uncond: jax.Array,
    text: jax.Array,
    concepts: jax.Array,
    directions: jax.Array,
    momentum: jax.Array,
    step: int | jax.Array,
    guidance_scale: float | jax.Array,
    config: FairDiffusionConfig = FairDiffusionConfig(),
) -> tuple[jax.Array, jax.Array]:
    """Guided prediction ``[B,C,h,w]`` and the new momentum from ``u``, ``t`` ``[B,C,h,w]``, ``e`` ``[E,B,C,h,w]``.

    ``directions`` ``[B, E]`` (+1 towards, -1 away, 0 off); ``step`` is the 0-based sampler step. Float32 math.
    """
    uncond, text, concepts = (x.astype(jnp.float32) for x in (uncond, text, concepts))
    signs = jnp.transpose(jnp.asarray(directions, jnp.float32))[:, :, None, None, None]  # [E, B, 1, 1, 1]
    per_concept = config.edit_guidance_scale * signs * (concepts - uncond[None])
    magnitude = jnp.abs(per_concept)
    flat = magnitude.reshape(*magnitude.shape[:3], -1)
    cutoff = jnp.quantile(flat, config.threshold, axis=-1)[..., None, None]  # per concept, image and channel
    per_concept = jnp.where(magnitude >= cutoff, per_concept, 0.0)
    edit = per_concept.sum(axis=0) + config.momentum_scale * momentum
    new_momentum = config.momentum_beta * momentum + (1.0 - config.momentum_beta) * edit
    active = jnp.asarray(step) >= config.warmup_steps
    guided = uncond + guidance_scale * (text - uncond) + jnp.where(active, edit, 0.0)
    return guided, new_momentum


def fair_guided_output(
    unet_fn: UNetFn,
    unet_params,
    latents: jax.Array,
    timestep: jax.Array,
    cond_emb: jax.Array,
    uncond_emb: jax.Array,
    concept_emb: jax.Array,
    directions: jax.Array,
    momentum: jax.Array,
    step: int | jax.Array,
    guidance_scale: float | jax.Array,
    config: FairDiffusionConfig = FairDiffusionConfig(),
) -> tuple[jax.Array, jax.Array]:
    """One U-Net call on ``[(2 + E) B]`` inputs, then :func:`semantic_guidance`; returns (output, momentum).

    ``cond_emb`` ``[B,L,D]``, ``uncond_emb`` ``[B or 1,L,D]``, ``concept_emb`` ``[E,L,D]`` (shared by the batch).
    """
    batch, num_concepts = latents.shape[0], concept_emb.shape[0]
    if directions.shape != (batch, num_concepts):
        raise FairdiffError(
            f"Fair Diffusion directions have shape {tuple(directions.shape)}, expected (images, concepts) = "
            f"{(batch, num_concepts)}; draw them with draw_directions for this batch."
        )
    uncond_emb = jnp.broadcast_to(uncond_emb, cond_emb.shape).astype(cond_emb.dtype)
    concepts = jnp.broadcast_to(concept_emb[:, None], (num_concepts, *cond_emb.shape)).astype(cond_emb.dtype)
    context = jnp.concatenate([uncond_emb, cond_emb, concepts.reshape(-1, *cond_emb.shape[1:])], axis=0)
    copies = 2 + num_concepts
    inputs = jnp.concatenate([latents] * copies, axis=0)
    out = unet_fn(unet_params, inputs, jnp.full((copies * batch,), timestep, jnp.int32), context)
    out = out.reshape(copies, batch, *out.shape[1:])
    return semantic_guidance(out[0], out[1], out[2:], directions, momentum, step, guidance_scale, config)


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticGuide:
    """Fair Diffusion as a sampler guide (``sampling.Guide``): the SEGA momentum is its state.

    ``concept_emb`` ``[E, L, D]`` (shared by the batch), ``directions`` ``[B, E]`` (from :func:`draw_directions`).
    """

    concept_emb: jax.Array
    directions: jax.Array
    config: FairDiffusionConfig = FairDiffusionConfig()

    def init(self, noise: jax.Array) -> jax.Array:
        return jnp.zeros(noise.shape, jnp.float32)

    def __call__(self, unet_fn, unet_params, latents, timestep, step, cond_emb, uncond_emb, guidance_scale, momentum):
        output, momentum = fair_guided_output(
            unet_fn,
            unet_params,
            latents,
            timestep,
            cond_emb,
            uncond_emb,
            self.concept_emb,
            self.directions,
            momentum,
            step,
            guidance_scale,
            self.config,
        )
        return output.astype(latents.dtype), momentum
