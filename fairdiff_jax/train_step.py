"""One training iteration of the paper's method, written once per device with ``data``-axis collectives.

For each prompt, N fresh noises and one random step count: the frozen original model generates ``x_ori``
(no gradient) for the regularisers; the adapted model generates ``x`` through the adjusted DFT; the
classifier's outputs of the prompt's images on *all* devices give the dynamic OT targets; the total loss
``L_align + λ_img L_img + λ_face L_face`` (:func:`total_loss`; L_img's gradient damped by factor2 inside the face
boxes, when the run has face terms) is back-propagated into the adaptor only; gradients are
``pmean``-ed; AdamW and the EMA update follow. A non-finite loss or gradient leaves the state untouched and is
counted. Every part is a module-level function of explicit inputs: the static :class:`StepModel`, the trainable
state, the frozen weights (one pytree) and the :class:`Batch`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fairdiff_jax.adaptors import ema_update
from fairdiff_jax.adaptors.spec import AdaptorSpec
from fairdiff_jax.adaptors.transform import adapt_weights, init_adaptor, project_adaptor
from fairdiff_jax.alignment import alignment_cross_entropy, distributional_alignment_grouped
from fairdiff_jax.alignment.semantic import mismatch_factor, semantic_loss
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.face_terms import FaceTerms
from fairdiff_jax.generation import Pipeline, SamplerSettings, embed, generate_images
from fairdiff_jax.metrics import bias_from_freq
from fairdiff_jax.parallel import AXIS, pmean


class TrainState(NamedTuple):
    """Everything that changes during training (replicated on every device)."""

    params: Any  # adaptor parameters
    ema: Any  # their exponential moving average (what is exported)
    opt_state: Any
    skipped: jax.Array  # number of updates refused for a non-finite loss or gradient
    ema_updates: jax.Array  # number of EMA updates so far (finite steps), for the EMA warm-up


class Batch(NamedTuple):
    """One iteration's inputs. ``noise`` is sharded on its leading (image) axis; the rest is replicated."""

    noise: jax.Array  # [N, P, C, h, w], image-major
    cond_ids: jax.Array  # [P, L] prompt ids (with soft tokens when the adaptor has them)
    plain_ids: jax.Array  # [P, L'] prompt ids for the original model
    uncond_ids: jax.Array  # [1, L] ids of "" (as long as cond_ids)
    plain_uncond_ids: jax.Array  # [1, L'] ids of "" (as long as plain_ids; L' = L unless prompt_padding="prompt")
    num_steps: jax.Array  # int32 scalar, the iteration's step count
    key: jax.Array  # PRNG key for the sampled transport


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The loss of ``config.loss`` / ``config.attributes`` and the gradient micro-batch of ``config.train``."""

    lambda_img: float
    confidence: float
    num_ot_samples: int
    factor1: tuple  # ((attribute, weight of L_img where its target differs from the original's class), ...)
    microbatch: int  # images per gradient chunk; 0 = all at once
    cost_weights: tuple = ()  # ((attribute, [K][K] transport-cost weights), ...) for the weighted attributes
    ema_warmup: bool = False  # diffusers' EMAModel warm-up of the EMA decay (adaptor.ema_warmup)

    @classmethod
    def from_config(cls, cfg) -> LossSettings:
        return cls(
            lambda_img=float(cfg.loss.lambda_img),
            confidence=float(cfg.loss.confidence),
            num_ot_samples=int(cfg.loss.num_ot_samples),
            factor1=tuple((n, float(cfg.attributes[n].factor1)) for n in sorted(cfg.attributes)),
            microbatch=int(cfg.train.microbatch),
            cost_weights=tuple(
                (n, tuple(tuple(row) for row in cfg.attributes[n].cost_weights))
                for n in sorted(cfg.attributes)
                if tuple(cfg.attributes[n].cost_weights)
            ),
            ema_warmup=bool(cfg.adaptor.ema_warmup),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class StepModel:
    """The static pieces of a step: modules, sampler, adaptor spec, scorers, task and loss settings."""

    pipeline: Pipeline
    sampler: SamplerSettings
    spec: AdaptorSpec
    classifier: Any  # (params, images) -> (logits {attr: [B,K]}, valid [B])
    feature_fns: tuple  # (params, images) -> [B, D], the semantic extractors of L_img
    num_classes: dict
    targets: dict  # attribute -> [K] target distribution
    loss: LossSettings
    face: FaceTerms | None = None  # L_face and factor2 (fairdiff_jax.face_terms); None = off

    @property
    def use_img(self) -> bool:
        return bool(self.feature_fns) and self.loss.lambda_img > 0

    @property
    def use_face(self) -> bool:
        return self.face is not None and self.face.use_face


class Originals(NamedTuple):
    """The frozen model's side of an iteration: images ``[R, H, W, 3]``, the classifier's predictions ``{a: [R]}``
    and probabilities ``{a: [R, K]}``, and, with face terms, the faces found in the images (else None)."""

    images: jax.Array
    pred: dict
    probs: dict
    detections: Any = None


def step_model(run, cfg, face: FaceTerms | None = None) -> StepModel:
    """The :class:`StepModel` of a :class:`fairdiff_jax.run.Run` and its config; ``face`` from
    :func:`fairdiff_jax.face_terms.build_face_terms` (its weights in ``frozen["face"]``)."""
    return StepModel(
        pipeline=run.pipeline,
        sampler=SamplerSettings.from_config(cfg.sampler),
        spec=run.spec,
        classifier=run.classifier,
        feature_fns=tuple(run.feature_fns),
        num_classes=dict(run.task.num_classes),
        targets={n: jnp.asarray(t) for n, t in run.task.targets.items()},
        loss=LossSettings.from_config(cfg),
        face=face,
    )


def init_state(spec: AdaptorSpec, frozen: dict, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """The state at step 0; the EMA gets its own buffers (the state is donated to the step)."""
    params = init_adaptor(key, spec, frozen["unet"], frozen["text_encoder"])
    ema = jax.tree.map(jnp.copy, params)
    return TrainState(params, ema, optimizer.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def check_microbatch(microbatch: int, local_images: int) -> None:
    """The micro-batch must be 0 or divide the images one device generates per step (one line otherwise)."""
    if microbatch < 0 or (microbatch and local_images % microbatch):
        raise FairdiffError(
            f"train.microbatch={microbatch} must be 0 (all images in one pass) or divide the {local_images} images "
            "each device generates per step (images_per_prompt / devices x prompts_per_step)"
        )


def all_finite(tree: Any) -> jax.Array:
    """True when every entry of every leaf is finite (usable inside jit)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite`` else ``old``, leaf by leaf: refuse a non-finite update inside jit."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def _group(x: jax.Array, n: int, p: int) -> jax.Array:
    """``[n*P, ...]`` image-major rows -> ``[P, n, ...]`` prompt groups."""
    return jnp.swapaxes(x.reshape((n, p) + x.shape[1:]), 0, 1)


