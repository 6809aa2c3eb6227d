"""MobileNetV3-Large in Flax (NHWC), laid out like torchvision's ``mobilenet_v3_large``, with one linear head per
attribute: images ``[B, H, W, 3]`` (already normalised) -> ``{attr: logits [B, K]}``.

The paper's attribute classifiers are torchvision MobileNetV3-Large networks whose last linear layer was replaced
by one with K outputs. The module tree mirrors torchvision's so that its state dicts convert name by name
(``torchvision_convert.py``): ``features_<i>`` are the entries of ``features``, an inverted-residual block keeps its
layers as ``block_<j>``, a conv-norm-activation unit holds ``conv`` and ``bn``, squeeze-excitation holds ``fc1``
and ``fc2``, ``classifier_0`` is the penultimate linear layer and ``head_<attr>`` replaces ``classifier.3``.
BatchNorm keeps its running statistics in the ``batch_stats`` collection; ``train=False`` (the default) uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_EPSILON = 1e-3  # torchvision: BatchNorm2d(eps=0.001, momentum=0.01)
BN_MOMENTUM = 0.99  # Flax keeps `momentum` of the old average; torch's 0.01 is the weight of the new batch
DROPOUT = 0.2


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``) without losing over 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class BlockSpec(NamedTuple):
    """One inverted-residual block (MobileNetV3 paper, Table 1) after the width multiplier."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    squeeze_excite: bool
    hard_swish: bool
    stride: int


# (in, kernel, expanded, out, SE, hard-swish, stride) at width 1.0, as in the MobileNetV3 paper / torchvision.
_LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
_LAST_CHANNEL = 1280


def large_blocks(width_multiplier: float = 1.0) -> tuple[list[BlockSpec], int]:
    """Block specs of MobileNetV3-Large and the penultimate width (1280 at width 1.0) for a width multiplier."""
    scale = lambda c: make_divisible(c * width_multiplier)
    blocks = [BlockSpec(scale(i), k, scale(e), scale(o), se, hs, s) for i, k, e, o, se, hs, s in _LARGE]
    return blocks, scale(_LAST_CHANNEL)


def hard_swish(x: jax.Array) -> jax.Array:
    """``x · relu6(x + 3) / 6`` (torch.nn.Hardswish)."""
    return x * hard_sigmoid(x)


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """``relu6(x + 3) / 6`` (torch.nn.Hardsigmoid)."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


class ConvBNAct(nn.Module):
    """Conv (no bias, symmetric padding ``(k−1)/2`` like torch) -> BatchNorm -> activation (None: identity)."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    activation: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pad = (self.kernel - 1) // 2
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=self.groups,
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype, name="bn"
        )(x)
        return x if self.activation is None else self.activation(x)


class SqueezeExcitation(nn.Module):
    """Channel gate: global mean -> 1x1 conv -> ReLU -> 1x1 conv -> hard sigmoid, times the input."""

    squeeze_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.relu(nn.Conv(self.squeeze_channels, (1, 1), dtype=self.dtype, name="fc1")(scale))
        scale = hard_sigmoid(nn.Conv(channels, (1, 1), dtype=self.dtype, name="fc2")(scale))
        return x * scale


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when the width does not change) -> depthwise kxk -> [SE] -> project (1x1, linear)."""

    spec: BlockSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        spec = self.spec
        act = hard_swish if spec.hard_swish else nn.relu
        hidden, index = x, 0
        if spec.expanded != spec.in_channels:
            hidden = ConvBNAct(spec.expanded, activation=act, dtype=self.dtype, name=f"block_{index}")(hidden, train)
            index += 1
        hidden = ConvBNAct(
            spec.expanded, spec.kernel, spec.stride, spec.expanded, act, self.dtype, name=f"block_{index}"
        )(hidden, train)
        index += 1
        if spec.squeeze_excite:
            squeeze = make_divisible(spec.expanded // 4)
            hidden = SqueezeExcitation(squeeze, self.dtype, name=f"block_{index}")(hidden)
            index += 1
        hidden = ConvBNAct(spec.out_channels, dtype=self.dtype, name=f"block_{index}")(hidden, train)
        if spec.stride == 1 and spec.in_channels == spec.out_channels:
            hidden = hidden + x
        return hidden


class MobileNetV3Large(nn.Module):
    """MobileNetV3-Large with one linear head per attribute: ``[B, H, W, 3]`` -> ``{attr: [B, K_attr]}``.

    Attributes:
      heads: attribute name -> number of classes, e.g. ``{"race": 4, "age": 2}``.
      width_multiplier: scales every width as torchvision's ``_width_mult`` does (0.25 gives a tiny test model).
      dropout: dropout rate before the heads, active only with ``train=True`` (needs a ``dropout`` rng).
      dtype: computation dtype (parameters stay float32).
    """

    heads: Mapping[str, int]
    width_multiplier: float = 1.0
    dropout: float = DROPOUT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        blocks, last_channel = large_blocks(self.width_multiplier)
        x = ConvBNAct(blocks[0].in_channels, 3, 2, activation=hard_swish, dtype=self.dtype, name="features_0")(
            images.astype(self.dtype), train
        )
        for index, spec in enumerate(blocks, start=1):
            x = InvertedResidual(spec, self.dtype, name=f"features_{index}")(x, train)
        last = 6 * blocks[-1].out_channels  # 960 at width 1.0
        x = ConvBNAct(last, activation=hard_swish, dtype=self.dtype, name=f"features_{len(blocks) + 1}")(x, train)
        pooled = jnp.mean(x, axis=(1, 2))
        hidden = hard_swish(nn.Dense(last_channel, dtype=self.dtype, name="classifier_0")(pooled))
        hidden = nn.Dropout(self.dropout, deterministic=not train)(hidden)
        return {
            name: nn.Dense(k, dtype=self.dtype, name=f"head_{name}")(hidden).astype(jnp.float32)
            for name, k in self.heads.items()
        }


def init_variables(module: MobileNetV3Large, image_size: int = 224, seed: int = 0) -> dict[str, Any]:
    """Random ``{"params", "batch_stats"}`` initialised as torchvision does (conv: He normal over fan-out, linear:
    N(0, 0.01), biases 0, BatchNorm scale 1 / bias 0 / running mean 0 / variance 1), drawn with numpy.

    Drawing on the host avoids compiling Flax's ``init`` (about 30 s on a 2-core CPU for this depth).
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        leaf = path[-1].key
        if leaf == "kernel" and len(spec.shape) == 4:  # [kh, kw, in/groups, out]
            fan_out = spec.shape[0] * spec.shape[1] * spec.shape[3]
            return rng.normal(0.0, np.sqrt(2.0 / fan_out), spec.shape).astype(np.float32)
        if leaf == "kernel":
            return rng.normal(0.0, 0.01, spec.shape).astype(np.float32)
        return np.full(spec.shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32)

    return {k: jax.tree_util.tree_map_with_path(draw, dict(v)) for k, v in shapes.items()}
