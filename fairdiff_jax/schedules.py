"""Noise-schedule tables for the samplers: timesteps, solver coefficients and adjusted-gradient scales.

Everything here is host-side float64 numpy computed once per (schedule, solver, max_steps) at trace time.
For a traced step count the sampler picks row ``num_steps - 1`` of a ``[max_steps, max_steps]`` table, so
one compilation serves every step count, and a run of ``n`` steps uses exactly the numbers a run compiled
for ``n`` steps would use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from fairdiff_jax.errors import FairdiffError

SOLVERS = ("dpmpp_2m", "ddim")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
# the spacing diffusers uses when scheduler_config.json names none: each scheduler class's own default
# (``DPMSolverMultistepScheduler``: "linspace", ``DDIMScheduler``: "leading"; the same in diffusers 0.19.3,
# the paper authors' pin, and 0.39, PyTorch and Flax). SD 1.5's config names none.
DEFAULT_SPACING = {"dpmpp_2m": "linspace", "ddim": "leading"}
# DPM-Solver++'s last step: "sigma_min" goes to t = 0 with the second-order update (diffusers 0.19.3 and
# Flax); "zero" takes a first-order step to sigma = 0, i.e. returns the last data prediction (PyTorch 0.39)
FINAL_SIGMAS_TYPES = ("sigma_min", "zero")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# diffusers' DPM-Solver multistep: ``lower_order_final`` only acts below this many steps
LOWER_ORDER_FINAL_BELOW = 15


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The model's 1000-step training schedule and how inference timesteps are spaced on it.

    ``alphas_cumprod`` and ``betas`` are float64 ``[T]`` arrays. Hashes by identity, so it may be a static
    argument of ``jax.jit``.
    """

    alphas_cumprod: np.ndarray
    betas: np.ndarray
    timestep_spacing: str | None = None  # None: diffusers' default of each solver (DEFAULT_SPACING)
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    final_sigmas_type: str = "sigma_min"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def spacing(self, solver: str) -> str:
        """The timestep spacing ``solver`` uses: the explicit one, else diffusers' default for that solver."""
        check_solver(solver)
        return self.timestep_spacing or DEFAULT_SPACING[solver]


def _setting(settings, name: str, default):
    """One field of a ``SchedulerSettings``-like object or of a raw ``scheduler_config.json`` mapping."""
    value = settings.get(name, default) if isinstance(settings, Mapping) else getattr(settings, name, default)
    return default if value is None else value


def _alphas_cumprod(settings) -> np.ndarray:
    """ᾱ_t, t = 0..T-1 (float64), as diffusers computes it from the config's betas."""
    if isinstance(settings, Mapping):
        from fairdiff_jax.models.loader import SchedulerSettings  # the one beta-schedule implementation

        settings = SchedulerSettings.from_dict(dict(settings))
    return np.asarray(settings.alphas_cumprod(), dtype=np.float64)


def make_schedule(
    settings,
    *,
    timestep_spacing: str | None = None,
    prediction_type: str | None = None,
    final_sigmas_type: str | None = None,
) -> NoiseSchedule:
    """A :class:`NoiseSchedule` from the model's ``SchedulerSettings`` or its raw ``scheduler_config.json`` dict.

    ``timestep_spacing`` wins over the config's key; with neither, each solver follows diffusers' default
    (:data:`DEFAULT_SPACING`). ``final_sigmas_type`` (DPM-Solver++ only) defaults to ``"sigma_min"``.
    """
    alphas_cumprod = _alphas_cumprod(settings)
    betas = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    spacing = timestep_spacing or _setting(settings, "timestep_spacing", None)
    prediction = prediction_type or _setting(settings, "prediction_type", "epsilon")
    final = final_sigmas_type or "sigma_min"
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise FairdiffError(
            f"timestep_spacing '{spacing}' is not supported; use one of {list(TIMESTEP_SPACINGS)} "
            "(set it in scheduler/scheduler_config.json or pass timestep_spacing=...; leave it unset to follow "
            "diffusers' default of the solver)."
        )
    if final not in FINAL_SIGMAS_TYPES:
        raise FairdiffError(
            f"final_sigmas_type '{final}' is not supported; use one of {list(FINAL_SIGMAS_TYPES)} ('sigma_min': "
            "second-order last step, as diffusers 0.19.3 and Flax; 'zero': first-order step to sigma 0)."
        )
    if prediction not in PREDICTION_TYPES:
        raise FairdiffError(
            f"prediction_type '{prediction}' is not supported by the sampler; use one of "
            f"{list(PREDICTION_TYPES)} (the model folder's scheduler_config.json says which it is)."
        )
    return NoiseSchedule(
        alphas_cumprod=alphas_cumprod,
        betas=betas,
        timestep_spacing=spacing,
        steps_offset=int(_setting(settings, "steps_offset", 0)),
        prediction_type=prediction,
        set_alpha_to_one=bool(_setting(settings, "set_alpha_to_one", False)),
        final_sigmas_type=final,
    )


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise FairdiffError(f"unknown solver '{solver}'; choose one of {list(SOLVERS)}.")


