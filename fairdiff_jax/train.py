"""The train loop: data-parallel step, AdamW + EMA, orbax checkpoints with resume, metrics and progress.

``fairdiff train --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value ...]`` calls :func:`main`;
the library entry point is :func:`train`. A run resumes from the newest readable checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fairdiff_jax import adaptors, parallel
from fairdiff_jax.checkpointing import Checkpointer, PreemptionFlag
from fairdiff_jax.components import Components, build_components, latent_shape, tokenize
from fairdiff_jax.config import config_from_argv, write_resolved_config
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.logs import setup_logging
from fairdiff_jax.metrics import (
    MetricsWriter,
    NonFiniteGuard,
    compile_with_stats,
    is_main_process,
    progress_bar,
    save_image_grid,
)
from fairdiff_jax.prompts import PromptIterator
from fairdiff_jax.train_step import Batch, TrainState, init_state, make_optimizer, make_train_step

log = logging.getLogger(__name__)


def frozen_tree(comp: Components) -> dict:
    """The frozen parameters the step reads, as one replicated pytree."""
    return {
        "unet": comp.unet_params,
        "text_encoder": comp.text_encoder_params,
        "classifier": comp.classifier_params,
        "features": list(comp.feature_params),
    }


def make_batch(comp: Components, prompts: Sequence[str], step: int) -> Batch:
    """The inputs of iteration ``step`` (1-based): a pure function of (seed, step, prompts), so resumes match."""
    cfg = comp.cfg
    key = jax.random.fold_in(jax.random.PRNGKey(int(cfg.seed)), step)
    noise_key, steps_key, ot_key = jax.random.split(key, 3)
    low, high = (int(s) for s in cfg.sampler.train_steps)
    num_steps = jax.random.randint(steps_key, (), low, high + 1, dtype=jnp.int32)
    shape = (int(cfg.train.images_per_prompt), len(prompts)) + latent_shape(comp)
    return Batch(
        noise=jax.random.normal(noise_key, shape, jnp.float32),
        cond_ids=jnp.asarray(tokenize(comp, prompts, soft_tokens=True)),
        plain_ids=jnp.asarray(tokenize(comp, prompts, soft_tokens=False)),
        uncond_ids=jnp.asarray(tokenize(comp, [""], soft_tokens=False)),
        num_steps=num_steps,
        key=ot_key,
    )


BATCH_SPECS = Batch(noise=P(parallel.AXIS), cond_ids=P(), plain_ids=P(), uncond_ids=P(), num_steps=P(), key=P())


def build_parallel_step(comp: Components, optimizer, mesh, mode: str):
    """The data-parallel step ``(state, frozen, batch) -> (state, metrics)`` over ``mesh``."""
    max_steps = int(comp.cfg.sampler.train_steps[1])
    per_device = make_train_step(comp, optimizer, max_steps=max_steps)
    return parallel.data_parallel(
        per_device, mesh, in_specs=(P(), P(), BATCH_SPECS), out_specs=(P(), P()), mode=mode, donate_argnums=(0,)
    )


def place_batch(batch: Batch, mesh) -> Batch:
    noise = parallel.shard_batch(batch.noise, mesh)
    rest = parallel.replicate(batch._replace(noise=None), mesh)
    return rest._replace(noise=noise)


def _host_metrics(metrics: dict) -> dict:
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[name] = float(value)
        else:
            for index, item in enumerate(value.reshape(-1)):
                out[f"{name}/{index}"] = float(item)
    return out


def write_samples(comp: Components, ema_params, prompts: Sequence[str], path: str, generator, per_prompt: int = 8):
    """A grid of ``per_prompt`` images per prompt from the EMA adaptor, fixed noise, a bar per attribute."""
    unet_params, te_params = adaptors.apply_adaptor(comp.spec, ema_params, comp.unet_params, comp.text_encoder_params)
    uncond_ids = jnp.asarray(tokenize(comp, [""], soft_tokens=False))
    images, labels = [], {name: [] for name in comp.attributes}
    for index, prompt in enumerate(prompts):
        noise = jax.random.normal(jax.random.PRNGKey(index), (per_prompt,) + latent_shape(comp), jnp.float32)
        cond_ids = jnp.asarray(tokenize(comp, [prompt], soft_tokens=True))
        out, pred, _ = generator(unet_params, te_params, cond_ids, uncond_ids, noise, comp.classifier_params)
        images.append(np.asarray(out))
        for name in comp.attributes:
            labels[name].append(np.asarray(pred[name]))
    grid = np.concatenate(images)
    zoom = max(1, 64 // grid.shape[1])  # tiny toy images are blown up to be visible
    grid = grid.repeat(zoom, axis=1).repeat(zoom, axis=2)
    return save_image_grid(grid, path, per_prompt, {k: np.concatenate(v) for k, v in labels.items()})


def train(cfg, workdir: str, *, components: Components | None = None, progress: bool = True) -> TrainState:
    """Train (or resume) the adaptor described by ``cfg`` in ``workdir``; returns the final state."""
    parallel.maybe_initialize_distributed(cfg)
    os.makedirs(workdir, exist_ok=True)
    comp = components or build_components(cfg)
    if is_main_process():
        write_resolved_config(cfg, workdir)
        adaptors.write_adaptor_metadata(workdir, comp.spec)
    mesh = parallel.make_mesh()
    if int(cfg.train.images_per_prompt) % mesh.size:
        raise FairdiffError(
            f"train.images_per_prompt={cfg.train.images_per_prompt} must be a multiple of the {mesh.size} devices; "
            "change it or run on fewer devices"
        )
    local_images = int(cfg.train.images_per_prompt) // mesh.size * int(cfg.train.prompts_per_step)
    microbatch = int(cfg.train.microbatch)
    if microbatch < 0 or (microbatch and local_images % microbatch):
        raise FairdiffError(
            f"train.microbatch={microbatch} must be 0 (all images in one pass) or divide the {local_images} images "
            "each device generates per step (images_per_prompt / devices x prompts_per_step)"
        )
    optimizer = make_optimizer(cfg)
    state = init_state(comp, optimizer, jax.random.PRNGKey(int(cfg.seed) + 1))
    prompts = PromptIterator(comp.train_prompts, int(cfg.train.prompts_per_step), seed=int(cfg.seed))
    checkpointer = Checkpointer(workdir, save_every=int(cfg.checkpoint_every), keep=int(cfg.keep_checkpoints))
    restored = checkpointer.restore({"params": state.params, "ema": state.ema}, state.opt_state)
    start = 0
    if restored is not None:
        start = restored.step
        state = TrainState(
            restored.adaptor["params"],
            restored.adaptor["ema"],
            restored.opt_state,
            jnp.asarray(restored.meta.get("skipped", 0), jnp.int32),
        )
        prompts.restore(restored.meta["prompts"])
        log.info("resumed from the checkpoint of step %d in %s", start, workdir)
    state = parallel.replicate(state, mesh)
    frozen = parallel.replicate(frozen_tree(comp), mesh)
    step_fn = build_parallel_step(comp, optimizer, mesh, cfg.parallel.mode)
    guard = NonFiniteGuard()
    total = int(cfg.num_steps)
    with MetricsWriter(workdir) as writer, PreemptionFlag() as preempted, checkpointer:
        bar = progress_bar(total, initial=start, enabled=progress and is_main_process())
        compiled = sampler = None
        for step in range(start + 1, total + 1):
            prompts_now = next(prompts)
            batch = place_batch(make_batch(comp, prompts_now, step), mesh)
            if compiled is None:
                if cfg.parallel.mode == "shard_map":
                    compiled, stats = compile_with_stats(step_fn, state, frozen, batch)
                    writer.write_scalars(step, {f"compile/{k}": v for k, v in stats.items()})
                else:
                    compiled = step_fn
            started = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            guard.update(bool(metrics["finite"]), step)  # raises after too many non-finite updates in a row
            if step % int(cfg.log_every) == 0 or step == total:
                scalars = _host_metrics(metrics)
                scalars["step_seconds"] = time.perf_counter() - started
                writer.write_scalars(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.3f}")
            if step % int(cfg.sample_every) == 0 and is_main_process():
                if sampler is None:
                    from fairdiff_jax.evaluate import make_generator

                    sampler = make_generator(comp, int(cfg.sampler.eval_steps))
                path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
                grid = write_samples(comp, jax.device_get(state.ema), prompts_now, path, sampler)
                writer.write_image(step, "samples", grid)
            meta = {"prompts": prompts.state(), "skipped": int(np.asarray(state.skipped))}
            # the last step is always saved, so a run shorter than checkpoint_every still leaves its adaptor
            last = step == total or preempted.any_requested()
            checkpointer.save(step, {"params": state.params, "ema": state.ema}, state.opt_state, meta, force=last)
            bar.update(1)
            if preempted.any_requested():
                log.warning("stopping at step %d on request (SIGTERM); the checkpoint is written", step)
                break
        bar.close()
    return jax.device_get(state)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairdiff train", description="Train an adaptor (resumes from --workdir).")
    parser.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics, resolved config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    cfg, rest = config_from_argv(list(argv or []))
    args = build_parser().parse_args(rest)
    setup_logging()
    train(cfg, args.workdir, progress=not args.no_progress)
    return 0
