"""The built-in world: a Stable Diffusion folder in the diffusers layout, attribute classifiers from
``attributes.<name>.classifier`` and the semantic encoders of ``loss.clip_path`` / ``loss.dino_path``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp

from fairdiff_jax.config.schema import attribute_names
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.worlds import World, WorldPlugin, register_world

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def validate(cfg) -> None:
    if not os.path.isdir(os.path.expanduser(cfg.model.path)):
        raise FairdiffError(
            f"model folder '{cfg.model.path}' not found; set --config.model.path=/path/to/stable-diffusion-v1-5 "
            "(a diffusers-format folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )


def build(cfg) -> World:
    classifier, classifier_params = load_classifier(cfg, attribute_names(cfg))
    feature_fns, feature_params = load_features(cfg)
    return World(
        model_folder=cfg.model.path,
        components=COMPONENTS,
        classifier=classifier,
        classifier_params=classifier_params,
        feature_fns=tuple(feature_fns),
        feature_params=tuple(feature_params),
    )


def load_classifier(cfg, names: Sequence[str]):
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
    detector = detector_from_config(cfg.faces)
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


def load_features(cfg):
    """The semantic feature extractors of L_img: CLIP image features and DINOv2 CLS embeddings, when configured."""
    from fairdiff_jax.attributes import load_clip_image_encoder, load_dinov2_encoder

    fns, params = [], []
    for path, loader in ((cfg.loss.clip_path, load_clip_image_encoder), (cfg.loss.dino_path, load_dinov2_encoder)):
        if path:
            encoder = loader(path)
            fns.append(encoder.apply)  # (params, images) -> [B, D]
            params.append(encoder.params)
    return fns, params


register_world("stable_diffusion", WorldPlugin(build=build, validate=validate))