def _ungroup(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_group`."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def _predictions(logits) -> dict:
    return {name: jnp.argmax(value, axis=-1) for name, value in logits.items()}


def original_images(model: StepModel, frozen: dict, batch: Batch, noise: jax.Array) -> jax.Array:
    """``x_ori`` ``[n*P, H, W, 3]``: the frozen original model, same noise and step count, no gradient."""
    n = batch.noise.shape[0]
    cond = jnp.tile(embed(model.pipeline, frozen["text_encoder"], batch.plain_ids), (n, 1, 1))
    uncond = embed(model.pipeline, frozen["text_encoder"], batch.plain_uncond_ids)
    images = generate_images(
        model.pipeline,
        model.sampler,
        frozen["unet"],
        frozen["vae"],
        cond,
        uncond,
        noise,
        batch.num_steps,
        max_steps=model.sampler.max_train_steps,
        gradient_mode="detached",
    )
    return jax.lax.stop_gradient(images)


def adapted_images(
    model: StepModel, params, frozen: dict, batch: Batch, rows_noise, rows_prompt, gradient_mode: str, **chain
):
    """Images ``[R, H, W, 3]`` of the adapted model for noise rows ``[R, C, h, w]`` and their prompt indices ``[R]``
    (``chain``: ``record`` / ``replay`` of :func:`fairdiff_jax.generation.generate_images`)."""
    unet_params, te_params, branches = adapt_weights(model.spec, params, frozen["unet"], frozen["text_encoder"])
    cond = embed(model.pipeline, te_params, batch.cond_ids, branch=branches.get("text_encoder"))[rows_prompt]
    uncond = embed(model.pipeline, te_params, batch.uncond_ids, branch=branches.get("text_encoder"))
    return generate_images(
        model.pipeline,
        model.sampler,
        unet_params,
        frozen["vae"],
        cond,
        uncond,
        rows_noise,
        batch.num_steps,
        max_steps=model.sampler.max_train_steps,
        gradient_mode=gradient_mode,
        unet_branch=branches.get("unet"),
        **chain,
    )


def group_targets(model: StepModel, logits: dict, valid: jax.Array, batch: Batch, axis_name):
    """Dynamic targets per prompt group (over all devices) for image-major rows: ``(alignment, labels {a: [n*P]})``."""
    n, num_prompts = batch.noise.shape[:2]
    align = distributional_alignment_grouped(
        {k: _group(v, n, num_prompts) for k, v in logits.items()},
        _group(valid, n, num_prompts),
        model.targets,
        key=batch.key,
        num_samples=model.loss.num_ot_samples,
        confidence=model.loss.confidence,
        axis_name=axis_name,
        cost_weights={n: jnp.asarray(w, jnp.float32) for n, w in model.loss.cost_weights},
    )
    return align, {k: _ungroup(v) for k, v in align.labels.items()}


def semantic_weights(model: StepModel, labels: dict, ori_pred: dict, valid: jax.Array) -> jax.Array:
    """Per-image factor1 ``[B]`` as the paper's authors choose it (:func:`alignment.semantic.mismatch_factor`);
    ``ori_pred`` holds the original image's classes, −1 where it has no face."""
    return mismatch_factor(labels, ori_pred, valid, dict(model.loss.factor1))


def detect_faces(model: StepModel, images):
    """The faces of ``images`` when the run has face terms (host detection, no gradient), else None."""
    return model.face.detect(images) if model.face is not None else None


def classify(model: StepModel, frozen: dict, images, detections):
    """``(logits, valid)``; with ``detections`` the classifier crops those faces instead of detecting again."""
    if detections is None:
        return model.classifier(frozen["classifier"], images)
    return model.classifier(frozen["classifier"], images, detections=detections)


def originals(model: StepModel, frozen: dict, x_ori) -> Originals:
    """Classify (and detect the faces of) the frozen model's images; predictions are −1 where no face was found."""
    detections = detect_faces(model, x_ori)
    logits, valid = classify(model, frozen, x_ori, detections)
    probs = {k: jax.nn.softmax(v.astype(jnp.float32), -1) for k, v in logits.items()}
    pred = {k: jnp.where(valid, v, -1) for k, v in _predictions(logits).items()}
    return Originals(x_ori, pred, probs, detections)


def damp_face_boxes(model: StepModel, images, detections, ori: Originals, labels):
    """``images`` with factor2's damping of L_img's gradient inside the face boxes (unchanged when it is off)."""
    if model.face is None:
        return images
    return model.face.damp(images, detections, ori.detections, labels, ori.pred)


def face_term(model: StepModel, frozen: dict, images, detections, ori: Originals, labels, total_images: int):
    """L_face of these images (before λ_face) as their share of the mean over ``total_images`` (0 when off)."""
    if not model.use_face:
        return jnp.zeros((), jnp.float32)
    per_image = model.face.per_image_loss(
        frozen["face"], images, detections, ori.images, ori.detections, labels, ori.probs
    )
    return per_image.sum() / total_images


def semantic_term(model: StepModel, frozen: dict, images, x_ori, weights) -> jax.Array:
    """L_img of these images: the weighted mean over them of Σ_e (1 − cos(e(x), e(x_ori))) (0 when off)."""
    if not model.use_img:
        return jnp.zeros((), jnp.float32)
    extractors = [(lambda x, fn=fn, p=p: fn(p, x)) for fn, p in zip(model.feature_fns, frozen["features"])]
    value, _ = semantic_loss(images, x_ori, extractors, weights=weights)
    return value


def total_loss(model: StepModel, align: jax.Array, img: jax.Array, face: jax.Array | float = 0.0) -> jax.Array:
    """The one objective: ``L_align + λ_img · L_img + λ_face · L_face``."""
    loss = align + model.loss.lambda_img * img if model.use_img else align
    return loss + model.face.lambda_face * face if model.use_face else loss


def one_pass_value_and_grad(model, params, frozen, batch, noise, prompt_of, ori: Originals, axis_name):
    """``(loss, aux, grads)`` with every image of the device in one backward pass."""

    def loss_fn(params):
        images = adapted_images(model, params, frozen, batch, noise, prompt_of, model.sampler.gradient_mode)
        detections = detect_faces(model, images)
        logits, valid = classify(model, frozen, images, detections)
        align, labels = group_targets(model, logits, valid, batch, axis_name)
        weights = semantic_weights(model, labels, ori.pred, valid)
        damped = damp_face_boxes(model, images, detections, ori, labels)
        img = semantic_term(model, frozen, damped, ori.images, weights)
        face = face_term(model, frozen, images, detections, ori, labels, images.shape[0])
        aux = {"labels": labels, "pred": _predictions(logits), "valid": valid, "align": align.loss, "img": img}
        return total_loss(model, align.loss, img, face), {**aux, "face": face}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, aux, grads


def microbatched_value_and_grad(model, params, frozen, batch, noise, prompt_of, ori: Originals, axis_name):
    """Two passes: targets (and faces) from all images without gradient, then the gradient ``microbatch`` images at
    a time (a ``lax.scan``), so the backward pass holds one chunk. Equal to the one-pass gradient.

    In the ``adjusted`` and ``detached`` modes the first pass records its chains (every step's U-Net input and
    output, ``N x steps x 2`` latents) and the chunks replay them: their U-Net runs only in the backward pass, so
    the chain is not generated twice. ``exact`` differentiates through the U-Net inputs and generates again. Either
    way the chunks' images equal the first pass's, so the faces found there are theirs.
    """
    total_images = noise.shape[0]
    chunk = model.loss.microbatch
    mode = model.sampler.gradient_mode
    replay = mode != "exact"
    images = adapted_images(model, params, frozen, batch, noise, prompt_of, "detached", record=replay)
    images, trajectory = jax.lax.stop_gradient(images if replay else (images, None))
    detections = detect_faces(model, images)
    logits, valid = classify(model, frozen, images, detections)
    _, labels = group_targets(model, logits, valid, batch, axis_name)
    weights = semantic_weights(model, labels, ori.pred, valid)

    def chunk_loss(params, rows_noise, rows_prompt, rows_ori, rows_labels, rows_weights, rows_detections, rows_traj):
        rows_images = adapted_images(model, params, frozen, batch, rows_noise, rows_prompt, mode, replay=rows_traj)
        rows_logits, _ = classify(model, frozen, rows_images, rows_detections)
        align = sum(alignment_cross_entropy(rows_logits[k], rows_labels[k], total_images) for k in rows_labels)
        damped = damp_face_boxes(model, rows_images, rows_detections, rows_ori, rows_labels)
        img = semantic_term(model, frozen, damped, rows_ori.images, rows_weights) * (chunk / total_images)
        face = face_term(model, frozen, rows_images, rows_detections, rows_ori, rows_labels, total_images)
        return total_loss(model, align, img, face), (align, img, face)

    def chunks(x):
        return x.reshape((total_images // chunk, chunk) + x.shape[1:])

    def accumulate(carry, rows):
        (loss, terms), grads = jax.value_and_grad(chunk_loss, has_aux=True)(params, *rows)
        return jax.tree.map(jnp.add, carry, (loss, *terms, grads)), None

    zeros = (jnp.zeros(()),) * 4 + (jax.tree.map(jnp.zeros_like, params),)
    rows = (chunks(noise), chunks(prompt_of), jax.tree.map(chunks, ori), jax.tree.map(chunks, labels))
    rows += (chunks(weights), jax.tree.map(chunks, detections), jax.tree.map(chunks, trajectory))
    (loss, align, img, face, grads), _ = jax.lax.scan(accumulate, zeros, rows)
    aux = {"labels": labels, "pred": _predictions(logits), "valid": valid, "align": align, "img": img, "face": face}
    return loss, aux, grads


def apply_update(model: StepModel, optimizer, state: TrainState, grads, loss) -> tuple[TrainState, dict]:
    """AdamW (then COFT's projection, for a constrained OFT) and EMA, unless the loss, the gradient or the update is
    non-finite (the state is then kept and counted)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = project_adaptor(model.spec, optax.apply_updates(state.params, updates))  # COFT's constraint
    update_norm = optax.global_norm(updates)
    # an overflowing update norm or parameter norm (|x| beyond ~1e19) counts as non-finite: such a step has blown up
    finite = (
        all_finite(grads) & jnp.isfinite(loss) & jnp.isfinite(update_norm) & jnp.isfinite(optax.global_norm(params))
    )
    count = state.ema_updates + 1 if model.loss.ema_warmup else None  # this update's number, as EMAModel counts
    ema = ema_update(state.ema, params, model.spec.ema_decay, update_count=count)
    new_state = TrainState(
        *keep_if_finite(finite, (params, ema, opt_state), (state.params, state.ema, state.opt_state)),
        state.skipped + (~finite).astype(jnp.int32),
        state.ema_updates + finite.astype(jnp.int32),
    )
    return new_state, {"finite": finite, "update_norm": update_norm}


def attribute_metrics(model: StepModel, aux: dict, reduce) -> dict:
    """Per attribute: predicted class frequencies over all devices, their bias, the share with a confident target."""
    metrics = {}
    valid = aux["valid"].astype(jnp.float32)
    for name, pred in aux["pred"].items():
        counts = reduce(jnp.sum(jax.nn.one_hot(pred, model.num_classes[name]) * valid[:, None], axis=0))
        freq = counts / jnp.maximum(counts.sum(), 1.0)
        metrics[f"freq/{name}"] = freq
        metrics[f"bias/{name}"] = bias_from_freq(freq)
        metrics[f"confident/{name}"] = reduce(jnp.mean((aux["labels"][name] >= 0).astype(jnp.float32)))
    return metrics


def train_step(state: TrainState, frozen: dict, batch: Batch, *, model: StepModel, optimizer, axis_name=AXIS):
    """One iteration on this device: ``(state, frozen, batch) -> (state, metrics)``; ``axis_name=None`` runs
    unsharded (the reference for the parallel tests)."""
    reduce = (lambda tree: pmean(tree, axis_name)) if axis_name else (lambda tree: tree)
    n, num_prompts = batch.noise.shape[:2]
    noise = batch.noise.reshape((n * num_prompts,) + batch.noise.shape[2:])
    prompt_of = jnp.arange(n * num_prompts) % num_prompts  # the prompt of each image-major row
    ori = originals(model, frozen, original_images(model, frozen, batch, noise))
    value_and_grad = microbatched_value_and_grad if model.loss.microbatch else one_pass_value_and_grad
    loss, aux, grads = value_and_grad(model, state.params, frozen, batch, noise, prompt_of, ori, axis_name)
    grads, loss = reduce(grads), reduce(loss)
    new_state, update = apply_update(model, optimizer, state, grads, loss)
    metrics = {
        "loss": loss,
        "loss_align": reduce(aux["align"]),
        "loss_img": reduce(aux["img"]),
        "loss_face": reduce(aux["face"]),
        "grad_norm": optax.global_norm(grads),
        "update_norm": update["update_norm"],
        "skipped": new_state.skipped,
        "finite": update["finite"],
        "num_steps": batch.num_steps,
    }
    metrics.update(attribute_metrics(model, aux, reduce))
    return new_state, metrics


def make_train_step(model: StepModel, optimizer: optax.GradientTransformation, *, axis_name=AXIS):
    """``train_step`` with its static arguments bound: ``(state, frozen, batch) -> (state, metrics)``."""
    return functools.partial(train_step, model=model, optimizer=optimizer, axis_name=axis_name)
