"""The canonical-gradient convolution: float64 gradients against lax's own transpose rules and finite
differences, its use by the patched U-Net / VAE, and the compiled layouts inside a scanned backward."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.conv import canonical_conv_gradients, conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")
# (input H, W, kernel, stride, padding): the convolutions of diffusers' U-Net and VAE, plus odd sizes
CASES = [
    pytest.param((8, 8), 3, 1, ((1, 1), (1, 1)), id="resnet-3x3"),
    pytest.param((8, 8), 3, 2, ((1, 1), (1, 1)), id="unet-downsample"),
    pytest.param((9, 9), 3, 2, "VALID", id="vae-downsample"),  # the VAE pads (0, 1) itself first
    pytest.param((8, 8), 1, 1, "VALID", id="1x1-shortcut-proj"),
    pytest.param((7, 10), 3, 2, "SAME", id="same-odd"),
    pytest.param((6, 7), 3, 1, ((0, 2), (2, 0)), id="asymmetric-pad"),
    pytest.param((10, 9), 4, 3, ((1, 2), (0, 1)), id="kernel4-stride3"),
]


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("spatial, kernel, stride, padding", CASES)
def test_gradients_equal_stock_float64(spatial, kernel, stride, padding):
    with jax.enable_x64(True):
        x = _random((2, *spatial, 5), 0)
        w = _random((kernel, kernel, 5, 6), 1)

        def stock(x, w):
            return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)

        def ours(x, w):
            return conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)

        expected, stock_vjp = jax.vjp(stock, x, w)
        got, our_vjp = jax.vjp(ours, x, w)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)
        cotangent = _random(expected.shape, 2)
        for ours_grad, stock_grad in zip(our_vjp(cotangent), stock_vjp(cotangent)):
            np.testing.assert_allclose(ours_grad, stock_grad, rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences_float64():
    """An outside reference: central differences of <cotangent, conv(x, w)> along random directions."""
    with jax.enable_x64(True):
        x, w = _random((1, 7, 7, 3), 3), _random((3, 3, 3, 4), 4)
        cotangent = _random((1, 4, 4, 4), 5)

        def objective(x, w):
            return jnp.sum(cotangent * conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC))

        grad_x, grad_w = jax.grad(objective, argnums=(0, 1))(x, w)
        step = 1e-6
        for seed in range(3):
            dx, dw = _random(x.shape, 10 + seed), _random(w.shape, 20 + seed)
            numeric = (objective(x + step * dx, w + step * dw) - objective(x - step * dx, w - step * dw)) / (2 * step)
            analytic = jnp.sum(grad_x * dx) + jnp.sum(grad_w * dw)
            np.testing.assert_allclose(analytic, numeric, rtol=1e-8)


def test_unsupported_calls_go_to_lax():
    """Grouped or dilated convolutions and other layouts are passed to lax unchanged (same values and grads)."""
    x, w_grouped = _random((2, 6, 6, 4), 6).astype(jnp.float32), _random((3, 3, 2, 4), 7).astype(jnp.float32)
    x_nchw, w_oihw = jnp.transpose(x, (0, 3, 1, 2)), _random((5, 4, 3, 3), 8).astype(jnp.float32)
    calls = [
        ((x, w_grouped, (1, 1), "SAME"), dict(dimension_numbers=NHWC, feature_group_count=2)),
        ((x, w_grouped[:, :, :1].repeat(4, 2), (1, 1), "SAME"), dict(dimension_numbers=NHWC, rhs_dilation=(2, 2))),
        ((x_nchw, w_oihw, (1, 1), "SAME"), dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    ]
    for args, kwargs in calls:

        def squared(conv, a, b, args=args, kwargs=kwargs):
            return jnp.sum(conv(a, b, *args[2:], **kwargs) ** 2)

        ours = jax.grad(functools.partial(squared, conv_general_dilated), (0, 1))(*args[:2])
        stock = jax.grad(functools.partial(squared, lax.conv_general_dilated), (0, 1))(*args[:2])
        for got, expected in zip(ours, stock):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_unknown_mode_is_refused():
    with pytest.raises(FairdiffError, match="convolution gradient mode 'fast'"):
        with canonical_conv_gradients("fast"):
            pass


def _scanned_unet_gradient(tiny_sd, mode: str):
    """Gradient of a 2-step rematerialised scan of U-Net calls, compiled with convolution gradients ``mode``."""
    unet, params = tiny_sd.unet, tiny_sd.unet_params
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)

    def loss(params, latents):
        @jax.checkpoint
        def step(z, t):
            return z + 0.1 * unet.apply({"params": params}, z, jnp.full((2,), t), context).sample, None

        final, _ = lax.scan(step, latents, jnp.array([900, 400]))
        return jnp.sum(final**2)

    with canonical_conv_gradients(mode):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, latents).compile()
    layouts = collections.Counter(re.findall(r"dim_labels=([^,\s]+)", compiled.as_text()))
    return compiled(params, latents), layouts


def test_patched_unet_gradient_equals_stock_and_is_canonical(tiny_sd):
    """Whole tiny U-Net inside a scanned remat backward: same loss gradient (params and input) as the stock
    convolution, and every compiled convolution in the canonical layout (the stock one is not)."""
    stock_grads, stock_layouts = _scanned_unet_gradient(tiny_sd, "stock")
    ours_grads, our_layouts = _scanned_unet_gradient(tiny_sd, "canonical")
    assert set(our_layouts) == {"b01f_01io->b01f"}, our_layouts
    assert set(stock_layouts) != {"b01f_01io->b01f"}, "the stock gradient was already canonical: test is moot"
    for ours_tree, stock_tree in zip(ours_grads, stock_grads):  # params, then the input latents
        got = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(ours_tree)])
        expected = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(stock_tree)])
        # some leaves (conv biases before a GroupNorm) have a zero true gradient: compare as one vector
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_patched_vae_decoder_routes_through_canonical_convolution(tiny_sd, monkeypatch):
    """The VAE decoder's convolutions are routed through the patch (counted), with unchanged output."""
    from fairdiff_jax.models import conv

    count = {"calls": 0}
    original = conv.conv_general_dilated

    def counting(*args, **kwargs):
        count["calls"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(conv, "conv_general_dilated", counting)
    latents = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8, 4)), jnp.float32)

    def decode(mode):
        with canonical_conv_gradients(mode):
            return tiny_sd.vae.apply({"params": tiny_sd.vae_params}, latents, method=tiny_sd.vae.decode).sample

    stock = decode("stock")
    assert count["calls"] == 0
    ours = decode("canonical")
    assert count["calls"] >= 8  # post-quant, conv_in, resnets, upsampler, conv_out
    np.testing.assert_allclose(ours, stock, rtol=1e-6, atol=1e-6)
