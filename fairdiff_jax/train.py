"""The train loop: data-parallel step, AdamW + EMA, orbax checkpoints with resume, metrics and progress.

The library entry point is :func:`train` (``fairdiff train`` parses its arguments in ``fairdiff_jax/cli``). A run
resumes from the newest readable checkpoint in its workdir.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fairdiff_jax import parallel
from fairdiff_jax.adaptors.spec import write_adaptor_metadata
from fairdiff_jax.adaptors.transform import adapt_weights
from fairdiff_jax.checkpoints import Checkpointer
from fairdiff_jax.config import plain_config, validate_face_training, write_resolved_config
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.face_terms import build_face_terms
from fairdiff_jax.generation import SamplerSettings, make_generator, tokenize, uncond_ids
from fairdiff_jax.images import save_image_grid
from fairdiff_jax.models.attention import run_attention
from fairdiff_jax.optim import make_optimizer
from fairdiff_jax.preemption import PreemptionFlag
from fairdiff_jax.prompts import PromptIterator
from fairdiff_jax.reporting import (
    MetricsWriter,
    compile_with_stats,
    is_main_process,
    make_folder,
    progress_bar,
    truncate_metrics,
)
from fairdiff_jax.run import Run, build_run
from fairdiff_jax.run_folder import RunLock, check_resume
from fairdiff_jax.train_step import Batch, TrainState, check_microbatch, init_state, make_train_step, step_model

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Counts skipped (non-finite) updates; stops the run after ``max_consecutive`` in a row, naming the last good
    checkpoint and the command that resumes from it (``resume_hint(step) -> str``)."""

    def __init__(self, max_consecutive: int = 20, resume_hint=None):
        self.max_consecutive = max_consecutive
        self.resume_hint = resume_hint or (lambda step: f"train again with resume_step={step} and a lower train.lr")
        self.skipped = 0
        self.consecutive = 0

    def update(self, finite: bool, step: int, last_good: int | None = None) -> bool:
        """Record one step's outcome; returns ``finite``. Raises ``FairdiffError`` when training diverged."""
        if bool(finite):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        log.warning("step %d: non-finite loss, gradient or update, update skipped (%d so far)", step, self.skipped)
        if self.consecutive >= self.max_consecutive:
            if last_good is None:
                advice = "no checkpoint was written; lower train.lr (or use model.dtype=float32) and start again"
            else:
                advice = f"the last good checkpoint is step {last_good}; resume from it: {self.resume_hint(last_good)}"
            raise FairdiffError(
                f"training diverged: {self.consecutive} non-finite updates in a row up to step {step}; {advice}"
            )
        return False


class TrainResult(NamedTuple):
    """What :func:`train` returns: the final state, the last step run, and whether it reached ``num_steps``."""

    state: TrainState
    step: int
    finished: bool
    signal: int | None  # the signal that stopped the run early (SIGTERM, SIGINT), if any


def make_batch(run: Run, cfg, prompts: Sequence[str], step: int) -> Batch:
    """The inputs of iteration ``step`` (1-based): a pure function of (seed, step, prompts), so resumes match."""
    key = jax.random.fold_in(jax.random.PRNGKey(int(cfg.seed)), step)
    noise_key, steps_key, ot_key = jax.random.split(key, 3)
    low, high = (int(s) for s in cfg.sampler.train_steps)
    num_steps = jax.random.randint(steps_key, (), low, high + 1, dtype=jnp.int32)
    shape = (int(cfg.train.images_per_prompt), len(prompts)) + run.pipeline.latent_shape
    cond_ids = tokenize(run.pipeline, prompts, soft_tokens=True)
    plain_ids = tokenize(run.pipeline, prompts, soft_tokens=False)
    return Batch(
        noise=jax.random.normal(noise_key, shape, jnp.float32),
        cond_ids=jnp.asarray(cond_ids),
        plain_ids=jnp.asarray(plain_ids),
        uncond_ids=jnp.asarray(uncond_ids(run.pipeline, cond_ids)),
        plain_uncond_ids=jnp.asarray(uncond_ids(run.pipeline, plain_ids)),
        num_steps=num_steps,
        key=ot_key,
    )


BATCH_SPECS = Batch(
    noise=P(parallel.AXIS), cond_ids=P(), plain_ids=P(), uncond_ids=P(), plain_uncond_ids=P(), num_steps=P(), key=P()
)


def build_parallel_step(model, optimizer, mesh, mode: str):
    """The data-parallel step ``(state, frozen, batch) -> (state, metrics)`` over ``mesh``."""
    per_device = make_train_step(model, optimizer)
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


