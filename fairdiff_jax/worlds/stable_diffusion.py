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


def check_face_terms(cfg) -> None:
    """The face terms need a face detector, and L_face dlib's landmarks (one line each; before any model loads)."""
    from fairdiff_jax.attributes.dlib_detect import DLIB_DETECTORS
    from fairdiff_jax.face_terms import face_terms_requested

    detector = cfg.faces.detector
    if cfg.loss.lambda_face > 0 and detector not in DLIB_DETECTORS:
        raise FairdiffError(
            f"loss.lambda_face={cfg.loss.lambda_face} aligns faces by dlib's 5 landmarks, which faces.detector="
            f"'{detector}' does not give; set --config.faces.detector=dlib_cnn (the authors' detector) or dlib_hog"
        )
    if face_terms_requested(cfg) and detector == "none":
        damped = [f"attributes.{n}.factor2={cfg.attributes[n].factor2}" for n in attribute_names(cfg)]
        raise FairdiffError(
            f"{', '.join(d for d in damped if not d.endswith('=1.0'))}: factor2 damps L_img's gradient inside the face "
            "boxes, but faces.detector='none' finds no faces; set --config.faces.detector=dlib_cnn (or haar, yunet, "
            "dlib_hog), or --config.attributes.<name>.factor2=1"
        )


def build(cfg) -> World:
    classifier, classifier_params, detector = load_classifier(cfg, attribute_names(cfg))
    feature_fns, feature_params = load_features(cfg)
    return World(
        model_folder=cfg.model.path,
        components=COMPONENTS,
        classifier=classifier,
        classifier_params=classifier_params,
        feature_fns=tuple(feature_fns),
        feature_params=tuple(feature_params),
        face_detector=detector,
        face_box_expand=face_box_expand(cfg, attribute_names(cfg)),
    )


def face_box_expand(cfg, names: Sequence[str]) -> float:
    """How the facial classifiers expand the detected box into their square crop (the first facial one's)."""
    from fairdiff_jax.attributes.classifier_io import read_classifier_config

    for name in names:
        if cfg.attributes[name].facial and cfg.attributes[name].classifier:
            return float(read_classifier_config(cfg.attributes[name].classifier).crop_expand)
    return 1.0


def load_classifier(cfg, names: Sequence[str]):
    """``(classify, params, detector)``: the attribute classifiers of ``attributes.<name>.classifier`` (folders
    written by ``save_classifier``) as one ``classify(params, images, detections=None) -> (logits, valid)``, and the
    face detector of ``faces.detector`` (None for "none").

    Facial attributes (``attributes.<name>.facial``) classify the largest face found by ``faces.detector`` (or the
    ``detections`` given); images without a face are invalid. The other attributes, and every attribute when the
    detector is "none", see the whole image."""
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

    uses_detector = tuple(d is not None for _, d in groups)

    def classify(p, images, detections=None):
        logits, valid = {}, jnp.ones((images.shape[0],), bool)
        for classifier, part_params, facial in zip(classifiers, p, uses_detector):
            out = classifier(part_params, images, detections if facial else None)
            logits.update(out.logits)
            valid = valid & out.valid
        return {n: logits[n] for n in names}, valid

    return classify, tuple(params for _, params in parts), detector


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


register_world("stable_diffusion", WorldPlugin(build=build, validate=validate, check_training=check_face_terms))
