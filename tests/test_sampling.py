"""The differentiable sampler: parity with diffusers' schedulers, gradients against independent references.

References used here never call fairdiff_jax.sampling / schedules internals: timesteps come from diffusers'
schedulers, ᾱ from numpy, and the chain's backward pass is written out by hand (``reference_chain``).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax import sampling
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.loader import SchedulerSettings
from fairdiff_jax.schedules import make_schedule, step_scales, timesteps_for

SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
BATCH = 2
FD_EPS = 1e-5


def sd_alphas_cumprod() -> np.ndarray:
    """ᾱ of Stable Diffusion's scaled-linear schedule, float64."""
    return np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def diffusers_timesteps(solver: str, num_steps: int) -> np.ndarray:
    from diffusers import FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler

    if solver == "ddim":
        scheduler = FlaxDDIMScheduler.from_config(dict(SD_CONFIG, set_alpha_to_one=False, clip_sample=False))
        return np.asarray(scheduler.set_timesteps(scheduler.create_state(), num_steps).timesteps)
    scheduler = FlaxDPMSolverMultistepScheduler.from_config(SD_CONFIG)  # no spacing named: "linspace"
    return np.asarray(scheduler.set_timesteps(scheduler.create_state(), num_steps, (1,)).timesteps)


def reference_chain(guided, vjp, noise, loss_weights, timesteps, solver, scales, exact_vjp=None):
    """Hand-written sampler and backward pass for ``loss = sum(loss_weights * z_final)``.

    ``guided(z, t)`` is the guided model output; ``vjp(z, t, g)`` the VJP of the guided output w.r.t. the
    differentiated inputs with the latent ``z`` held fixed (a tuple of arrays). Each step is written as
    ``z' = A z + B x0 + D x0_prev + E out`` with ``x0 = (z - sigma out) / alpha`` (epsilon prediction); the
    cotangent of ``out`` of step i is multiplied by ``scales[i]`` before its VJP.
    Returns ``(z_final, grads, grad_noise)``.
    """
    alpha_bar = sd_alphas_cumprod()
    alpha, sigma = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
    lam = np.log(alpha / sigma)
    n = len(timesteps)
    latents, coefs = [noise], []
    x0_prev = None
    for i, t in enumerate(timesteps):
        z = latents[-1]
        out = guided(z, t)
        x0 = (z - sigma[t] * out) / alpha[t]
        if solver == "ddim":
            prev = t - 1000 // n
            a_prev = alpha_bar[prev] if prev >= 0 else alpha_bar[0]
            step = (0.0, np.sqrt(a_prev), 0.0, np.sqrt(1.0 - a_prev))
        else:
            target = timesteps[i + 1] if i + 1 < n else 0
            h = lam[target] - lam[t]
            phi = -alpha[target] * np.expm1(-h)
            if i == 0 or (i == n - 1 and n < 15):
                step = (sigma[target] / sigma[t], phi, 0.0, 0.0)
            else:
                r = (lam[t] - lam[timesteps[i - 1]]) / h
                step = (sigma[target] / sigma[t], phi * (1 + 0.5 / r), -0.5 * phi / r, 0.0)
        coef_a, coef_b, coef_d, coef_e = step
        z_next = coef_a * z + coef_b * x0 + coef_e * out
        if coef_d:
            z_next = z_next + coef_d * x0_prev
        latents.append(z_next)
        coefs.append((t, step))
        x0_prev = x0
    # backward: G = dL/dz_{i+1}; x0_i feeds step i (B_i) and step i+1 (D_{i+1})
    grad_z = loss_weights
    grad_z_after = None
    d_next = 0.0
    grads = None
    for i in reversed(range(n)):
        t, (coef_a, coef_b, coef_d, coef_e) = coefs[i]
        grad_x0 = coef_b * grad_z + (d_next * grad_z_after if grad_z_after is not None else 0.0)
        grad_out = coef_e * grad_z - sigma[t] / alpha[t] * grad_x0
        step_grads = vjp(latents[i], t, scales[i] * grad_out)
        grads = step_grads if grads is None else jax.tree.map(jnp.add, grads, step_grads)
        grad_z_after, d_next = grad_z, coef_d
        grad_z = coef_a * grad_z + grad_x0 / alpha[t]
        if exact_vjp is not None:
            grad_z = grad_z + exact_vjp(latents[i], t, grad_out)
    return latents[-1], grads, grad_z


