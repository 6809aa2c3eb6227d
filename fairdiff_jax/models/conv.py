"""A convolution whose gradients are themselves canonical-layout convolutions (fast inside loops on XLA:CPU).

JAX differentiates ``lax.conv_general_dilated`` into convolutions with permuted dimension numbers (input
gradient ``b01f_01oi->b01f``, weight gradient ``f01b_i01o->01bf``). XLA:CPU only rewrites those into its fast
canonical form outside loops (jax-ml/jax#12868), so in the sampler's scanned, rematerialised backward they
take a slow generic path. :func:`conv_general_dilated` has the same forward, and its custom VJP writes both
gradients as ``NHWC x HWIO -> NHWC`` convolutions with explicit flips, transposes and zero-interleaving:

    dx = conv(pad_interior(dy, stride - 1), flip(w).swap(in, out))             stride 1, "VALID"
    dw = conv(x_pad as [C, H, W, N], dy as [Ho, Wo, N, O]).as [kh, kw, C, O]   window dilation = stride

Only plain channels-last convolutions (no input/kernel dilation, one feature group, one batch group) take
this route; every other call goes to ``lax.conv_general_dilated`` unchanged.
:func:`backend_conv_general_dilated` picks it on CPU only (:func:`canonical_conv_gradients` overrides), as
no other backend was measured.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fairdiff_jax.errors import FairdiffError

__all__ = ["CONV_GRADIENT_MODES", "backend_conv_general_dilated", "canonical_conv_gradients", "conv_general_dilated"]

CONV_GRADIENT_MODES = ("auto", "canonical", "stock")
_mode = "auto"

Padding = tuple[tuple[int, int], ...]


def _is_channels_last(dimension_numbers, lhs_shape, rhs_shape) -> bool:
    """True when ``dimension_numbers`` (strings or ``ConvDimensionNumbers``) mean NH..C x H..IO -> NH..C."""
    if dimension_numbers is None or not 3 <= len(lhs_shape) <= 4:
        return False
    given = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    return given == lax.conv_dimension_numbers(lhs_shape, rhs_shape, _canonical_numbers(len(lhs_shape)))


def _explicit_padding(padding, in_spatial: Sequence[int], window: Sequence[int], strides: Sequence[int]) -> Padding:
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(in_spatial, window, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _canonical_numbers(ndim: int) -> tuple[str, str, str]:
    spatial = "HW"[: ndim - 2]
    return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _canonical_conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], padding: Padding, precision) -> jax.Array:
    """Channels-last convolution ``x [N, *S, C]`` * ``w [*K, C, O]`` -> ``[N, *S', O]``."""
    return lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=_canonical_numbers(x.ndim), precision=precision
    )


def _canonical_conv_fwd(x, w, strides, padding, precision):
    return _canonical_conv(x, w, strides, padding, precision), (x, w)


def _canonical_conv_bwd(strides, padding, precision, residuals, dy):
    x, w = residuals
    numbers = _canonical_numbers(x.ndim)
    window = w.shape[:-2]
    in_spatial, out_spatial = x.shape[1:-1], dy.shape[1:-1]

    # input gradient: dy with stride-1 zeros between entries, padded so that a stride-1 "VALID" convolution
    # with the flipped, in/out-swapped kernel lands on x's positions (negative pads crop).
    pads = [(0, 0, 0)]
    for k, s, (lo, _), size, out in zip(window, strides, padding, in_spatial, out_spatial):
        before = k - 1 - lo
        after = size + k - 1 - ((out - 1) * s + 1) - before
        pads.append((before, after, s - 1))
    pads.append((0, 0, 0))
    dy_spread = lax.pad(dy, jnp.zeros((), dy.dtype), pads)
    w_back = jnp.swapaxes(jnp.flip(w, tuple(range(len(window)))), -1, -2)  # [*K, O, C]
    dx = lax.conv_general_dilated(
        dy_spread, w_back, (1,) * len(window), "VALID", dimension_numbers=numbers, precision=precision
    )

    # weight gradient: channels of x become the batch and the image batch the contracted feature dimension;
    # dy is the kernel, its taps spaced by the stride. Padding rows that no window reaches are cropped.
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)])
    reach = [(out - 1) * s + k for k, s, out in zip(window, strides, out_spatial)]
    x_pad = x_pad[(slice(None), *(slice(0, r) for r in reach), slice(None))]
    lhs = jnp.moveaxis(x_pad, (0, x.ndim - 1), (x.ndim - 1, 0))  # [C, *S_pad, N]
    rhs = jnp.moveaxis(dy, 0, dy.ndim - 2)  # [*S', N, O]
    dw = lax.conv_general_dilated(
        lhs, rhs, (1,) * len(window), "VALID", rhs_dilation=strides, dimension_numbers=numbers, precision=precision
    )  # [C, *K, O]
    dw = jnp.moveaxis(dw, 0, dw.ndim - 2)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with canonical-layout gradients for channels-last convolutions.

    Same signature and forward result; ``lhs [N, *S, C]``, ``rhs [*K, C, O]`` -> ``[N, *S', O]``. Calls it
    cannot rewrite (dilation, groups, other layouts, a preferred element type) go to ``lax`` unchanged.
    """
    plain = (
        _is_channels_last(dimension_numbers, lhs.shape, rhs.shape)
        and all(d == 1 for d in (lhs_dilation or ()))
        and all(d == 1 for d in (rhs_dilation or ()))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    explicit = _explicit_padding(padding, lhs.shape[1:-1], rhs.shape[:-2], strides)
    return _canonical_conv(lhs, rhs, strides, explicit, precision)


def _use_canonical() -> bool:
    return _mode == "canonical" or (_mode == "auto" and jax.default_backend() == "cpu")


def backend_conv_general_dilated(*args, **kwargs) -> jax.Array:
    """:func:`conv_general_dilated` on CPU, ``lax.conv_general_dilated`` elsewhere (decided when traced)."""
    return (conv_general_dilated if _use_canonical() else lax.conv_general_dilated)(*args, **kwargs)


@contextlib.contextmanager
def canonical_conv_gradients(mode: str) -> Iterator[None]:
    """Within the block, trace patched convolutions with ``mode``: "auto" (canonical on CPU), "canonical", "stock".

    The choice is made when a function is traced. ``jax.jit`` caches traces per function object, so a function
    already traced outside the block keeps its compilation: jit a new function (or closure) inside it.
    """
    global _mode
    if mode not in CONV_GRADIENT_MODES:
        raise FairdiffError(
            f"unknown convolution gradient mode '{mode}'; choose one of {list(CONV_GRADIENT_MODES)} ('auto' uses "
            "canonical-layout gradients on CPU only)."
        )
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous
