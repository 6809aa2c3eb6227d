"""Checks of a loaded config: one line naming the bad value, what is allowed and the fix.

Every list of allowed values is imported from the module that implements it, so a new solver, remat policy,
adaptor kind or detector is accepted as soon as it exists. Rules that need facts the config does not hold (the
device count for the micro-batch, the model folder's contents) are checked where those facts are known.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ml_collections import ConfigDict

from fairdiff_jax.errors import FairdiffError


def _choice(cfg: ConfigDict, key: str, allowed: Sequence[str]) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if value not in allowed:
        raise FairdiffError(f"config {key}='{value}' is not allowed; choose one of {', '.join(allowed)}")


def check_path(key: str, path: str, what: str) -> None:
    """A configured file or folder that must exist when set."""
    if path and not os.path.exists(os.path.expanduser(path)):
        raise FairdiffError(f"config {key}: {what} '{path}' does not exist; set --config.{key}=/path/to/it")


def validate_target(name: str, target: Sequence[float], classes: Sequence[str]) -> None:
    """One attribute's target distribution: non-negative, sums to 1 (+-1e-6), one entry per class."""
    target = tuple(target)
    where = f"attributes.{name}.target={target}"
    if len(target) != len(classes):
        raise FairdiffError(
            f"{where} has {len(target)} entries but {name} has {len(classes)} classes {tuple(classes)}; "
            f"give one probability per class"
        )
    if any(not math.isfinite(t) or t < 0 for t in target):
        raise FairdiffError(f"{where} has a negative or non-finite entry; probabilities must be >= 0")
    if abs(sum(target) - 1.0) > 1e-6:
        raise FairdiffError(f"{where} sums to {sum(target):.6g}, not 1; give class probabilities that sum to 1")


def _check_choices(cfg: ConfigDict) -> None:
    from fairdiff_jax import optim, parallel, sampling, schedules
    from fairdiff_jax.adaptors.soft_tokens import PROMPT_PADDINGS
    from fairdiff_jax.adaptors.spec import ADAPTOR_KINDS
    from fairdiff_jax.attributes.detectors import FACE_DETECTORS
    from fairdiff_jax.models.attention import ATTENTION_IMPLEMENTATIONS
    from fairdiff_jax.models.loader import DTYPES

    _choice(cfg, "adaptor.kind", ADAPTOR_KINDS)
    _choice(cfg, "model.dtype", tuple(DTYPES))
    _choice(cfg, "model.attention", ATTENTION_IMPLEMENTATIONS)
    _choice(cfg, "sampler.solver", schedules.SOLVERS)
    _choice(cfg, "sampler.gradient_mode", sampling.GRADIENT_MODES)
    _choice(cfg, "sampler.remat_policy", sampling.REMAT_POLICIES)
    _choice(cfg, "sampler.timestep_spacing", ("", *schedules.TIMESTEP_SPACINGS))
    _choice(cfg, "sampler.final_sigmas_type", schedules.FINAL_SIGMAS_TYPES)
    _choice(cfg, "data.prompt_padding", PROMPT_PADDINGS)
    _choice(cfg, "parallel.mode", parallel.MODES)
    _choice(cfg, "train.lr_schedule", optim.LR_SCHEDULES)
    _choice(cfg, "faces.detector", FACE_DETECTORS)