def reference_scales(timesteps) -> np.ndarray:
    alpha_bar = sd_alphas_cumprod()
    betas = 1.0 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]])
    c = np.sqrt(alpha_bar[timesteps] * (1.0 - alpha_bar[timesteps])) / betas[timesteps]
    return c / np.exp(np.log(c).mean())


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel_err(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(
        float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(leaves_a, leaves_b)
    )
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in leaves_b)
    return (num / den) ** 0.5


# ---------------------------------------------------------------- schedules


def test_timesteps_match_diffusers_schedulers():
    torch = pytest.importorskip("torch")  # noqa: F841
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    for spacing in ("leading", "linspace", "trailing"):
        schedule = make_schedule(SchedulerSettings(), timestep_spacing=spacing)
        dpm = DPMSolverMultistepScheduler.from_config(dict(SD_CONFIG, timestep_spacing=spacing))
        ddim = DDIMScheduler.from_config(dict(SD_CONFIG, timestep_spacing=spacing, set_alpha_to_one=False))
        for n in (1, 2, 3, 5, 7, 10, 19, 20, 23, 25, 30, 48, 50):  # 30 and 48 have rounding ties
            dpm.set_timesteps(n)
            ddim.set_timesteps(n)
            np.testing.assert_array_equal(timesteps_for(schedule, n), dpm.timesteps.numpy(), err_msg=f"{spacing} {n}")
            np.testing.assert_array_equal(timesteps_for(schedule, n, "ddim"), ddim.timesteps.numpy())
    schedule = make_schedule(SchedulerSettings())
    for n in (1, 5, 19, 23, 25):
        np.testing.assert_array_equal(timesteps_for(schedule, n), diffusers_timesteps("dpmpp_2m", n))
        np.testing.assert_array_equal(timesteps_for(schedule, n, "ddim"), diffusers_timesteps("ddim", n))


def test_step_scales_follow_the_formula():
    schedule = make_schedule(SchedulerSettings())
    for n in (5, 19, 23):
        scales = step_scales(schedule, n)
        np.testing.assert_allclose(scales, reference_scales(diffusers_timesteps("dpmpp_2m", n)), rtol=1e-12)
        assert abs(np.log(scales).mean()) < 1e-12  # geometric mean 1
    scales = step_scales(schedule, 25)
    assert scales.argmin() == 0 and scales[-1] > 10 * scales[0]  # the noisiest step is damped the most


def test_bad_arguments_raise_fairdiff_errors():
    schedule = make_schedule(SchedulerSettings())
    args = (None, None, jnp.zeros((1, 4, 8, 8)), jnp.zeros((1, 4, 32)), None, 3, schedule)
    for kwargs, allowed in [
        (dict(solver="euler"), "dpmpp_2m"),
        (dict(gradient_mode="approx"), "adjusted"),
        (dict(remat_policy="some"), "dots_saveable"),
    ]:
        with pytest.raises(FairdiffError, match=allowed):
            sampling.sample_latents(*args, max_steps=4, **kwargs)
    with pytest.raises(FairdiffError, match="max_steps"):
        sampling.sample_latents(*args, max_steps=2)
    with pytest.raises(FairdiffError, match="timestep_spacing"):
        make_schedule(SchedulerSettings(timestep_spacing="karras"))
    with pytest.raises(FairdiffError, match="prediction_type"):
        make_schedule(SchedulerSettings(prediction_type="sample"))


# ---------------------------------------------------------------- the tiny U-Net


