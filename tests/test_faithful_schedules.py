"""Timestep spacing and the last solver step against diffusers built from SD 1.5's verbatim scheduler config.

References: ``DPMSolverMultistepScheduler`` / ``DDIMScheduler.from_config`` (PyTorch diffusers 0.39) and
``FlaxDPMSolverMultistepScheduler``, all reading ``tests/data/sd15_scheduler_config.json`` (the file of
runwayml/stable-diffusion-v1-5, which names no ``timestep_spacing``). Our tables are driven here by a
numpy loop that only applies :class:`~fairdiff_jax.schedules.StepTable`'s documented update.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.schedules import (
    FINAL_SIGMAS_TYPES,
    TIMESTEP_SPACINGS,
    make_schedule,
    step_scales,
    step_table,
    timesteps_for,
)

torch = pytest.importorskip("torch")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

with open(os.path.join(os.path.dirname(__file__), "data", "sd15_scheduler_config.json"), encoding="utf-8") as f:
    SD15 = json.load(f)
STEP_COUNTS = (1, 2, 3, 5, 7, 19, 20, 23, 25, 30, 48, 50)


def diffusers_timesteps(scheduler_class, config: dict, n: int) -> np.ndarray:
    scheduler = scheduler_class.from_config(config)
    scheduler.set_timesteps(n)
    return scheduler.timesteps.numpy()


def test_sd15_config_names_no_spacing_and_each_solver_follows_diffusers():
    assert "timestep_spacing" not in SD15
    schedule = make_schedule(SD15)
    for n in STEP_COUNTS:
        want_dpm = diffusers_timesteps(DPMSolverMultistepScheduler, SD15, n)
        want_ddim = diffusers_timesteps(DDIMScheduler, SD15, n)
        np.testing.assert_array_equal(timesteps_for(schedule, n, "dpmpp_2m"), want_dpm, err_msg=f"dpm {n}")
        np.testing.assert_array_equal(timesteps_for(schedule, n, "ddim"), want_ddim, err_msg=f"ddim {n}")
    # DESIGN.md §1.1: 999, 949, ..., 50 at 20 steps (linspace); DDIM: 951, 901, ..., 1 (leading)
    np.testing.assert_array_equal(timesteps_for(schedule, 20), np.linspace(0, 999, 21).round()[::-1][:-1])
    np.testing.assert_array_equal(timesteps_for(schedule, 20, "ddim"), np.arange(19, -1, -1) * 50 + 1)


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_an_explicit_spacing_wins(spacing):
    named = dict(SD15, timestep_spacing=spacing)
    from_key, from_argument = make_schedule(named), make_schedule(SD15, timestep_spacing=spacing)
    other = "leading" if spacing != "leading" else "linspace"
    overridden = make_schedule(dict(SD15, timestep_spacing=other), timestep_spacing=spacing)
    for n in (1, 5, 20, 23, 30):
        want_dpm = diffusers_timesteps(DPMSolverMultistepScheduler, named, n)
        want_ddim = diffusers_timesteps(DDIMScheduler, named, n)
        for schedule in (from_key, from_argument, overridden):
            np.testing.assert_array_equal(timesteps_for(schedule, n), want_dpm, err_msg=f"{spacing} {n}")
            np.testing.assert_array_equal(timesteps_for(schedule, n, "ddim"), want_ddim, err_msg=f"{spacing} {n}")


def test_adjusted_gradient_scales_on_the_sd15_timesteps():
    scheduler = DPMSolverMultistepScheduler.from_config(SD15)
    alpha_bar = scheduler.alphas_cumprod.double().numpy()
    betas = scheduler.betas.double().numpy()
    for n in (19, 20, 23, 25):
        steps = diffusers_timesteps(DPMSolverMultistepScheduler, SD15, n)
        raw = np.sqrt(alpha_bar[steps]) * np.sqrt(1 - alpha_bar[steps]) / betas[steps]
        want = raw / np.exp(np.log(raw).mean())
        np.testing.assert_allclose(step_scales(make_schedule(SD15), n), want, rtol=1e-5)  # torch's betas are float32
    # the numbers at 20 steps: c_first / c_last = 0.092 / 3.16 with linspace (0.121 / 2.69 with leading)
    scales = step_scales(make_schedule(SD15), 20)
    assert abs(scales[0] - 0.092) < 5e-4 and abs(scales[-1] - 3.16) < 5e-3


def toy_model(z: np.ndarray, t: int) -> np.ndarray:
    """A smooth, non-linear stand-in for the guided noise prediction."""
    return np.tanh(0.7 * z) * (0.6 + t / 1000.0) + 0.2 * np.sin(1.3 * z + t / 300.0)


def run_table(table, noise: np.ndarray) -> np.ndarray:
    """Apply the StepTable update ``z' = A z + B x0 + D x0_prev + E eps`` (the fields' documented meaning)."""
    z, x0_prev = noise, np.zeros_like(noise)
    for i in range(int(table.active.sum())):
        out = toy_model(z, int(table.timestep[i]))
        x0 = table.x0_from_latent[i] * z + table.x0_from_output[i] * out
        eps = table.eps_from_latent[i] * z + table.eps_from_output[i] * out
        z = table.coef_latent[i] * z + table.coef_x0[i] * x0 + table.coef_prev_x0[i] * x0_prev + table.coef_eps[i] * eps
        x0_prev = x0
    return z


def run_diffusers(config: dict, n: int, noise: np.ndarray) -> np.ndarray:
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    scheduler.set_timesteps(n)
    z = torch.from_numpy(noise)
    for t in scheduler.timesteps:
        z = scheduler.step(torch.from_numpy(toy_model(z.double().numpy(), int(t))), t, z).prev_sample
    return z.double().numpy()


@pytest.mark.parametrize("n", [5, 20, 25])
def test_last_solver_step_matches_pytorch_diffusers(n):
    noise = np.random.default_rng(n).standard_normal((2, 4, 6, 6))
    results = {}
    for final in FINAL_SIGMAS_TYPES:
        table = step_table(make_schedule(SD15, final_sigmas_type=final), n, n + 2, "dpmpp_2m")
        ours = run_table(table, noise)
        want = run_diffusers(dict(SD15, final_sigmas_type=final), n, noise)
        np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-5, err_msg=f"{final} {n}")
        results[final] = ours
    # the default keeps diffusers 0.19.3's / Flax's second-order last step; "zero" is measurably different
    assert make_schedule(SD15).final_sigmas_type == "sigma_min"
    relative = np.linalg.norm(results["zero"] - results["sigma_min"]) / np.linalg.norm(results["sigma_min"])
    assert relative > 1e-3, relative


def test_schedule_errors_name_the_allowed_values():
    with pytest.raises(FairdiffError, match="sigma_min"):
        make_schedule(SD15, final_sigmas_type="karras")
    with pytest.raises(FairdiffError, match="linspace"):
        make_schedule(dict(SD15, timestep_spacing="uniform"))
    with pytest.raises(FairdiffError, match="DPM-Solver"):
        step_table(make_schedule(SD15, final_sigmas_type="zero"), 5, 5, "ddim")


@pytest.fixture(scope="module")
def toy_sampler_case(tiny_sd):
    from fairdiff_jax.toyworld.base_model import quiet_diffusers

    ids = np.asarray(tiny_sd.tokenizer(["a doctor", ""], padding="max_length", max_length=16).input_ids, np.int32)
    with quiet_diffusers():
        yield tiny_sd, ids


def flax_reference_images(sd, ids, config: dict, num_steps: int, guidance: float, key) -> np.ndarray:
    """The toy sampler written with diffusers' Flax DPM-Solver++ built from the same scheduler config."""
    from diffusers import FlaxDPMSolverMultistepScheduler

    scheduler = FlaxDPMSolverMultistepScheduler.from_config(dict(config, algorithm_type="dpmsolver++", solver_order=2))
    shape = (1, sd.unet.out_channels, sd.unet.sample_size, sd.unet.sample_size)
    state = scheduler.set_timesteps(scheduler.create_state(), num_steps, shape)
    context = sd.text_encoder(jnp.asarray(ids[::-1]), params=sd.text_encoder_params).last_hidden_state  # [uncond, cond]
    latents = jax.random.normal(key, shape)
    for i in range(num_steps):
        t = state.timesteps[i]
        eps = sd.unet.apply({"params": sd.unet_params}, jnp.concatenate([latents] * 2), jnp.full((2,), t), context)
        uncond, cond = jnp.split(eps.sample, 2)
        latents, state = scheduler.step(state, uncond + guidance * (cond - uncond), t, latents).to_tuple()
    return np.clip(np.transpose(np.asarray(latents), (0, 2, 3, 1)), -1, 1)


@pytest.mark.parametrize("spacing", [None, "trailing"])
def test_toy_builder_sampler_reads_the_world_schedule(toy_sampler_case, spacing):
    from fairdiff_jax.toyworld.base_model import make_sampler

    sd, ids = toy_sampler_case
    config = SD15 if spacing is None else dict(SD15, timestep_spacing=spacing)
    sampler = make_sampler(sd.unet, sd.text_encoder, num_steps=6, guidance_scale=3.0, scheduler_config=config)
    key = jax.random.PRNGKey(3)
    params = {"unet": sd.unet_params, "text_encoder": sd.text_encoder_params}
    images = np.asarray(sampler(params, ids[:1], ids[1:], key))
    want = flax_reference_images(sd, ids, config, 6, 3.0, key)
    np.testing.assert_allclose(images, want, atol=2e-4)
