"""The unrolled, checkpointed sampler with classifier-free guidance and the DFT gradient modes.

``sample_latents`` runs DPM-Solver++ (2M) or DDIM as one ``lax.scan`` whose step is wrapped in
``jax.checkpoint``, so training memory holds one latent (and the previous data prediction) per step.
Gradients flow into the U-Net parameters and into both the conditional and unconditional embeddings.

Gradient modes (DESIGN.md §1.1):
  ``exact``     plain autodiff through the chain;
  ``adjusted``  the U-Net input latent is wrapped in ``stop_gradient`` at every step (dropping every U-Net
                Jacobian dε/dz), and the cotangent reaching the guided noise prediction of step i is
                multiplied by c_i (see :func:`fairdiff_jax.schedules.step_scales`);
  ``detached``  the ``stop_gradient`` without the rescaling.
The solver's own linear update stays differentiable in every mode.

DPM-Solver++'s last step is second order to t = 0 by default (``final_sigmas_type="sigma_min"``: diffusers 0.19.3,
the paper authors' pin, and diffusers' Flax scheduler); PyTorch diffusers >= 0.26 defaults to a first-order step to
sigma 0 (``"zero"``, about 1 % different at 20 steps), available through ``make_schedule(final_sigmas_type=...)``.
Timesteps follow diffusers per solver (``schedules.DEFAULT_SPACING``) unless the model's scheduler config names a
spacing. With bfloat16 weights the U-Net's outputs are cast to float32 before guidance, and the latents carried
between steps keep the noise's dtype (float32), as the authors do (``noises_pred.to(float32)``).

Replay (``adjusted`` / ``detached``): a chain run without gradient can ``record`` every step's U-Net input and
guided output (:class:`Trajectory`); a gradient chain given ``replay=`` that trajectory (same noise,
conditioning and weights) takes each step's output from it and evaluates the U-Net only in the backward pass,
at the recorded input. As the U-Net inputs carry no gradient in these modes, this is the same gradient
without the forward U-Net calls of the gradient pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.gradients import scale_gradient
from fairdiff_jax.schedules import (
    SOLVERS,
    NoiseSchedule,
    StepTable,
    check_solver,
    make_schedule,
    stacked_step_tables,
    step_scales,
    step_table,
    timesteps_for,
)

__all__ = [
    "GRADIENT_MODES",
    "Guide",
    "Trajectory",
    "REMAT_POLICIES",
    "checkpoint_policy",
    "SOLVERS",
    "NoiseSchedule",
    "decode_latents",
    "guided_output",
    "make_schedule",
    "sample_latents",
    "scale_cotangent",
    "step_scales",
    "timesteps_for",
    "unet_apply_fn",
]

GRADIENT_MODES = ("adjusted", "exact", "detached")
_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
REMAT_POLICIES = tuple(_POLICIES)

UNetFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


class Guide(Protocol):
    """A guidance rule with state carried across steps, in place of classifier-free guidance (e.g. Fair Diffusion's
    semantic guidance, ``fairdiff_jax.baselines.fair_diffusion.SemanticGuide``)."""

    def init(self, noise: jax.Array) -> Any:
        """The state before the first step (a pytree)."""

    def __call__(
        self, unet_fn: UNetFn, unet_params, latents, timestep, step, cond_emb, uncond_emb, guidance_scale, state
    ) -> tuple[jax.Array, Any]:
        """``(guided model output [B,C,h,w], new state)`` at 0-based step ``step``."""


class Trajectory(NamedTuple):
    """Every step's U-Net input latents and guided output of a chain, image-major: ``[B, max_steps, C, h, w]``."""

    inputs: jax.Array
    outputs: jax.Array


def unet_apply_fn(unet) -> UNetFn:
    """``unet_fn(params, latents [B,4,h,w], timesteps [B], context [B,L,D]) -> eps`` for a Flax diffusers U-Net."""

    def apply(params, latents, timesteps, context):
        return unet.apply({"params": params}, latents, timesteps, context).sample

    return apply


def checkpoint_policy(name: str):
    """The ``jax.checkpoint`` policy named ``name``; ``"none"`` gives ``None`` (no rematerialisation)."""
    if name not in _POLICIES:
        raise FairdiffError(
            f"unknown remat policy '{name}'; choose one of {list(REMAT_POLICIES)} ('full' saves nothing per "
            "step and uses the least memory, 'none' disables rematerialisation)."
        )
    return _POLICIES[name]