class UNetCase:
    """Tiny SD U-Net, fixed noise and embeddings, and jitted guided output / VJP for the references."""

    def __init__(self, sd):
        rng = np.random.default_rng(0)
        self.params = sd.unet_params
        self.unet_fn = sampling.unet_apply_fn(sd.unet)
        self.noise = jnp.asarray(rng.standard_normal((BATCH, 4, 8, 8)), jnp.float32)
        self.cond = jnp.asarray(rng.standard_normal((BATCH, 16, 32)), jnp.float32)
        self.uncond = jnp.asarray(rng.standard_normal((1, 16, 32)), jnp.float32)
        self.loss_weights = jnp.asarray(rng.standard_normal((BATCH, 4, 8, 8)), jnp.float32)
        self.schedule = make_schedule(sd.scheduler)

        def guided(params, cond, uncond, z, t):
            return sampling.guided_output(self.unet_fn, params, z, t, cond, uncond, 7.5)

        self.guided = jax.jit(guided)
        self.guided_vjp = jax.jit(lambda args, z, t, g: jax.vjp(lambda p, c, u: guided(p, c, u, z, t), *args)[1](g))

    @property
    def args(self):
        return (self.params, self.cond, self.uncond)


@pytest.fixture(scope="module")
def unet_case(tiny_sd):
    return UNetCase(tiny_sd)


@pytest.fixture(scope="module")
def traced_sampler(unet_case):
    case = unet_case
    run = jax.jit(
        lambda args, noise, num_steps: sampling.sample_latents(
            case.unet_fn, args[0], noise, args[1], args[2], num_steps, case.schedule, max_steps=16
        )
    )
    return lambda num_steps: run(case.args, case.noise, num_steps)


def diffusers_loop(case, solver, num_steps):
    from diffusers import FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler

    if solver == "ddim":
        scheduler = FlaxDDIMScheduler.from_config(dict(SD_CONFIG, set_alpha_to_one=False, clip_sample=False))
        state = scheduler.set_timesteps(scheduler.create_state(), num_steps)
    else:
        scheduler = FlaxDPMSolverMultistepScheduler.from_config(SD_CONFIG)  # no spacing named: "linspace"
        state = scheduler.set_timesteps(scheduler.create_state(), num_steps, case.noise.shape)
    step = jax.jit(lambda state, output, t, latents: scheduler.step(state, output, t, latents, return_dict=False))
    latents = case.noise
    for t in state.timesteps:
        output = case.guided(case.params, case.cond, case.uncond, latents, t)
        latents, state = step(state, output, t, latents)
    return latents


@pytest.mark.parametrize("num_steps", [16, 8, 5])
def test_dpm_solver_matches_diffusers_with_traced_step_count(unet_case, traced_sampler, num_steps):
    # one compilation (max_steps=16) serves every count; 8 and 5 < 15 take diffusers' lower-order final step
    mine = traced_sampler(jnp.int32(num_steps))
    reference = diffusers_loop(unet_case, "dpmpp_2m", num_steps)
    assert float(jnp.abs(reference).max()) > 1.0  # guidance with random weights: far from the noise
    assert rel_err(mine, reference) <= 1e-5


def test_ddim_matches_diffusers(unet_case):
    case = unet_case
    mine = jax.jit(
        lambda: sampling.sample_latents(
            case.unet_fn, case.params, case.noise, case.cond, case.uncond, 6, case.schedule, max_steps=6, solver="ddim"
        )
    )()
    assert rel_err(mine, diffusers_loop(case, "ddim", 6)) <= 1e-5


def test_adjusted_gradient_of_the_unet_chain_matches_hand_written_reference(unet_case):
    # the float64 checks below cover every mode and solver with a stand-in; this one runs the real U-Net
    case = unet_case
    num_steps = 5  # traced, below max_steps=6: the padded step must not touch the gradient

    def loss(args, noise, num_steps):
        latents = sampling.sample_latents(
            case.unet_fn, args[0], noise, args[1], args[2], num_steps, case.schedule, max_steps=6
        )
        return jnp.sum(case.loss_weights * latents)

    grads, grad_noise = jax.jit(jax.grad(loss, argnums=(0, 1)))(case.args, case.noise, jnp.int32(num_steps))
    timesteps = diffusers_timesteps("dpmpp_2m", num_steps)
    _, ref_grads, ref_grad_noise = reference_chain(
        lambda z, t: case.guided(*case.args, z, t),
        lambda z, t, g: case.guided_vjp(case.args, z, t, g.astype(jnp.float32)),
        case.noise,
        case.loss_weights,
        timesteps,
        "dpmpp_2m",
        reference_scales(timesteps),
    )
    for got, want in zip(grads, ref_grads):  # U-Net params, cond embedding, uncond embedding
        assert tree_rel_err(got, want) <= 2e-4
        assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(want)) > 0
    assert rel_err(grad_noise, ref_grad_noise) <= 2e-4


