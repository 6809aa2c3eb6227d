"""Replaying a recorded chain: the gradient through ``sample_latents(replay=...)`` equals the ordinary gradient
(float64, every mode that allows it, padded steps, traced guidance), with the U-Net evaluated only backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax import sampling
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.loader import SchedulerSettings

SCHEDULE = sampling.make_schedule(SchedulerSettings())


def toy_unet(params, latents, timesteps, context):
    """A small nonlinear stand-in for the U-Net: ``[N, C, h, w]`` -> same, depending on params, t and context."""
    mixed = jnp.einsum("nchw,cd->ndhw", latents, params["w"])
    drive = jnp.mean(context, axis=(1, 2))[:, None, None, None] * params["b"][None, :, None, None]
    return jnp.tanh(mixed + drive + timesteps[:, None, None, None] / 1000.0)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((3, 3)) / 2), "b": jnp.asarray(rng.standard_normal(3))}
    noise = jnp.asarray(rng.standard_normal((2, 3, 4, 4)))
    cond, uncond = jnp.asarray(rng.standard_normal((2, 5, 6))), jnp.asarray(rng.standard_normal((1, 5, 6)))
    weights = jnp.asarray(rng.standard_normal((2, 3, 4, 4)))
    return params, noise, cond, uncond, weights


@pytest.mark.parametrize("mode", ["adjusted", "detached"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim"])
def test_replayed_gradient_equals_ordinary_gradient_float64(mode, solver):
    with jax.enable_x64(True):
        params, noise, cond, uncond, weights = _inputs()
        num_steps, guidance = jnp.int32(4), jnp.float64(3.5)  # traced: padded steps 5..6 of max 6

        def chain(params, cond, uncond, **kwargs):
            return sampling.sample_latents(
                toy_unet, params, noise, cond, uncond, num_steps, SCHEDULE, max_steps=6, solver=solver,
                guidance_scale=guidance, gradient_mode=mode, **kwargs,
            )  # fmt: skip

        final, trajectory = chain(params, cond, uncond, record=True)
        np.testing.assert_array_equal(final, chain(params, cond, uncond))
        assert trajectory.inputs.shape == trajectory.outputs.shape == (2, 6, 3, 4, 4)

        def loss(params, cond, uncond, **kwargs):
            return jnp.sum(weights * chain(params, cond, uncond, **kwargs) ** 2)

        expected = jax.grad(loss, argnums=(0, 1, 2))(params, cond, uncond)
        replayed = jax.grad(lambda *a: loss(*a, replay=jax.lax.stop_gradient(trajectory)), argnums=(0, 1, 2))
        got = replayed(params, cond, uncond)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            assert float(jnp.max(jnp.abs(b))) > 1e-6
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_replayed_gradient_reaches_weights_the_unet_closes_over_float64():
    """A U-Net function closing over differentiated weights (as the unmerged float32 LoRA branch does) gets the same
    gradient for them through the replay."""
    with jax.enable_x64(True):
        params, noise, cond, uncond, weights = _inputs(1)
        branch = jnp.asarray(np.random.default_rng(5).standard_normal((3, 3)) / 3)

        def loss(params, branch, **kwargs):
            def unet_fn(p, latents, timesteps, context):  # closes over ``branch``, traced by jax.grad
                return toy_unet(p, latents, timesteps, context) + jnp.einsum("nchw,cd->ndhw", latents, branch) ** 2

            final = sampling.sample_latents(
                unet_fn, params, noise, cond, uncond, 3, SCHEDULE, max_steps=3, guidance_scale=2.0, **kwargs
            )
            return jnp.sum(weights * final), final

        (_, final), expected = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, branch)
        _, trajectory = sampling.sample_latents(
            lambda p, z, t, c: toy_unet(p, z, t, c) + jnp.einsum("nchw,cd->ndhw", z, branch) ** 2,
            params, noise, cond, uncond, 3, SCHEDULE, max_steps=3, guidance_scale=2.0, record=True,
        )  # fmt: skip
        (_, replayed_final), got = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, branch, replay=trajectory
        )
        np.testing.assert_allclose(replayed_final, final, rtol=1e-12)
        assert float(jnp.max(jnp.abs(expected[1]))) > 1e-6
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_replay_skips_the_forward_unet_calls(tiny_sd):
    """Compiled FLOPs of the tiny U-Net chain's gradient drop by about one U-Net call per step with replay."""
    rng = np.random.default_rng(1)
    noise = jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((1, 16, 32)), jnp.float32)
    unet_fn = sampling.unet_apply_fn(tiny_sd.unet)

    def loss(params, cond, replay=None):
        final = sampling.sample_latents(unet_fn, params, noise, cond, cond[:1], 3, SCHEDULE, max_steps=3, replay=replay)
        return jnp.sum(final**2)

    _, trajectory = sampling.sample_latents(unet_fn, tiny_sd.unet_params, noise, cond, cond[:1], 3, SCHEDULE,
                                            max_steps=3, record=True)  # fmt: skip

    def flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    guided = flops(lambda p, c: sampling.guided_output(unet_fn, p, noise, 500, c, c[:1]), tiny_sd.unet_params, cond)
    ordinary = flops(jax.grad(loss, argnums=1), tiny_sd.unet_params, cond)
    replayed = flops(jax.grad(lambda p, c, t: loss(p, c, t), argnums=1), tiny_sd.unet_params, cond, trajectory)
    # XLA counts a loop body once: one guided U-Net call fewer in the scanned step
    assert ordinary - replayed == pytest.approx(guided, rel=0.1)


def test_replay_is_refused_where_it_would_be_wrong():
    params, noise, cond, uncond, _ = _inputs()
    params, noise, cond, uncond = jax.tree.map(lambda x: x.astype(jnp.float32), (params, noise, cond, uncond))
    kwargs = dict(max_steps=3, gradient_mode="adjusted")
    _, trajectory = sampling.sample_latents(toy_unet, params, noise, cond, uncond, 3, SCHEDULE, record=True, **kwargs)
    with pytest.raises(FairdiffError, match="replay needs gradient_mode 'adjusted' or 'detached'"):
        sampling.sample_latents(toy_unet, params, noise, cond, uncond, 3, SCHEDULE, max_steps=3, gradient_mode="exact",
                                replay=trajectory)  # fmt: skip
    with pytest.raises(FairdiffError, match="this chain needs"):
        sampling.sample_latents(toy_unet, params, noise, cond, uncond, 3, SCHEDULE, max_steps=4, replay=trajectory)