def timesteps_for(schedule: NoiseSchedule, num_steps: int, solver: str = "dpmpp_2m") -> np.ndarray:
    """The ``[num_steps]`` int64 training timesteps visited, first (noisiest) to last, as diffusers sets them."""
    check_solver(solver)
    n, total = int(num_steps), schedule.num_train_timesteps
    if n < 1 or n > total:
        raise FairdiffError(f"num_steps={num_steps} is out of range; use 1..{total}.")
    # float64 numpy arithmetic, as diffusers' (PyTorch) schedulers compute it, so rounding ties agree
    k = np.arange(n)
    spacing = schedule.spacing(solver)
    if spacing == "leading":
        # DPM-Solver spaces n+1 points and drops t=0; DDIM spaces n points
        ratio = total // (n + 1) if solver == "dpmpp_2m" else total // n
        steps = (n - k - (0 if solver == "dpmpp_2m" else 1)) * ratio + schedule.steps_offset
    elif spacing == "linspace":
        points = n + 1 if solver == "dpmpp_2m" else n
        steps = np.linspace(0, total - 1, points).round()[::-1][:n]
    else:  # trailing
        steps = np.arange(total, 0, -total / n).round()[:n] - 1
    steps = np.asarray(steps).astype(np.int64)
    return np.clip(steps, 0, total - 1)


def step_scales(schedule: NoiseSchedule, num_steps: int, solver: str = "dpmpp_2m") -> np.ndarray:
    """Adjusted-gradient scales ``c_i`` (``[num_steps]`` float64), divided by their geometric mean.

    ``c_i = sqrt(ᾱ_t) sqrt(1 - ᾱ_t) / (1 - α_t)`` with ``t`` the training timestep of step ``i`` and
    ``α_t = 1 - β_t`` (DESIGN.md §1.1).
    """
    steps = timesteps_for(schedule, num_steps, solver)
    alpha_bar = schedule.alphas_cumprod[steps]
    raw = np.sqrt(alpha_bar) * np.sqrt(1.0 - alpha_bar) / schedule.betas[steps]
    return raw / np.exp(np.mean(np.log(raw)))


class StepTable(NamedTuple):
    """Per-step constants of one run, each ``[max_steps]`` (steps past ``num_steps`` are padding).

    The model output ``out`` is turned into ``x0 = x0_from_latent * z + x0_from_output * out`` and
    ``eps = eps_from_latent * z + eps_from_output * out``; the update is
    ``z_next = coef_latent * z + coef_x0 * x0 + coef_prev_x0 * x0_prev + coef_eps * eps``.
    """

    timestep: np.ndarray
    x0_from_latent: np.ndarray
    x0_from_output: np.ndarray
    eps_from_latent: np.ndarray
    eps_from_output: np.ndarray
    coef_latent: np.ndarray
    coef_x0: np.ndarray
    coef_prev_x0: np.ndarray
    coef_eps: np.ndarray
    grad_scale: np.ndarray
    active: np.ndarray