# ---------------------------------------------------------------- float64 checks with a smooth stand-in


def standin_params(rng, dtype, hidden=8, context_dim=32):
    return {
        "w_in": jnp.asarray(rng.standard_normal((4, hidden)) / 2, dtype),
        "w_ctx": jnp.asarray(rng.standard_normal((context_dim, hidden)) / 6, dtype),
        "freq": jnp.asarray(rng.uniform(1, 4, hidden), dtype),
        "w_out": jnp.asarray(rng.standard_normal((hidden, 4)) / 3, dtype),
    }


def standin_unet(params, latents, timesteps, context):
    """A smooth denoiser with U-Net's signature: depends on the latent, the timestep and the context."""
    hidden = jnp.einsum("bchw,cd->bdhw", latents, params["w_in"])
    hidden = hidden + jnp.sin(timesteps[:, None] * params["freq"] / 1000.0)[:, :, None, None]
    hidden = hidden + (context.mean(axis=1) @ params["w_ctx"])[:, :, None, None]
    return jnp.einsum("bdhw,dc->bchw", jnp.tanh(hidden), params["w_out"]) + 0.1 * latents


def x64_checks() -> dict:
    """Run with jax_enable_x64 in a subprocess; returns the relative errors of every comparison."""
    assert jax.config.jax_enable_x64
    rng = np.random.default_rng(1)
    f64 = jnp.float64
    params = standin_params(rng, f64)
    noise = jnp.asarray(rng.standard_normal((BATCH, 4, 4, 4)), f64)
    cond = jnp.asarray(rng.standard_normal((BATCH, 3, 32)), f64)
    uncond = jnp.asarray(rng.standard_normal((1, 3, 32)), f64)
    weights = jnp.asarray(rng.standard_normal(noise.shape), f64)
    schedule = make_schedule(SchedulerSettings())
    num_steps, max_steps = 6, 8  # traced step count below the scan length
    inputs = (params, cond, uncond, noise)
    modes = ("exact", "adjusted", "detached")
    results = {}
    for solver in ("dpmpp_2m", "ddim"):

        def run(inputs, steps, mode, solver=solver):
            p, c, u, z = inputs
            return sampling.sample_latents(
                standin_unet, p, z, c, u, steps, schedule, max_steps=max_steps, solver=solver, gradient_mode=mode
            )

        def loss(inputs, steps, mode):
            return jnp.sum(weights * run(inputs, steps, mode))

        value = jax.jit(lambda x, n: loss(x, n, "exact"))
        everything = jax.jit(lambda x, n: (run(x, n, "exact"), [jax.grad(loss)(x, n, mode) for mode in modes]))
        latents, grads = everything(inputs, jnp.int32(num_steps))
        grads = dict(zip(modes, grads))

        errors = []
        for index in range(4):  # params, cond, uncond, noise: directional 4-point central differences
            direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), f64), inputs[index])
            analytic = sum(
                float(jnp.vdot(g, d))
                for g, d in zip(jax.tree.leaves(grads["exact"][index]), jax.tree.leaves(direction))
            )

            def shifted(step, index=index, direction=direction, value=value):
                moved = jax.tree.map(lambda x, delta: x + step * FD_EPS * delta, inputs[index], direction)
                return float(value(inputs[:index] + (moved,) + inputs[index + 1 :], jnp.int32(num_steps)))

            numeric = (8 * (shifted(1) - shifted(-1)) - (shifted(2) - shifted(-2))) / (12 * FD_EPS)
            errors.append(abs(numeric - analytic) / abs(analytic))
        results[f"{solver}/exact_vs_fd"] = max(errors)

        timesteps = diffusers_timesteps(solver, num_steps)

        def guided(z, t):
            return sampling.guided_output(standin_unet, params, z, t, cond, uncond, 7.5)

        def vjp_inputs(z, t, g):
            return jax.vjp(lambda p, c, u: sampling.guided_output(standin_unet, p, z, t, c, u, 7.5), *inputs[:3])[1](g)

        def vjp_latent(z, t, g):
            return jax.vjp(lambda x: guided(x, t), z)[1](g)[0]

        for mode in modes:
            scales = reference_scales(timesteps) if mode == "adjusted" else np.ones(num_steps)
            final, ref_grads, ref_grad_noise = reference_chain(
                guided, vjp_inputs, noise, weights, timesteps, solver, scales, vjp_latent if mode == "exact" else None
            )
            results[f"{solver}/{mode}_vs_reference"] = max(
                tree_rel_err(grads[mode][:3], ref_grads), rel_err(grads[mode][3], ref_grad_noise)
            )
        results[f"{solver}/forward_vs_reference"] = rel_err(latents, final)
        # the modes really differ, so agreeing with their references is not vacuous
        results[f"{solver}/adjusted_vs_exact"] = tree_rel_err(grads["adjusted"][:3], grads["exact"][:3])
        results[f"{solver}/adjusted_vs_detached"] = tree_rel_err(grads["adjusted"][:3], grads["detached"][:3])
    return results


