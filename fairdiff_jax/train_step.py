"""One training iteration of the paper's method, written once per device with ``data``-axis collectives.

For each prompt, N fresh noises and one random step count: the frozen original model generates ``x_ori``
(no gradient) for the regularisers; the adapted model generates ``x`` through the adjusted DFT; the
classifier's outputs of the prompt's images on *all* devices give the dynamic OT targets; the total loss
``L_align + λ_img L_img`` is back-propagated into the adaptor only; gradients are ``pmean``-ed; AdamW and
the EMA update follow. A non-finite loss or gradient leaves the state untouched and is counted.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fairdiff_jax import adaptors
from fairdiff_jax.alignment import (
    alignment_cross_entropy,
    distributional_alignment_grouped,
    semantic_loss,
    semantic_weights,
)
from fairdiff_jax.components import Components, embed, generate_images
from fairdiff_jax.metrics import all_finite, bias_from_freq, keep_if_finite
from fairdiff_jax.parallel import AXIS, pmean


class TrainState(NamedTuple):
    """Everything that changes during training (replicated on every device)."""

    params: Any  # adaptor parameters
    ema: Any  # their exponential moving average (what is exported)
    opt_state: Any
    skipped: jax.Array  # number of updates refused for a non-finite loss or gradient


class Batch(NamedTuple):
    """One iteration's inputs. ``noise`` is sharded on its leading (image) axis; the rest is replicated."""

    noise: jax.Array  # [N, P, C, h, w], image-major
    cond_ids: jax.Array  # [P, L] prompt ids (with soft tokens when the adaptor has them)
    plain_ids: jax.Array  # [P, L] prompt ids for the original model
    uncond_ids: jax.Array  # [1, L] ids of ""
    num_steps: jax.Array  # int32 scalar, the iteration's step count
    key: jax.Array  # PRNG key for the sampled transport


def learning_rate(cfg) -> optax.Schedule:
    """The paper's constant rate (DESIGN.md §1.3), or a cosine decay to ``lr * final_lr_fraction``."""
    lr = float(cfg.train.lr)
    if cfg.train.lr_schedule == "constant":
        return optax.constant_schedule(lr)
    return optax.cosine_decay_schedule(lr, int(cfg.num_steps), alpha=float(cfg.train.final_lr_fraction))


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with :func:`learning_rate`; the schedule counts the optimizer's own steps, so resumes continue it."""
    b1, b2 = (float(b) for b in cfg.train.betas)
    return optax.adamw(learning_rate(cfg), b1=b1, b2=b2, weight_decay=float(cfg.train.weight_decay))