def _check_ranges(cfg: ConfigDict) -> None:
    faces = cfg.faces
    if faces.min_face_size < 1 or faces.min_neighbors < 0 or not 0.0 <= faces.score_threshold <= 1.0:
        raise FairdiffError(
            f"faces.min_face_size={faces.min_face_size} must be >= 1, faces.min_neighbors={faces.min_neighbors} "
            f">= 0 and faces.score_threshold={faces.score_threshold} in [0, 1]"
        )
    if not math.isfinite(cfg.train.lr) or cfg.train.lr <= 0:
        raise FairdiffError(f"train.lr={cfg.train.lr} must be a positive number (the paper's is 5e-5)")
    if int(cfg.train.max_skipped_in_a_row) < 1:
        raise FairdiffError(f"train.max_skipped_in_a_row={cfg.train.max_skipped_in_a_row} must be >= 1")
    if not 0.0 <= cfg.train.final_lr_fraction <= 1.0:
        raise FairdiffError(f"train.final_lr_fraction={cfg.train.final_lr_fraction} must lie in [0, 1]")
    if int(cfg.sampler.unroll) < 1:
        raise FairdiffError(f"sampler.unroll={cfg.sampler.unroll} must be >= 1 (1 = rolled loop; >= steps = unrolled)")
    lo_hi = tuple(cfg.sampler.train_steps)
    if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
        raise FairdiffError(f"sampler.train_steps={lo_hi} must be (min, max) with 1 <= min <= max, e.g. (19, 23)")
    if not cfg.loss.lambda_face >= 0.0:
        raise FairdiffError(f"loss.lambda_face={cfg.loss.lambda_face} must be >= 0 (0 turns the face-realism loss off)")
    for group, key in (("loss", "confidence"), ("loss", "face_keep_confidence"), ("adaptor", "ema_decay")):
        if not 0.0 <= cfg[group][key] <= 1.0:
            raise FairdiffError(f"config {group}.{key}={cfg[group][key]} must lie in [0, 1]")
    for key in ("num_steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every"):
        if int(cfg[key]) < 1:
            raise FairdiffError(f"config {key}={cfg[key]} must be a positive integer")
    for key in ("images_per_prompt", "prompts_per_step"):
        if int(cfg.train[key]) < 1:
            raise FairdiffError(f"config train.{key}={cfg.train[key]} must be a positive integer")
    if cfg.train.microbatch < 0:  # whether it divides the images of a device is checked by train(), which knows
        raise FairdiffError(f"train.microbatch={cfg.train.microbatch} must be 0 (all images at once) or positive")
    from fairdiff_jax.adaptors.oft import OFTSettings
    from fairdiff_jax.adaptors.spec import LORA_KINDS, OFT_KINDS

    if cfg.adaptor.kind in LORA_KINDS and cfg.adaptor.rank < 1:
        raise FairdiffError(f"adaptor.rank={cfg.adaptor.rank} must be >= 1 for LoRA adaptors")
    if cfg.adaptor.kind in OFT_KINDS:
        OFTSettings(**cfg.adaptor.oft.to_dict())  # one-line errors for a bad block layout or COFT radius


def _check_cost_weights(name: str, spec: ConfigDict) -> None:
    """``attributes.<name>.cost_weights``: empty, or K rows of K positive finite numbers."""
    weights = tuple(tuple(row) for row in spec.cost_weights)
    k = len(spec.classes)
    if weights and (
        len(weights) != k or any(len(row) != k or any(not math.isfinite(w) or w <= 0 for w in row) for row in weights)
    ):
        raise FairdiffError(
            f"attributes.{name}.cost_weights={weights} must be empty or {k} rows of {k} positive numbers (row: target "
            f"label, column: class), e.g. ((1, 1), (2, 1)) for the authors' age weighting"
        )


def validate_config(cfg: ConfigDict) -> None:
    """Raise ``FairdiffError`` with one line for the first bad value."""
    from fairdiff_jax.prompts import resolve_prompt_source
    from fairdiff_jax.worlds import validate_world

    _check_choices(cfg)
    if cfg.faces.detector == "yunet" and not cfg.faces.model_path:
        raise FairdiffError("faces.detector=yunet needs --config.faces.model_path=/path/to/face_yunet.onnx")
    check_path("faces.model_path", cfg.faces.model_path, "face detector model")
    _check_ranges(cfg)
    if not cfg.attributes:
        raise FairdiffError("config has no attributes; add attributes.<name> with classes and target")
    for name, spec in cfg.attributes.items():
        if len(spec.classes) < 2:
            raise FairdiffError(f"attributes.{name}.classes={tuple(spec.classes)} needs at least 2 classes")
        validate_target(name, spec.target, spec.classes)
        for factor in ("factor1", "factor2"):
            if not 0.0 <= spec[factor] <= 1.0:
                raise FairdiffError(f"attributes.{name}.{factor}={spec[factor]} must lie in [0, 1]")
        _check_cost_weights(name, spec)
        check_path(f"attributes.{name}.classifier", spec.classifier, "classifier")
        check_path(f"attributes.{name}.eval_classifier", spec.eval_classifier, "classifier")
    for key in ("clip_path", "dino_path", "face_embedder_path", "face_reference_path"):
        check_path(f"loss.{key}", cfg.loss[key], "file or folder")
    for source in [cfg.data.prompts] if isinstance(cfg.data.prompts, str) else cfg.data.prompts:
        resolve_prompt_source(source)
    validate_world(cfg)


def validate_face_training(cfg: ConfigDict) -> None:
    """Train-time checks of the face terms that need no model (one line each): L_face needs a reference set, and the
    world must detect faces with the landmarks the embedder needs (the world's ``check_training``)."""
    from fairdiff_jax.worlds import check_world_training

    check_world_training(cfg)
    if cfg.loss.lambda_face > 0 and not cfg.loss.face_reference_path:
        raise FairdiffError(
            f"loss.lambda_face={cfg.loss.lambda_face} needs a reference set of real faces: build one with `fairdiff "
            "faces build-reference --images DIR --classifier CLS --out FILE` and set "
            "--config.loss.face_reference_path=FILE (or --config.loss.lambda_face=0 to train without L_face)"
        )