@pytest.fixture(scope="module", autouse=True)
def x64_process():
    """The float64 checks run in a subprocess (x64 must not leak here), started first to run alongside."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = (
        "import os, json, sys; os.environ['JAX_PLATFORMS'] = 'cpu'; import jax; "
        "jax.config.update('jax_enable_x64', True); "
        "jax.config.update('jax_compilation_cache_dir', sys.argv[2]) if sys.argv[2] else None; "
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5); "
        "sys.path.insert(0, sys.argv[1]); "
        "import test_sampling; print('RESULTS=' + json.dumps(test_sampling.x64_checks()))"
    )
    cache = jax.config.jax_compilation_cache_dir or ""
    process = subprocess.Popen(
        [sys.executable, "-c", script, tests_dir, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def x64_results(x64_process):
    stdout, stderr = x64_process.communicate(timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULTS=")]
    assert x64_process.returncode == 0 and lines, stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS=") :])


def test_float64_exact_gradient_matches_finite_differences(x64_results):
    for solver in ("dpmpp_2m", "ddim"):
        assert x64_results[f"{solver}/exact_vs_fd"] <= 1e-7, x64_results


def test_float64_gradient_modes_match_hand_written_reference(x64_results):
    for key, value in x64_results.items():
        if key.endswith("_vs_reference"):
            assert value <= 1e-10, (key, x64_results)
    for solver in ("dpmpp_2m", "ddim"):
        assert x64_results[f"{solver}/adjusted_vs_exact"] > 0.05
        assert x64_results[f"{solver}/adjusted_vs_detached"] > 0.05


# ---------------------------------------------------------------- memory


def conv_denoiser(params, latents, timesteps, context):
    """Three 3x3 convolutions at 64 channels: enough activations per step to see what remat keeps."""

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))

    shift = (context.mean(axis=1) @ params["ctx"])[:, :, None, None] + (timesteps[:, None] / 1000.0)[:, :, None, None]
    hidden = jnp.tanh(conv(latents, params["c1"]) + shift)
    hidden = jnp.tanh(conv(hidden, params["c2"]))
    return conv(hidden, params["c3"])


def temp_bytes(num_steps: int, remat: str) -> int:
    rng = np.random.default_rng(0)
    params = {
        "c1": jnp.asarray(rng.standard_normal((64, 4, 3, 3)) * 0.1, jnp.float32),
        "c2": jnp.asarray(rng.standard_normal((64, 64, 3, 3)) * 0.05, jnp.float32),
        "c3": jnp.asarray(rng.standard_normal((4, 64, 3, 3)) * 0.05, jnp.float32),
        "ctx": jnp.asarray(rng.standard_normal((32, 64)) * 0.1, jnp.float32),
    }
    noise = jnp.zeros((4, 4, 8, 8), jnp.float32)
    cond = jnp.zeros((4, 4, 32), jnp.float32)
    schedule = make_schedule(SchedulerSettings())

    def loss(params, cond):
        latents = sampling.sample_latents(
            conv_denoiser, params, noise, cond, cond[:1], num_steps, schedule, max_steps=num_steps, remat_policy=remat
        )
        return jnp.sum(latents**2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, cond).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_keeps_memory_flat_in_the_number_of_steps():
    with_remat = {n: temp_bytes(n, "full") for n in (5, 20)}
    without = {n: temp_bytes(n, "none") for n in (5, 20)}
    assert with_remat[20] <= 1.5 * with_remat[5], with_remat
    assert without[20] >= 3 * without[5], without
    assert with_remat[20] < without[20] / 3, (with_remat, without)


# ---------------------------------------------------------------- decoding


def test_decode_latents_matches_vae_and_remat_keeps_gradients(tiny_sd):
    rng = np.random.default_rng(3)
    latents = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    vae, scale = tiny_sd.vae, tiny_sd.vae_scaling_factor

    def remat_chunked(z):  # checkpointed, one image at a time
        return sampling.decode_latents(vae, tiny_sd.vae_params, z, scale, remat=True, chunk_size=1)

    def direct(z):  # the VAE as diffusers runs it, no remat
        images = vae.apply({"params": tiny_sd.vae_params}, jnp.transpose(z / scale, (0, 2, 3, 1)), method=vae.decode)
        return jnp.clip(jnp.transpose(images.sample, (0, 2, 3, 1)), -1.0, 1.0)

    @jax.jit
    def both(z):
        return [
            jax.value_and_grad(lambda x, f=f: jnp.sum(weights * f(x)))(z) + (f(z),) for f in (remat_chunked, direct)
        ]

    (value, grad, images), (ref_value, ref_grad, ref_images) = both(latents)
    assert images.shape == (2, 16, 16, 3)
    assert float(jnp.abs(images).max()) <= 1.0
    np.testing.assert_allclose(images, ref_images, atol=1e-5)
    assert rel_err(grad, ref_grad) <= 1e-5
    assert float(jnp.abs(ref_grad).sum()) > 0


@pytest.mark.parametrize("remat", ["full", "none"])
@pytest.mark.parametrize("unroll", [1, True])
def test_padded_steps_call_no_unet_and_change_nothing(remat, unroll):
    """A traced step count below max_steps runs the U-Net (forward and backward) only on the real steps, and the
    value and gradient equal a run compiled for exactly that many steps."""
    rng = np.random.default_rng(4)
    params = standin_params(rng, jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    schedule = make_schedule(SchedulerSettings())
    calls = []

    def counted(params, latents, timesteps, context):
        jax.debug.callback(lambda t: calls.append(int(t[0])), timesteps)
        return standin_unet(params, latents, timesteps, context)

    def loss(params, num_steps, max_steps):
        latents = sampling.sample_latents(
            counted, params, noise, cond, cond[:1], num_steps, schedule, max_steps=max_steps, remat_policy=remat,
            unroll=unroll,
        )  # fmt: skip
        return jnp.sum(latents**2)

    padded = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, jnp.int32(3), 6)
    jax.block_until_ready(padded)
    steps_run = sorted(set(calls))
    assert len(steps_run) == 3, calls  # three timesteps, each called once forward (and again if rematerialised)
    assert len(calls) == (6 if remat == "full" else 3), calls
    calls.clear()
    exact = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(params, 3, 3)
    assert sorted(set(calls)) == steps_run
    np.testing.assert_allclose(padded[0], exact[0], rtol=1e-5)
    assert tree_rel_err(padded[1], exact[1]) <= 1e-5  # float32: the two programs fuse differently
