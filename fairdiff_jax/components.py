"""The frozen pieces a run needs, built once from a config: model, adaptor spec, classifier, features, prompts.

``build_components(cfg)`` is shared by ``train``, ``evaluate`` and the demo. The generation helpers here
(``embed_prompts``, ``generate_images``) are the single place where text becomes conditioning and noise
becomes images, so training and evaluation draw images in exactly the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from fairdiff_jax import adaptors, sampling
from fairdiff_jax.config import TOY_MODEL_PATH, TOY_PROMPTS, attribute_names
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models import load_stable_diffusion
from fairdiff_jax.prompts import load_prompts

# (params, images [B,H,W,3] in [-1,1]) -> (logits {attr: [B,K]}, valid [B])
Classifier = Callable[[Any, jax.Array], tuple[Mapping[str, jax.Array], jax.Array]]
# (params, images) -> [B, D]
FeatureFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass
class Components:
    """Everything frozen in a run. ``*_params`` are pytrees of arrays; the rest is static."""

    cfg: ConfigDict
    model_path: str
    unet: Any
    unet_params: Any
    text_encoder: Any  # grown by the soft tokens when the adaptor has them
    text_encoder_params: Any
    tokenizer: Any  # with the soft tokens registered when the adaptor has them
    vae: Any  # None in pixel space (the toy world)
    vae_params: Any
    vae_scaling_factor: float
    schedule: sampling.NoiseSchedule
    spec: adaptors.AdaptorSpec
    attributes: list[str]
    num_classes: dict[str, int]
    targets: dict[str, np.ndarray]
    classifier: Classifier
    classifier_params: Any
    feature_fns: list[FeatureFn]
    feature_params: list[Any]
    train_prompts: list[str]
    eval_prompts: dict[str, list[str]]  # split name -> prompts

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)


def _adaptor_spec(cfg: ConfigDict, model_path: str, unet_params, text_encoder_params) -> adaptors.AdaptorSpec:
    kind = cfg.adaptor.kind
    targets = {}
    if kind in ("text_lora", "both"):
        targets["text_encoder"] = list(adaptors.TEXT_ENCODER_TARGETS)
    if kind in ("unet_lora", "both"):
        targets["unet"] = list(adaptors.UNET_TARGETS)
    rank = int(cfg.adaptor.rank) if targets else 0
    return adaptors.make_adaptor_spec(
        base_model=model_path,
        unet_params=unet_params,
        text_encoder_params=text_encoder_params,
        lora_rank=rank,
        lora_alpha=float(cfg.adaptor.alpha) if targets else 0.0,
        lora_targets=targets,
        num_soft_tokens=int(cfg.adaptor.num_tokens) if kind == "soft_tokens" else 0,
        ema_decay=float(cfg.adaptor.ema_decay),
    )


def _toy_pieces(cfg: ConfigDict, names: Sequence[str]):
    """Model folder, classifier, semantic feature and prompts of the embedded toy world."""
    from fairdiff_jax.toyworld import build as toy_build
    from fairdiff_jax.toyworld import classifiers as toy_classifiers
    from fairdiff_jax.toyworld import world as toy_world

    folder = toy_build.ensure_toy_world()
    params = toy_classifiers.load_classifiers(folder)

    def classify(p, images):
        logits, valid = toy_classifiers.classify({"attributes": p["attributes"]}, images)
        return {n: logits[n] for n in names}, valid

    def cue_features(p, images):  # semantics of the toy world: the occupation cue (logits: softmax saturates)
        logits, _ = toy_classifiers.classify({"cue": p["cue"]}, images)
        return logits["occupation"]

    def prompts(held_out):
        return [toy_world.PROMPT_TEMPLATE.format(occupation=o) for o in toy_world.split(held_out)]

    evals = {"debiased": prompts(False), "held_out": prompts(True)}
    return folder, classify, params, [cue_features], [params], prompts(False), evals


def build_components(cfg: ConfigDict) -> Components:
    """Load and assemble the frozen pieces of a run described by ``cfg``."""
    names = attribute_names(cfg)
    if not names:
        raise FairdiffError("the config has no attributes; add e.g. config.attributes.gender = attribute('gender')")
    is_toy = cfg.model.path == TOY_MODEL_PATH
    if is_toy:
        folder, classifier, cls_params, feature_fns, feature_params, train_prompts, evals = _toy_pieces(cfg, names)
        components = ("unet", "text_encoder", "tokenizer", "scheduler")
    else:
        folder = cfg.model.path
        classifier, cls_params = _load_classifier(cfg, names)
        feature_fns, feature_params = _load_features(cfg)
        components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    if not is_toy or tuple(cfg.data.prompts) != (TOY_PROMPTS,):
        train_prompts = load_prompts(tuple(cfg.data.prompts), split="train", template=cfg.data.template)
        evals = {"test": load_prompts(tuple(cfg.data.prompts), split="test", template=cfg.data.template)}
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    sd = load_stable_diffusion(folder, dtype=dtype, components=components, variant=cfg.model.variant or None)
    spec = _adaptor_spec(cfg, folder, sd.unet_params, sd.text_encoder_params)
    tokenizer, text_encoder = sd.tokenizer, sd.text_encoder
    if spec.num_soft_tokens:
        vocab_rows = adaptors.soft_tokens.token_embedding(sd.text_encoder_params).shape[0]
        tokenizer, _ = adaptors.add_soft_tokens(tokenizer, spec.num_soft_tokens, spec.soft_token, vocab_size=vocab_rows)
        text_encoder = adaptors.grow_text_encoder(sd.text_encoder, spec.num_soft_tokens)
    return Components(
        cfg=cfg,
        model_path=folder,
        unet=sd.unet,
        unet_params=sd.unet_params,
        text_encoder=text_encoder,
        text_encoder_params=sd.text_encoder_params,
        tokenizer=tokenizer,
        vae=sd.vae,
        vae_params=sd.vae_params,
        vae_scaling_factor=sd.vae_scaling_factor,
        schedule=sampling.make_schedule(sd.scheduler),
        spec=spec,
        attributes=names,
        num_classes={n: len(cfg.attributes[n].classes) for n in names},
        targets={n: np.asarray(cfg.attributes[n].target, np.float32) for n in names},
        classifier=classifier,
        classifier_params=cls_params,
        feature_fns=feature_fns,
        feature_params=feature_params,
        train_prompts=list(train_prompts),
        eval_prompts={k: list(v) for k, v in evals.items()},
    )


def _load_classifier(cfg: ConfigDict, names: Sequence[str]):
    """The attribute classifiers of ``attributes.<name>.classifier`` (folders written by ``save_classifier``).

    Facial attributes (``attributes.<name>.facial``) classify the largest face found by ``faces.detector``; images
    without a face are invalid. The other attributes, and every attribute when the detector is "none", see the
    whole image."""
    from fairdiff_jax.attributes import load_attribute_classifiers
    from fairdiff_jax.attributes.detectors import detector_from_config

    paths = {n: cfg.attributes[n].classifier for n in names}
    missing = [n for n, p in paths.items() if not p]
    if missing:
        raise FairdiffError(
            f"no classifier for attribute(s) {missing}; set --config.attributes.<name>.classifier=FOLDER (a folder "
            "written by fairdiff_jax.attributes.save_classifier or import_torchvision_classifier)"
        )
    detector = detector_from_config(cfg.faces) if "faces" in cfg else None
    if detector is None:
        groups = [(paths, None)]
    else:
        facial = {n: p for n, p in paths.items() if cfg.attributes[n].facial}
        other = {n: p for n, p in paths.items() if not cfg.attributes[n].facial}
        groups = [(group, d) for group, d in ((facial, detector), (other, None)) if group]
    parts = [load_attribute_classifiers(group, detector=d) for group, d in groups]
    classifiers = tuple(classifier for classifier, _ in parts)

    def classify(p, images):
        logits, valid = {}, jnp.ones((images.shape[0],), bool)
        for classifier, part_params in zip(classifiers, p):
            out = classifier(part_params, images)
            logits.update(out.logits)
            valid = valid & out.valid
        return {n: logits[n] for n in names}, valid

    return classify, tuple(params for _, params in parts)


def _load_features(cfg: ConfigDict):
    from fairdiff_jax.attributes import load_clip_image_encoder, load_dinov2_encoder

    fns, params = [], []
    for path, loader in ((cfg.loss.clip_path, load_clip_image_encoder), (cfg.loss.dino_path, load_dinov2_encoder)):
        if path:
            encoder = loader(path)
            fns.append(lambda p, images, encoder=encoder: encoder(p, images))
            params.append(encoder.params)
    return fns, params


# ------------------------------------------------------------------------------------------- generation


def tokenize(comp: Components, prompts: Sequence[str], *, soft_tokens: bool) -> np.ndarray:
    """Token ids ``[P, L]``; with ``soft_tokens`` the adaptor's tokens are prepended to each prompt."""
    if soft_tokens and comp.spec.num_soft_tokens:
        return np.asarray(
            adaptors.conditional_prompt_ids(
                comp.tokenizer, list(prompts), comp.spec.soft_token, comp.spec.num_soft_tokens
            )
        )
    return np.asarray(adaptors.prompt_ids(comp.tokenizer, list(prompts), max_length=comp.max_length))