def write_samples(run: Run, ema_params, prompts: Sequence[str], path: str, generator, per_prompt: int = 8):
    """A grid of ``per_prompt`` images per prompt from the EMA adaptor, fixed noise, a bar per attribute."""
    frozen = run.frozen
    unet_params, te_params, branches = adapt_weights(run.spec, ema_params, frozen["unet"], frozen["text_encoder"])
    images, labels = [], {name: [] for name in run.task.attributes}
    for index, prompt in enumerate(prompts):
        noise = jax.random.normal(jax.random.PRNGKey(index), (per_prompt,) + run.pipeline.latent_shape, jnp.float32)
        cond_ids = tokenize(run.pipeline, [prompt], soft_tokens=True)
        out, pred, _ = generator(
            unet_params,
            te_params,
            frozen["vae"],
            frozen["classifier"],
            jnp.asarray(cond_ids),
            jnp.asarray(uncond_ids(run.pipeline, cond_ids)),
            noise,
            branches,
        )
        images.append(np.asarray(out))
        for name in run.task.attributes:
            labels[name].append(np.asarray(pred[name]))
    grid = np.concatenate(images)
    zoom = max(1, 64 // grid.shape[1])  # tiny images are blown up to be visible
    grid = grid.repeat(zoom, axis=1).repeat(zoom, axis=2)
    return save_image_grid(grid, path, per_prompt, {k: np.concatenate(v) for k, v in labels.items()})


def _restore(checkpointer: Checkpointer, state: TrainState, prompts: PromptIterator, workdir: str, step=None):
    """``(state, start step)`` from the newest readable checkpoint (or exactly ``step``), or the initial state and 0.
    Resuming from an earlier step abandons the later checkpoints and metrics records."""
    restored = checkpointer.restore({"params": state.params, "ema": state.ema}, state.opt_state, step=step)
    if restored is None:
        if step is not None:
            raise FairdiffError(f"--resume-step {step}: {workdir} has no checkpoints yet; drop --resume-step")
        return state, 0
    if step is not None and is_main_process():
        dropped = checkpointer.delete_after(step)
        truncate_metrics(workdir, step)
        if dropped:
            log.warning("resuming from step %d: deleted the later checkpoints %s", step, dropped)
    prompts.restore(restored.meta["prompts"])
    log.info("resumed from the checkpoint of step %d in %s", restored.step, workdir)
    skipped = int(restored.meta.get("skipped", 0))
    state = TrainState(
        restored.adaptor["params"],
        restored.adaptor["ema"],
        restored.opt_state,
        jnp.asarray(skipped, jnp.int32),
        jnp.asarray(restored.meta.get("ema_updates", restored.step - skipped), jnp.int32),
    )
    return state, restored.step


def _prepare_workdir(cfg, workdir: str, run: Run, checkpointer: Checkpointer) -> None:
    """Before anything is written: a resumed run must describe the same adaptor (changes of settings are logged);
    then the resolved config, and ``adaptor.json`` unless checkpoints already stand for it."""
    if not is_main_process():
        return
    has_checkpoints = bool(checkpointer.steps())
    if has_checkpoints:
        for change in check_resume(cfg, workdir, run.spec, run.frozen, plain_config(cfg)):
            log.info("resuming with a changed setting: %s", change)
    write_resolved_config(cfg, workdir)
    if not has_checkpoints:
        write_adaptor_metadata(workdir, run.spec)


def train(
    cfg,
    workdir: str,
    *,
    run: Run | None = None,
    progress: bool = True,
    resume_step: int | None = None,
    resume_hint=None,
) -> TrainResult:
    """Train (or resume) the adaptor described by ``cfg`` in ``workdir``.

    Resumes from the newest readable checkpoint, or from exactly ``resume_step`` (abandoning later ones, e.g. after
    a divergence). ``resume_hint(step) -> str`` words the command that resumes from a step, for the divergence
    message. One training process per workdir (``train.lock``).
    """
    validate_face_training(cfg)
    parallel.maybe_initialize_distributed(cfg)
    make_folder(workdir, "--workdir")
    run = run or build_run(cfg)
    if float(cfg.loss.lambda_img) > 0 and not run.feature_fns:
        raise FairdiffError(
            f"loss.lambda_img={cfg.loss.lambda_img} needs semantic encoders, but none is configured: set "
            "--config.loss.clip_path and --config.loss.dino_path (CLIP and DINOv2 folders), or "
            "--config.loss.lambda_img=0 to train without L_img"
        )
    mesh = parallel.make_mesh()
    if int(cfg.train.images_per_prompt) % mesh.size:
        raise FairdiffError(
            f"train.images_per_prompt={cfg.train.images_per_prompt} must be a multiple of the {mesh.size} devices; "
            "change it or run on fewer devices"
        )
    local_images = int(cfg.train.images_per_prompt) // mesh.size * int(cfg.train.prompts_per_step)
    check_microbatch(int(cfg.train.microbatch), local_images)
    with run_attention(run.attention), RunLock(workdir) if is_main_process() else contextlib.nullcontext():
        checkpointer = Checkpointer(workdir, save_every=int(cfg.checkpoint_every), keep=int(cfg.keep_checkpoints))
        with checkpointer:
            _prepare_workdir(cfg, workdir, run, checkpointer)
            optimizer = make_optimizer(cfg)
            face, face_weights = build_face_terms(cfg, run)
            if face is not None:  # the embedder and the reference set join the frozen weights every step receives
                run.frozen["face"] = face_weights
            model = step_model(run, cfg, face)
            state = init_state(run.spec, run.frozen, optimizer, jax.random.PRNGKey(int(cfg.seed) + 1))
            prompts = PromptIterator(run.train_prompts, int(cfg.train.prompts_per_step), seed=int(cfg.seed))
            state, start = _restore(checkpointer, state, prompts, workdir, resume_step)
            state = parallel.replicate(state, mesh)
            step_fn = build_parallel_step(model, optimizer, mesh, cfg.parallel.mode)
            guard = NonFiniteGuard(int(cfg.train.max_skipped_in_a_row), resume_hint)
            loop = _TrainLoop(cfg, workdir, run, step_fn, mesh, checkpointer, guard, start)
            return loop.run(state, prompts, progress)


class _TrainLoop:
    """Steps ``start + 1 .. num_steps``: compile once, log, sample, checkpoint good steps, stop on a signal."""

    def __init__(self, cfg, workdir, run: Run, step_fn, mesh, checkpointer, guard, start: int):
        self.cfg, self.workdir, self.run_, self.step_fn, self.mesh = cfg, workdir, run, step_fn, mesh
        self.checkpointer, self.guard, self.start = checkpointer, guard, start
        self.last_saved = start or None  # the newest checkpoint of a good step
        self.sampler = None

    def _samples(self, writer, state, prompts_now, step) -> None:
        if self.sampler is None:
            settings = SamplerSettings.from_config(self.cfg.sampler)
            self.sampler = make_generator(self.run_.pipeline, settings, self.run_.classifier, settings.eval_steps)
        path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
        grid = write_samples(self.run_, jax.device_get(state.ema), prompts_now, path, self.sampler)
        writer.write_image(step, "samples", grid)

    def run(self, state, prompts, progress: bool) -> TrainResult:
        cfg, total = self.cfg, int(self.cfg.num_steps)
        frozen = parallel.replicate(self.run_.frozen, self.mesh)
        executables, step = {}, self.start  # one compiled step per token-id shape (prompt_padding="prompt")
        with MetricsWriter(self.workdir) as writer, PreemptionFlag() as preempted:
            bar = progress_bar(total, initial=self.start, enabled=progress and is_main_process())
            for step in range(self.start + 1, total + 1):
                prompts_now = next(prompts)
                batch = place_batch(make_batch(self.run_, cfg, prompts_now, step), self.mesh)
                shapes = (batch.cond_ids.shape, batch.plain_ids.shape)
                if shapes not in executables:
                    if cfg.parallel.mode == "shard_map":
                        executables[shapes], stats = compile_with_stats(self.step_fn, state, frozen, batch)
                        writer.write_scalars(step, {f"compile/{k}": v for k, v in stats.items()})
                    else:
                        executables[shapes] = self.step_fn
                started = time.perf_counter()
                state, metrics = executables[shapes](state, frozen, batch)
                finite = bool(metrics["finite"])
                if step % int(cfg.log_every) == 0 or step == total or not finite:
                    scalars = _host_metrics(metrics)
                    scalars["step_seconds"] = time.perf_counter() - started
                    writer.write_scalars(step, scalars)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}")
                self.guard.update(finite, step, self.last_saved)  # raises after too many skipped updates in a row
                if finite and step % int(cfg.sample_every) == 0 and is_main_process():
                    self._samples(writer, state, prompts_now, step)
                # no checkpoint of a skipped step: good checkpoints are never rotated out by a diverging run; the
                # last step and a requested stop always save a good state, so a short run still leaves its adaptor
                stop = preempted.any_requested()
                if finite:
                    meta = {
                        "prompts": prompts.state(),
                        "skipped": int(np.asarray(state.skipped)),
                        "ema_updates": int(np.asarray(state.ema_updates)),
                    }
                    adaptor = {"params": state.params, "ema": state.ema}
                    if self.checkpointer.save(step, adaptor, state.opt_state, meta, force=step == total or stop):
                        self.last_saved = step
                bar.update(1)
                if stop:
                    log.warning("stopping at step %d on request (signal %s)", step, preempted.signal)
                    break
            bar.close()
            self.checkpointer.wait()
        finished = step >= total and not preempted.requested
        return TrainResult(jax.device_get(state), step, finished, preempted.signal)
