"""A run's frozen side, assembled once from a config: the pipeline's static modules, one pytree of frozen
weights, the scoring functions, the adaptor's spec, the attribute task and the prompts.

``build_run(cfg)`` serves ``train``, ``evaluate`` and every plug-in's driver; tests and plug-ins that already
hold their pieces call :func:`assemble_run` directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from ml_collections import ConfigDict

from fairdiff_jax import sampling
from fairdiff_jax.adaptors import soft_tokens as soft_lib
from fairdiff_jax.adaptors.spec import AdaptorSpec, spec_for_kind
from fairdiff_jax.config.schema import attribute_names
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.generation import Pipeline
from fairdiff_jax.models import load_stable_diffusion
from fairdiff_jax.models.loader import DTYPES
from fairdiff_jax.prompts import load_prompts
from fairdiff_jax.worlds import Classifier, FeatureFn, World, build_world


@dataclasses.dataclass(frozen=True)
class Task:
    """What the run aims for: attribute names (canonical order), class counts and target distributions."""

    attributes: tuple[str, ...]
    num_classes: Mapping[str, int]
    targets: Mapping[str, np.ndarray]

    @classmethod
    def from_config(cls, cfg: ConfigDict) -> Task:
        names = attribute_names(cfg)
        if not names:
            raise FairdiffError("the config has no attributes; add e.g. config.attributes.gender = attribute('gender')")
        return cls(
            attributes=tuple(names),
            num_classes={n: len(cfg.attributes[n].classes) for n in names},
            targets={n: np.asarray(cfg.attributes[n].target, np.float32) for n in names},
        )


@dataclasses.dataclass(eq=False)
class Run:
    """Everything frozen in a run. ``frozen`` = ``{"unet", "text_encoder", "vae", "classifier", "features"}``."""

    pipeline: Pipeline
    frozen: dict
    classifier: Classifier
    feature_fns: tuple[FeatureFn, ...]
    spec: AdaptorSpec
    task: Task
    train_prompts: list[str]
    eval_prompts: dict[str, list[str]]  # split name -> prompts
    model_folder: str
    face_detector: object = None  # the world's face detector (None: no faces, the face terms stay off)
    face_box_expand: float = 1.0  # how the facial classifiers expand its box into their crop
    attention: str = "auto"  # config.model.attention: how train() and generation trace the attention modules


def adaptor_spec_from_config(cfg: ConfigDict, model_folder: str, unet_params, text_encoder_params) -> AdaptorSpec:
    """The spec of ``config.adaptor`` fingerprinted against the base weights."""
    a = cfg.adaptor
    return spec_for_kind(
        a.kind,
        unet_params,
        text_encoder_params,
        base_model=model_folder,
        rank=a.rank,
        alpha=a.alpha,
        num_tokens=a.num_tokens,
        ema_decay=a.ema_decay,
        oft=a.oft.to_dict(),
    )


def _prompts(cfg: ConfigDict, world: World) -> tuple[list[str], dict[str, list[str]]]:
    """Train prompts and evaluation splits: from ``data.prompts`` when set, else the world's own."""
    sources = tuple(cfg.data.prompts)
    if sources:
        train = load_prompts(sources, split="train", template=cfg.data.template)
        return list(train), {"test": list(load_prompts(sources, split="test", template=cfg.data.template))}
    if "train" not in world.prompts:
        raise FairdiffError(
            "config data.prompts is empty and this world has no prompts of its own; set e.g. "
            "--config.data.prompts=occupations"
        )
    evals = {k: list(v) for k, v in world.prompts.items() if k != "train"}
    return list(world.prompts["train"]), evals


def assemble_run(cfg: ConfigDict, sd, world: World, adaptor_spec: AdaptorSpec | None = None) -> Run:
    """A :class:`Run` from loaded SD components ``sd`` (``models.load_stable_diffusion``) and a :class:`World`.

    ``adaptor_spec`` (an exported or imported adaptor folder's) replaces ``config.adaptor``'s spec, so the
    pipeline carries that adaptor's soft tokens.
    """
    spec = adaptor_spec or adaptor_spec_from_config(cfg, world.model_folder, sd.unet_params, sd.text_encoder_params)
    tokenizer, text_encoder = sd.tokenizer, sd.text_encoder
    if spec.num_soft_tokens:
        vocab_rows = soft_lib.token_embedding(sd.text_encoder_params).shape[0]
        tokenizer, _ = soft_lib.add_soft_tokens(tokenizer, spec.num_soft_tokens, spec.soft_token, vocab_size=vocab_rows)
        text_encoder = soft_lib.grow_text_encoder(sd.text_encoder, spec.num_soft_tokens)
    pipeline = Pipeline(
        unet=sd.unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=sd.vae,
        vae_scaling_factor=sd.vae_scaling_factor,
        schedule=sampling.make_schedule(
            sd.scheduler,
            timestep_spacing=cfg.sampler.timestep_spacing or None,
            final_sigmas_type=cfg.sampler.final_sigmas_type,
        ),
        num_soft_tokens=spec.num_soft_tokens,
        soft_token=spec.soft_token,
        prompt_padding=str(cfg.data.prompt_padding),
    )
    frozen = {
        "unet": sd.unet_params,
        "text_encoder": sd.text_encoder_params,
        "vae": sd.vae_params,
        "classifier": world.classifier_params,
        "features": list(world.feature_params),
    }
    train_prompts, eval_prompts = _prompts(cfg, world)
    return Run(
        pipeline=pipeline,
        frozen=frozen,
        classifier=world.classifier,
        feature_fns=tuple(world.feature_fns),
        spec=spec,
        task=Task.from_config(cfg),
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        model_folder=world.model_folder,
        face_detector=world.face_detector,
        face_box_expand=world.face_box_expand,
        attention=str(cfg.model.attention),
    )


def build_run(cfg: ConfigDict, adaptor_spec: AdaptorSpec | None = None) -> Run:
    """Load and assemble the frozen side of the run described by ``cfg`` (see :func:`assemble_run`)."""
    Task.from_config(cfg)  # a config without attributes fails before anything is loaded
    world = build_world(cfg)
    sd = load_stable_diffusion(
        world.model_folder,
        dtype=DTYPES[cfg.model.dtype],
        components=world.components,
        variant=cfg.model.variant or None,
    )
    return assemble_run(cfg, sd, world, adaptor_spec)