def embed(comp: Components, text_encoder_params, ids: jax.Array) -> jax.Array:
    """Text-encoder hidden states ``[P, L, D]`` for token ids ``[P, L]``.

    With soft tokens the module's table is grown; the frozen base parameters (the original model: x_ori, the
    "before" evaluation) get zero rows appended, which plain ids never index, so they give the base encoder's output.
    """
    if comp.spec.num_soft_tokens:
        table = adaptors.soft_tokens.token_embedding(text_encoder_params)
        missing = int(comp.text_encoder.config.vocab_size) - table.shape[0]
        if missing > 0:
            zeros = jnp.zeros((missing, table.shape[1]), table.dtype)
            text_encoder_params = adaptors.soft_tokens.apply_soft_tokens(text_encoder_params, zeros)
    return comp.text_encoder(ids, params=text_encoder_params).last_hidden_state


def generate_images(
    comp: Components,
    unet_params,
    cond: jax.Array,
    uncond: jax.Array,
    noise: jax.Array,
    num_steps,
    *,
    max_steps: int,
    gradient_mode: str = "adjusted",
) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [-1, 1] from noise ``[B, C, h, w]`` and conditioning ``[B, L, D]``."""
    cfg = comp.cfg.sampler
    latents = sampling.sample_latents(
        sampling.unet_apply_fn(comp.unet),
        unet_params,
        noise,
        cond,
        uncond,
        num_steps,
        comp.schedule,
        max_steps=max_steps,
        solver=cfg.solver,
        guidance_scale=float(cfg.guidance_scale),
        gradient_mode=gradient_mode,
        remat_policy=cfg.remat_policy,
        unroll=cfg.unroll,
    )
    if comp.vae is None:  # pixel space: the samples are the images
        return jnp.clip(jnp.transpose(latents, (0, 2, 3, 1)), -1.0, 1.0)
    return sampling.decode_latents(comp.vae, comp.vae_params, latents, comp.vae_scaling_factor)


def latent_shape(comp: Components) -> tuple[int, int, int]:
    """``(C, h, w)`` of the U-Net's input."""
    config = comp.unet.config if hasattr(comp.unet, "config") else comp.unet
    size = int(config.sample_size)
    return int(config.in_channels), size, size
