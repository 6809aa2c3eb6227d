"""A baseline applied to a run (``fairdiff evaluate --method NAME``): settings from ``config.baselines.<NAME>``,
text embeddings from the run's frozen text encoder, the debiased concepts from its training prompts, and UCE's
measure rounds generated and classified exactly as the evaluation generates and classifies."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.baselines.class_words import joint_class_words
from fairdiff_jax.baselines.ethical_intervention import prompt_subject
from fairdiff_jax.baselines.methods import BaselineSetup, EmbedFn, MeasureFn, method_config, prepare_baseline
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.generation import SamplerSettings, embed, tokenize

EMBED_CHUNK = 64  # prompts per text-encoder call (one compiled shape)


def run_embedder(run) -> EmbedFn:
    """``prompts -> (states [N, L, D] float32, ids [N, L])`` with the run's frozen (unadapted) text encoder."""
    encode = jax.jit(lambda params, ids: embed(run.pipeline, params, ids))

    def embed_prompts(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = tokenize(run.pipeline, list(prompts), soft_tokens=False)
        states = []
        for start in range(0, len(ids), EMBED_CHUNK):
            chunk = ids[start : start + EMBED_CHUNK]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], EMBED_CHUNK - len(chunk), axis=0)])
            states.append(np.asarray(encode(run.frozen["text_encoder"], jnp.asarray(padded)), np.float32)[: len(chunk)])
        return np.concatenate(states), ids

    return embed_prompts


def training_subjects(run, subject_pattern: str) -> list[str]:
    """The distinct subjects (occupations) of the run's training prompts, in order."""
    from fairdiff_jax.baselines.ethical_intervention import EthicalInterventionConfig

    config = EthicalInterventionConfig(subject_pattern=subject_pattern)
    return list(dict.fromkeys(prompt_subject(p, config) for p in run.train_prompts))


def uce_measure(run, cfg, settings, out_dir: str, *, progress: bool) -> MeasureFn:
    """UCE's ratio measurement: ``settings.measure_images`` images per prompt (evaluation seed + 1, so never the
    evaluation's noise), classified by the run's classifier, joint-class ratios over images with a valid face."""
    from fairdiff_jax.eval_store import params_digest
    from fairdiff_jax.evaluate import EvalSettings, generate_prompt_set, original_model_id

    attributes = list(run.task.attributes)
    shape = tuple(run.task.num_classes[a] for a in attributes)
    sampler = dataclasses.replace(SamplerSettings.from_config(cfg.sampler), eval_steps=int(settings.measure_steps))
    eval_settings = EvalSettings(
        images_per_prompt=int(settings.measure_images),
        seed=int(cfg.eval.seed) + 1,
        batch_size=int(cfg.eval.batch_size),
        sampler=sampler,
    )
    rounds = itertools.count()

    def measure(unet_params, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        folder = os.path.join(out_dir, "uce_rounds", f"round_{next(rounds):02d}")
        results = generate_prompt_set(
            run,
            eval_settings,
            unet_params,
            run.frozen["text_encoder"],
            list(prompts),
            folder,
            soft_tokens=False,
            model_id=f"uce-measure:{params_digest(unet_params)}|{original_model_id(run)}",
            progress=progress,
        )
        ratios = {}
        for record in results:
            joint = np.ravel_multi_index(tuple(record["labels"][a] for a in attributes), shape)[record["valid"]]
            counts = np.bincount(joint, minlength=math.prod(shape)).astype(np.float64)
            ratios[record["prompt"]] = counts / max(counts.sum(), 1.0)
        return ratios

    return measure


def _check_class_words(name: str, settings, run) -> None:
    if not hasattr(settings, "class_words"):
        return
    for attribute in run.task.attributes:
        words = joint_class_words([attribute], settings.class_words, name)
        if len(words) != run.task.num_classes[attribute]:
            raise FairdiffError(
                f"config baselines.{name}.class_words.{attribute} names {len(words)} classes but attributes."
                f"{attribute} has {run.task.num_classes[attribute]}; give one word per class, in class order."
            )


def baseline_setup(run, cfg, name: str, out_dir: str, *, progress: bool = True) -> BaselineSetup:
    """The :class:`BaselineSetup` of method ``name`` for ``run`` (UCE's measure rounds are stored in ``out_dir``)."""
    if "baselines" not in cfg or name not in cfg.baselines:
        method_config(name)  # an unknown name fails here with the list of methods
        raise FairdiffError(f"the config has no baselines.{name} section; build it on fairdiff_jax.config.base_config.")
    settings = method_config(name, cfg.baselines[name].to_dict())
    _check_class_words(name, settings, run)
    pattern = cfg.baselines.ethical_intervention.subject_pattern
    concepts = list(getattr(settings, "concepts", ())) or (
        training_subjects(run, pattern) if name in ("debiasvl", "uce") else []
    )
    measure = uce_measure(run, cfg, settings, out_dir, progress=progress) if name == "uce" else None
    attributes = list(run.task.attributes)
    return prepare_baseline(
        name,
        settings,
        attributes=attributes,
        targets=[run.task.targets[a] for a in attributes],
        embed=run_embedder(run),
        eos_token_id=int(run.pipeline.tokenizer.eos_token_id),
        unet_params=run.frozen["unet"],
        concepts=concepts,
        preserve_prompts=list(getattr(settings, "preserve", ())),
        measure=measure,
    )