def _check_mode(gradient_mode: str) -> None:
    if gradient_mode not in GRADIENT_MODES:
        raise FairdiffError(
            f"unknown gradient_mode '{gradient_mode}'; choose one of {list(GRADIENT_MODES)} ('adjusted' is the "
            "paper's method, 'exact' plain autodiff, 'detached' the ablation without rescaling)."
        )


scale_cotangent = scale_gradient  # the adjusted DFT's c_i scaling (identity forward, cotangent x c_i)


def guided_output(
    unet_fn: UNetFn,
    unet_params,
    latents: jax.Array,
    timestep: jax.Array,
    cond_emb: jax.Array,
    uncond_emb: jax.Array | None,
    guidance_scale: float | jax.Array = 7.5,
) -> jax.Array:
    """Classifier-free guided model output ``u + w (c - u)`` ``[B,4,h,w]`` from one U-Net call on ``[2B]``.

    ``uncond_emb`` is ``[B,L,D]`` or ``[1,L,D]`` (broadcast). With ``guidance_scale`` the Python number 1
    (or ``uncond_emb=None``) only the conditional batch is evaluated.
    """
    batch = latents.shape[0]
    if uncond_emb is None or (isinstance(guidance_scale, int | float) and guidance_scale == 1):
        out = unet_fn(unet_params, latents, jnp.full((batch,), timestep, jnp.int32), cond_emb)
        return out.astype(jnp.promote_types(out.dtype, jnp.float32))
    uncond_emb = jnp.broadcast_to(uncond_emb, cond_emb.shape).astype(cond_emb.dtype)
    context = jnp.concatenate([uncond_emb, cond_emb], axis=0)
    both = unet_fn(
        unet_params, jnp.concatenate([latents, latents], axis=0), jnp.full((2 * batch,), timestep, jnp.int32), context
    )
    both = both.astype(jnp.promote_types(both.dtype, jnp.float32))  # guidance in float32 with bf16 weights
    uncond_out, cond_out = both[:batch], both[batch:]
    return uncond_out + guidance_scale * (cond_out - uncond_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _replayed_output(guided: Callable, consts, unet_params, cond_emb, uncond_emb, timestep, unet_input, scale, output):
    """The recorded ``output``, whose VJP is that of ``guided(unet_params, cond, uncond, timestep, unet_input, scale,
    *consts)`` (the guided U-Net output, closure-converted: ``consts`` are the values it closed over, e.g. a LoRA
    branch) at the recorded ``unet_input``; the time step, input, scale and recorded output get no gradient."""
    return output


def _replayed_output_fwd(guided, consts, unet_params, cond_emb, uncond_emb, timestep, unet_input, scale, output):
    return output, (consts, unet_params, cond_emb, uncond_emb, timestep, unet_input, scale)


def _replayed_output_bwd(guided, residuals, cotangent):
    consts, unet_params, cond_emb, uncond_emb, timestep, unet_input, scale = residuals

    def differentiable(consts, params, cond, uncond):
        return guided(params, cond, uncond, timestep, unet_input, scale, *consts)

    _, vjp = jax.vjp(differentiable, consts, unet_params, cond_emb, uncond_emb)
    return (*vjp(cotangent), None, None, None, None)


_replayed_output.defvjp(_replayed_output_fwd, _replayed_output_bwd)


def _tables_for_run(schedule, num_steps, max_steps: int, solver: str, dtype) -> StepTable:
    """Per-step constants ``[max_steps]`` (jnp) for a static or traced ``num_steps``."""
    if isinstance(num_steps, int | np.integer):
        if not 1 <= int(num_steps) <= max_steps:
            raise FairdiffError(
                f"num_steps={int(num_steps)} must lie in 1..max_steps={max_steps}; raise max_steps or lower num_steps."
            )
        table = step_table(schedule, int(num_steps), max_steps, solver)
        row = None
    else:
        table = stacked_step_tables(schedule, max_steps, solver)
        row = jnp.clip(jnp.asarray(num_steps, jnp.int32) - 1, 0, max_steps - 1)

    def to_device(field):
        field_dtype = jnp.int32 if field.dtype.kind in "iu" else (jnp.bool_ if field.dtype == bool else dtype)
        array = jnp.asarray(field.astype(np.float64) if field_dtype == dtype else field, dtype=field_dtype)
        return array if row is None else array[row]

    return StepTable(*(to_device(field) for field in table))


def sample_latents(
    unet_fn: UNetFn,
    unet_params,
    noise: jax.Array,
    cond_emb: jax.Array,
    uncond_emb: jax.Array | None,
    num_steps: int | jax.Array,
    schedule: NoiseSchedule,
    *,
    max_steps: int,
    solver: str = "dpmpp_2m",
    guidance_scale: float | jax.Array = 7.5,
    gradient_mode: str = "adjusted",
    remat_policy: str = "full",
    unroll: int | bool = 1,
    guide: Guide | None = None,
    record: bool = False,
    replay: Trajectory | None = None,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Run the sampler from ``noise`` ``[B,4,h,w]`` and return the final latents ``[B,4,h,w]``.

    Args:
      unet_fn: ``(params, latents [N,4,h,w], timesteps [N], context [N,L,D]) -> model output [N,4,h,w]``.
      unet_params: U-Net parameters (e.g. with LoRA applied); gradients flow into them.
      noise: initial latents (standard normal; DPM-Solver and DDIM start at sigma 1).
      cond_emb: conditional text embeddings ``[B,L,D]``.
      uncond_emb: unconditional embeddings ``[B,L,D]`` or ``[1,L,D]``; ``None`` disables guidance.
      num_steps: Python int or traced int32 in ``1..max_steps``; steps past it are identity, so the result
        equals a run of exactly ``num_steps`` steps while one compilation serves every count.
      schedule: from :func:`make_schedule` (the model's ``SchedulerSettings``).
      max_steps: static scan length.
      solver: ``"dpmpp_2m"`` (DPM-Solver++ 2M, lower-order final step below 15 steps) or ``"ddim"`` (eta 0).
      guidance_scale: classifier-free guidance weight w.
      gradient_mode: ``"adjusted"``, ``"exact"`` or ``"detached"`` (module docstring).
      remat_policy: per-step ``jax.checkpoint`` policy name, see :data:`REMAT_POLICIES`.
      unroll: ``lax.scan`` unrolling. XLA:CPU runs the rolled loop's gradient ~2.5x slower (tiny U-Net, 10
        steps), but unrolling costs compile time and, measured on CPU, loses the flat memory of per-step
        remat (benchmarks/dft_step.py: 64 -> 602 MiB temp); keep 1 unless speed on CPU matters more.
      guide: a stateful guidance rule used instead of :func:`guided_output` (its state is kept on padded steps).
      record: also return the :class:`Trajectory` (every step's U-Net input and guided output).
      replay: a recorded trajectory of this same chain (module docstring); ``adjusted`` / ``detached`` only.
    """
    check_solver(solver)
    _check_mode(gradient_mode)
    policy = checkpoint_policy(remat_policy)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise FairdiffError(f"max_steps={max_steps!r} must be a positive Python int (it is the static scan length).")
    if noise.ndim != 4 or cond_emb.ndim != 3 or cond_emb.shape[0] != noise.shape[0]:
        raise FairdiffError(
            f"sample_latents needs noise [B,C,h,w] and cond_emb [B,L,D] with the same B; got {noise.shape} and "
            f"{cond_emb.shape}."
        )
    table = _tables_for_run(schedule, num_steps, max_steps, solver, noise.dtype)
    recorded = _check_replay(replay, record, gradient_mode, guide, noise, max_steps)

    def guided(params, cond, uncond, timestep, unet_input, scale):
        scale = guidance_scale if isinstance(guidance_scale, int | float) else scale
        return guided_output(unet_fn, params, unet_input, timestep, cond, uncond, scale)

    # The step closes over the parameters and embeddings: passing them as explicit arguments of the
    # checkpointed step made the backward pass about 3x slower on CPU.
    def step(carry, inputs: tuple[StepTable, jax.Array, Trajectory | None]):
        (latents, prev_x0, guide_state), (xs, index, step_recorded) = carry, inputs
        unet_input = latents if gradient_mode == "exact" else jax.lax.stop_gradient(latents)
        scale = jnp.zeros(()) if isinstance(guidance_scale, int | float) else guidance_scale
        if step_recorded is not None:
            recorded_input, recorded_output = step_recorded
            args = (unet_params, cond_emb, uncond_emb, xs.timestep, recorded_input, scale)
            converted, consts = jax.closure_convert(guided, *args)  # unet_fn may close over traced weights
            output = _replayed_output(converted, tuple(consts), *args, recorded_output)
        elif guide is None:
            output = guided(unet_params, cond_emb, uncond_emb, xs.timestep, unet_input, scale)
        else:
            output, new_state = guide(
                unet_fn, unet_params, unet_input, xs.timestep, index, cond_emb, uncond_emb, guidance_scale, guide_state
            )
            guide_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, guide_state)
        record_ys = Trajectory(unet_input, output) if record else None
        if gradient_mode == "adjusted":
            output = scale_cotangent(output, xs.grad_scale)
        x0 = (xs.x0_from_latent * latents + xs.x0_from_output * output).astype(latents.dtype)
        eps = xs.eps_from_latent * latents + xs.eps_from_output * output
        new_latents = xs.coef_latent * latents + xs.coef_x0 * x0 + xs.coef_prev_x0 * prev_x0 + xs.coef_eps * eps
        return (new_latents.astype(latents.dtype), x0, guide_state), record_ys

    def padded(carry, inputs):
        """A step past ``num_steps``: the carry exactly, no U-Net call (its record is zeros)."""
        return carry, (Trajectory(jnp.zeros_like(carry[0]), jnp.zeros_like(carry[0])) if record else None)

    def step_or_padding(carry, inputs):
        # a real branch, not a select: a run of fewer than max_steps steps (train_steps=(lo, hi)) skips the
        # U-Net's forward and backward on the padded steps. A static num_steps == max_steps has no padding and
        # keeps the plain step (the branch costs ~11 % on a full-length unrolled CPU chain: fusion stops at it)
        if isinstance(num_steps, int) and num_steps == max_steps:
            return step(carry, inputs)
        return jax.lax.cond(inputs[0].active, step, padded, carry, inputs)

    if remat_policy != "none":
        # inside a rolled scan CSE cannot undo the remat; once unrolled, it must be prevented explicitly.
        # The checkpoint wraps the branch (a checkpoint inside a cond's branch would keep its residuals).
        rolled = unroll is False or unroll == 1
        step_or_padding = jax.checkpoint(step_or_padding, policy=policy, prevent_cse=not rolled)

    start = (noise, jnp.zeros_like(noise), () if guide is None else guide.init(noise))
    (latents, _, _), ys = jax.lax.scan(step_or_padding, start, (table, jnp.arange(max_steps), recorded), unroll=unroll)
    if record:
        return latents, Trajectory(*(jnp.moveaxis(y, 0, 1) for y in ys))
    return latents


def _check_replay(replay: Trajectory | None, record: bool, gradient_mode: str, guide, noise, max_steps: int):
    """The replayed trajectory step-major (``[max_steps, B, ...]``, the scan's xs), after checking it fits."""
    if (record or replay is not None) and guide is not None:
        raise FairdiffError("record / replay work with classifier-free guidance only; drop the guide or them.")
    if replay is None:
        return None
    if record or gradient_mode == "exact":
        raise FairdiffError(
            "replay needs gradient_mode 'adjusted' or 'detached' (their U-Net inputs carry no gradient) and no "
            f"record; got gradient_mode '{gradient_mode}', record={record}."
        )
    expected = (noise.shape[0], max_steps, *noise.shape[1:])
    if any(tuple(x.shape) != expected for x in replay):
        raise FairdiffError(
            f"the replayed trajectory has shapes {[tuple(x.shape) for x in replay]}; this chain needs {expected} "
            "(record it from the same noise with the same max_steps)."
        )
    return Trajectory(*(jnp.moveaxis(x, 1, 0) for x in replay))


def decode_latents(
    vae, vae_params, latents: jax.Array, scaling_factor: float, *, remat: bool = True, chunk_size: int | None = None
) -> jax.Array:
    """Decode latents ``[B,4,h,w]`` to images ``[B,H,W,3]`` in [-1, 1] (latents divided by ``scaling_factor``).

    ``remat`` recomputes the decoder in the backward pass instead of keeping its activations; with
    ``chunk_size`` the batch is decoded ``chunk_size`` images at a time (``lax.map``), which bounds the
    decoder's peak memory, also during that recomputation.
    """

    def decode(params, chunk):
        nhwc = jnp.transpose(chunk / scaling_factor, (0, 2, 3, 1))
        images = vae.apply({"params": params}, nhwc, method=vae.decode).sample  # [N,3,H,W]
        return jnp.clip(jnp.transpose(images, (0, 2, 3, 1)), -1.0, 1.0)

    if remat:
        decode = jax.checkpoint(decode, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    batch = latents.shape[0]
    if chunk_size is None or chunk_size >= batch:
        return decode(vae_params, latents)
    if batch % chunk_size:
        raise FairdiffError(f"decode chunk_size={chunk_size} must divide the batch size {batch}.")
    chunks = latents.reshape(batch // chunk_size, chunk_size, *latents.shape[1:])
    images = jax.lax.map(lambda chunk: decode(vae_params, chunk), chunks)
    return images.reshape(batch, *images.shape[2:])