def _dpmpp_2m_updates(schedule: NoiseSchedule, steps: np.ndarray):
    """DPM-Solver++ (2M, midpoint) coefficients as diffusers runs them.

    ``final_sigmas_type="sigma_min"`` (diffusers 0.19.3 and Flax): the last step goes to t = 0, second order
    from 15 steps on. ``"zero"`` (PyTorch diffusers >= 0.26's default): the last step is first order to
    sigma = 0, which returns the last data prediction ``x0`` exactly.
    """
    n = len(steps)
    alpha = np.sqrt(schedule.alphas_cumprod)
    sigma = np.sqrt(1.0 - schedule.alphas_cumprod)
    lam = np.log(alpha) - np.log(sigma)
    targets = np.concatenate([steps[1:], [0]])
    coef_latent, coef_x0, coef_prev = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, (s0, t) in enumerate(zip(steps, targets)):
        if i == n - 1 and schedule.final_sigmas_type == "zero":
            coef_x0[i] = 1.0  # sigma_t = 0, alpha_t = 1, h = inf: z_next = x0
            continue
        h = lam[t] - lam[s0]
        phi = alpha[t] * (np.exp(-h) - 1.0)  # the first-order update is sigma_t/sigma_s * z - phi * x0
        coef_latent[i] = sigma[t] / sigma[s0]
        first_order = i == 0 or (i == n - 1 and n < LOWER_ORDER_FINAL_BELOW)
        if first_order:
            coef_x0[i] = -phi
        else:
            ratio = (lam[s0] - lam[steps[i - 1]]) / h
            # D1 = (x0 - x0_prev) / ratio; update - phi * D0 - phi / 2 * D1
            coef_x0[i] = -phi * (1.0 + 0.5 / ratio)
            coef_prev[i] = 0.5 * phi / ratio
    return coef_latent, coef_x0, coef_prev, np.zeros(n)


def _ddim_updates(schedule: NoiseSchedule, steps: np.ndarray):
    """DDIM (eta = 0): ``z_next = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) eps``, prev = t - T // n."""
    n = len(steps)
    final = 1.0 if schedule.set_alpha_to_one else schedule.alphas_cumprod[0]
    prev = steps - schedule.num_train_timesteps // n
    alpha_bar_prev = np.where(prev >= 0, schedule.alphas_cumprod[np.maximum(prev, 0)], final)
    return np.zeros(n), np.sqrt(alpha_bar_prev), np.zeros(n), np.sqrt(1.0 - alpha_bar_prev)


def step_table(schedule: NoiseSchedule, num_steps: int, max_steps: int, solver: str) -> StepTable:
    """Float64 per-step constants for a run of ``num_steps`` padded to ``max_steps`` (identity padding)."""
    check_solver(solver)
    if solver == "ddim" and schedule.final_sigmas_type != "sigma_min":
        raise FairdiffError(
            f"final_sigmas_type '{schedule.final_sigmas_type}' applies to DPM-Solver++ only; for DDIM leave it "
            "'sigma_min' (DDIM's last step is set by the scheduler config's set_alpha_to_one)."
        )
    n = int(num_steps)
    steps = timesteps_for(schedule, n, solver)
    alpha_bar = schedule.alphas_cumprod[steps]
    alpha, sigma = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
    if schedule.prediction_type == "epsilon":
        conversion = (1.0 / alpha, -sigma / alpha, np.zeros(n), np.ones(n))
    else:  # v_prediction: x0 = alpha z - sigma v, eps = sigma z + alpha v
        conversion = (alpha, -sigma, sigma, alpha)
    updates = _dpmpp_2m_updates(schedule, steps) if solver == "dpmpp_2m" else _ddim_updates(schedule, steps)
    pad = max_steps - n

    def padded(values, fill=0.0):
        return np.concatenate([np.asarray(values, dtype=np.float64), np.full(pad, fill)])

    return StepTable(
        timestep=np.concatenate([steps, np.zeros(pad, dtype=np.int64)]),
        x0_from_latent=padded(conversion[0]),
        x0_from_output=padded(conversion[1]),
        eps_from_latent=padded(conversion[2]),
        eps_from_output=padded(conversion[3]),
        coef_latent=padded(updates[0], 1.0),
        coef_x0=padded(updates[1]),
        coef_prev_x0=padded(updates[2]),
        coef_eps=padded(updates[3]),
        grad_scale=padded(step_scales(schedule, n, solver), 1.0),
        active=np.arange(max_steps) < n,
    )


def stacked_step_tables(schedule: NoiseSchedule, max_steps: int, solver: str) -> StepTable:
    """Row ``n - 1`` of every field is :func:`step_table` for ``n`` steps: fields are ``[max_steps, max_steps]``."""
    rows = [step_table(schedule, n, max_steps, solver) for n in range(1, max_steps + 1)]
    return StepTable(*(np.stack(field) for field in zip(*rows)))