def init_state(comp: Components, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    params = adaptors.init_adaptor(key, comp.spec, comp.unet_params, comp.text_encoder_params)
    ema = jax.tree.map(jnp.copy, params)  # its own buffers: the state is donated to the step
    return TrainState(params, ema, optimizer.init(params), jnp.zeros((), jnp.int32))


def _group(x: jax.Array, n: int, p: int) -> jax.Array:
    """``[n*P, ...]`` image-major rows -> ``[P, n, ...]`` prompt groups."""
    return jnp.swapaxes(x.reshape((n, p) + x.shape[1:]), 0, 1)


def _ungroup(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_group`."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def _predictions(logits) -> dict:
    return {name: jnp.argmax(value, axis=-1) for name, value in logits.items()}


def make_train_step(comp: Components, optimizer: optax.GradientTransformation, *, max_steps: int, axis_name=AXIS):
    """The per-device step ``(state, frozen, batch) -> (state, metrics)``.

    ``frozen`` is ``{"unet", "text_encoder", "classifier", "features"}`` (replicated); with
    ``axis_name=None`` the step runs unsharded on one device (the reference for the parallel tests).
    """
    cfg = comp.cfg
    spec = comp.spec
    loss_cfg = cfg.loss
    factor1 = min(float(cfg.attributes[n].factor1) for n in comp.attributes)
    targets = {n: jnp.asarray(t) for n, t in comp.targets.items()}
    mode = cfg.sampler.gradient_mode
    reduce = (lambda tree: pmean(tree, axis_name)) if axis_name else (lambda tree: tree)

    microbatch = int(cfg.train.microbatch)

    use_img = bool(comp.feature_fns) and float(loss_cfg.lambda_img) > 0

    def extractors_of(frozen):
        return [(lambda images, fn=fn, p=p: fn(p, images)) for fn, p in zip(comp.feature_fns, frozen["features"])]

    def adapted_images(params, frozen, batch, rows_noise, rows_prompt, gradient_mode):
        """Images ``[R, H, W, 3]`` of the adapted model for noise rows and their prompt indices ``[R]``."""
        unet_params, te_params = adaptors.apply_adaptor(spec, params, frozen["unet"], frozen["text_encoder"])
        cond = embed(comp, te_params, batch.cond_ids)[rows_prompt]
        uncond = embed(comp, te_params, batch.uncond_ids)
        return generate_images(
            comp,
            unet_params,
            cond,
            uncond,
            rows_noise,
            batch.num_steps,
            max_steps=max_steps,
            gradient_mode=gradient_mode,
        )

    def aligned_targets(logits, valid, batch):
        """Dynamic targets per prompt group (over all devices) for image-major rows; returns (align, labels)."""
        n, num_prompts = batch.noise.shape[:2]
        align = distributional_alignment_grouped(
            {k: _group(v, n, num_prompts) for k, v in logits.items()},
            _group(valid, n, num_prompts),
            targets,
            key=batch.key,
            num_samples=int(loss_cfg.num_ot_samples),
            confidence=float(loss_cfg.confidence),
            axis_name=axis_name,
        )
        return align, {k: _ungroup(v) for k, v in align.labels.items()}

    def microbatched_value_and_grad(params, frozen, batch, noise, prompt_of, x_ori, ori_pred):
        """Two passes: targets from all images without gradient, then the gradient ``microbatch`` images at a
        time (a ``lax.scan``), so the backward pass holds one chunk. Equal to the one-pass gradient."""
        n, num_prompts = batch.noise.shape[:2]
        total_images = n * num_prompts
        if total_images % microbatch:
            raise ValueError(f"train.microbatch={microbatch} must divide the {total_images} images on a device")

        images = jax.lax.stop_gradient(adapted_images(params, frozen, batch, noise, prompt_of, "detached"))
        logits, valid = comp.classifier(frozen["classifier"], images)
        _, labels = aligned_targets(logits, valid, batch)
        weights = semantic_weights(labels, ori_pred, factor1)

        def chunk_loss(params, rows_noise, rows_prompt, rows_x_ori, rows_labels, rows_weights):
            chunk_images = adapted_images(params, frozen, batch, rows_noise, rows_prompt, mode)
            chunk_logits, _ = comp.classifier(frozen["classifier"], chunk_images)
            ce = sum(alignment_cross_entropy(chunk_logits[k], rows_labels[k], total_images) for k in rows_labels)
            img = jnp.zeros((), jnp.float32)
            if use_img:
                _, per_image = semantic_loss(chunk_images, rows_x_ori, extractors_of(frozen))
                img = jnp.sum(rows_weights * per_image) / total_images
            return ce + float(loss_cfg.lambda_img) * img, (ce, img)

        def chunks(x):
            return x.reshape((total_images // microbatch, microbatch) + x.shape[1:])

        def accumulate(carry, rows):
            (loss, (ce, img)), grads = jax.value_and_grad(chunk_loss, has_aux=True)(params, *rows)
            return jax.tree.map(jnp.add, carry, (loss, ce, img, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        rows = (chunks(noise), chunks(prompt_of), chunks(x_ori), jax.tree.map(chunks, labels), chunks(weights))
        (loss, ce, img, grads), _ = jax.lax.scan(accumulate, zeros, rows)
        aux = {"labels": labels, "pred": _predictions(logits), "valid": valid, "align": ce, "img": img}
        return loss, aux, grads

    def step(state: TrainState, frozen: dict, batch: Batch):
        n, num_prompts = batch.noise.shape[:2]
        noise = batch.noise.reshape((n * num_prompts,) + batch.noise.shape[2:])
        prompt_of = jnp.arange(n * num_prompts) % num_prompts  # the prompt of each image-major row

        def tile(emb):  # [P, L, D] -> [n*P, L, D], image-major like the noise
            return jnp.tile(emb, (n, 1, 1))

        # the frozen original model, same noise and step count, no gradient
        cond0 = embed(comp, frozen["text_encoder"], batch.plain_ids)
        uncond0 = embed(comp, frozen["text_encoder"], batch.uncond_ids)
        x_ori = jax.lax.stop_gradient(
            generate_images(
                comp,
                frozen["unet"],
                tile(cond0),
                uncond0,
                noise,
                batch.num_steps,
                max_steps=max_steps,
                gradient_mode="detached",
            )
        )
        ori_logits, _ = comp.classifier(frozen["classifier"], x_ori)
        ori_pred = _predictions(ori_logits)

        def loss_fn(params):
            images = adapted_images(params, frozen, batch, noise, prompt_of, mode)
            logits, valid = comp.classifier(frozen["classifier"], images)
            align, labels = aligned_targets(logits, valid, batch)
            total = align.loss
            semantic = jnp.zeros((), jnp.float32)
            if use_img:
                weights = semantic_weights(labels, ori_pred, factor1)
                semantic, _ = semantic_loss(images, x_ori, extractors_of(frozen), weights=weights)
                total = total + float(loss_cfg.lambda_img) * semantic
            aux = {"labels": labels, "pred": _predictions(logits), "valid": valid, "align": align.loss, "img": semantic}
            return total, aux

        if microbatch:
            loss, aux, grads = microbatched_value_and_grad(
                state.params, frozen, batch, noise, prompt_of, x_ori, ori_pred
            )
        else:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = reduce(grads)
        loss = reduce(loss)
        finite = all_finite(grads) & jnp.isfinite(loss)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = adaptors.ema_update(state.ema, params, spec.ema_decay)
        new_state = TrainState(
            *keep_if_finite(finite, (params, ema, opt_state), (state.params, state.ema, state.opt_state)),
            state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "loss_align": reduce(aux["align"]),
            "loss_img": reduce(aux["img"]),
            "grad_norm": optax.global_norm(grads),
            "update_norm": optax.global_norm(updates),
            "skipped": new_state.skipped,
            "finite": finite,
            "num_steps": batch.num_steps,
        }
        valid = aux["valid"].astype(jnp.float32)
        for name, pred in aux["pred"].items():
            k = comp.num_classes[name]
            counts = reduce(jnp.sum(jax.nn.one_hot(pred, k) * valid[:, None], axis=0))
            freq = counts / jnp.maximum(counts.sum(), 1.0)
            metrics[f"freq/{name}"] = freq
            metrics[f"bias/{name}"] = bias_from_freq(freq)
            metrics[f"confident/{name}"] = reduce(jnp.mean((aux["labels"][name] >= 0).astype(jnp.float32)))
        return new_state, metrics

    return step
