"""One entry point for every baseline: its hyper-parameters from a config section, and what it changes in a run.

``prepare_baseline`` turns a method name and its settings into a :class:`BaselineSetup`: a rewrite of the
conditional prompts (ethical intervention), a map of the conditional embeddings (debiasVL), edited U-Net
parameters (UCE) or the concept embeddings of semantic guidance (Fair Diffusion). The evaluator applies the
setup and otherwise generates and scores images exactly as for the original model; the unconditional
embedding of classifier-free guidance is never changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.baselines import debiasvl, ethical_intervention, fair_diffusion, uce
from fairdiff_jax.errors import FairdiffError

# method name -> its hyper-parameter dataclass (the names ``fairdiff evaluate --method`` accepts)
METHODS = {
    "ethical_intervention": ethical_intervention.EthicalInterventionConfig,
    "debiasvl": debiasvl.DebiasVLConfig,
    "uce": uce.UCEConfig,
    "fair_diffusion": fair_diffusion.FairDiffusionConfig,
}

# prompts -> (text-encoder states [N, L, D], token ids [N, L])
EmbedFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
# (U-Net params, prompts) -> {prompt: class ratios [K]} measured on generated images (UCE's loop)
MeasureFn = Callable[[Any, Sequence[str]], Mapping[str, np.ndarray]]


def check_method(name: str) -> None:
    if name not in METHODS:
        raise FairdiffError(f"unknown baseline method '{name}'; choose one of {sorted(METHODS)}.")


def method_defaults(name: str) -> dict:
    """The method's hyper-parameters with the papers' defaults as plain values (dicts, tuples; for config files)."""
    check_method(name)
    return {k: _plain(v) for k, v in dataclasses.asdict(METHODS[name]()).items()}


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def method_config(name: str, values: Mapping[str, Any] | None = None):
    """The method's dataclass with ``values`` over the defaults; an unknown key is an error."""
    check_method(name)
    cls = METHODS[name]
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FairdiffError(f"unknown {name} setting(s) {unknown}; allowed: {sorted(known)}.")
    for key, value in values.items():
        if isinstance(value, Mapping):
            values[key] = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in value.items()}
        elif isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


@dataclasses.dataclass
class FairGuidance:
    """Semantic guidance of one run: concept embeddings ``[E, L, D]``, per-attribute targets, hyper-parameters."""

    concept_emb: np.ndarray
    targets: list[np.ndarray]
    config: fair_diffusion.FairDiffusionConfig

    def directions(self, key: jax.Array, num_images: int) -> jax.Array:
        """``[num_images, E]`` per-image directions (a class drawn from each attribute's target)."""
        return fair_diffusion.draw_directions(key, self.targets, num_images)

    def guide(self, directions: jax.Array) -> fair_diffusion.SemanticGuide:
        """The sampler guide for a batch with these per-image ``directions`` ``[B, E]``."""
        return fair_diffusion.SemanticGuide(jnp.asarray(self.concept_emb), directions, self.config)


@dataclasses.dataclass
class BaselineSetup:
    """What a baseline changes; ``None`` / identity where it leaves the run alone."""

    name: str
    rewrite_prompts: Callable[[Sequence[str]], list[str]] = list
    map_conditioning: Callable[[jax.Array], jax.Array] | None = None
    unet_params: Any = None
    guidance: FairGuidance | None = None
    info: dict = dataclasses.field(default_factory=dict)


def prepare_baseline(
    name: str,
    settings,
    *,
    attributes: Sequence[str],
    targets: Sequence[np.ndarray],
    embed: EmbedFn,
    eos_token_id: int,
    unet_params: Any = None,
    concepts: Sequence[str] = (),
    preserve_prompts: Sequence[str] = (),
    measure: MeasureFn | None = None,
) -> BaselineSetup:
    """Build the :class:`BaselineSetup` of method ``name`` with ``settings`` (its dataclass or a mapping).

    ``concepts`` are the debiased subjects (training occupations) that debiasVL calibrates on and UCE edits;
    ``preserve_prompts`` are what UCE keeps unchanged; ``measure`` drives UCE's re-measured edit rounds.
    """
    check_method(name)
    if not isinstance(settings, METHODS[name]):
        settings = method_config(name, settings)
    attributes = list(attributes)
    if name == "ethical_intervention":
        return BaselineSetup(
            name, rewrite_prompts=lambda prompts: ethical_intervention.intervene(prompts, attributes, settings)
        )
    if name == "fair_diffusion":
        hidden, _ = embed(fair_diffusion.edit_prompts(attributes, settings))
        guidance = FairGuidance(np.asarray(hidden), [np.asarray(t, np.float32) for t in targets], settings)
        return BaselineSetup(
            name, guidance=guidance, info={"concepts": fair_diffusion.edit_prompts(attributes, settings)}
        )
    if not concepts:
        raise FairdiffError(f"{name} needs the debiased concepts (e.g. the training occupations); none were given.")
    if name == "debiasvl":
        prompts, pairs = debiasvl.candidate_prompts(concepts, attributes, settings)
        hidden, ids = embed(prompts)
        spurious = debiasvl.spurious_prompts(attributes, settings)
        spurious_emb = debiasvl.eos_embeddings(*embed(spurious), eos_token_id) if spurious else None
        projection = debiasvl.calibrated_projection(
            debiasvl.eos_embeddings(hidden, ids, eos_token_id), pairs, settings.lam, spurious_emb
        )
        return BaselineSetup(
            name,
            map_conditioning=lambda cond: debiasvl.project_embeddings(cond, projection),
            info={"num_pairs": len(pairs), "uses_spurious_projection": bool(spurious)},
        )
    # UCE
    if unet_params is None or measure is None:
        raise FairdiffError("UCE needs the U-Net parameters and a measure function (generate and classify images).")
    rows = uce.edit_rows(embed, concepts, attributes, eos_token_id, settings)
    preserve = list(np.asarray(embed(list(preserve_prompts))[0], np.float64)) if preserve_prompts else []
    edited, history = uce.uce_debias(unet_params, rows, preserve, measure, settings)
    return BaselineSetup(name, unet_params=edited, info={"rounds": len(history), "history": history})
