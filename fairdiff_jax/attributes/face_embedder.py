"""A Flax port of dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``, 128-D embeddings of
150x150 face chips), with its weights read from the shipped file by :mod:`~fairdiff_jax.attributes.dlib_format`.

The network is the ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp`` (29 convolutions): a 7x7/2
convolution, a 3x3/2 max pool, 14 residual blocks (3 at 32 channels, 4 at 64, 3 at 128, 4 at 256; the first block of
each later stage and the last one halve the resolution), a global average and a 128-D linear map. dlib's conventions
kept here: a strided convolution or pool has no padding (a stride-1 3x3 pads by 1); a downsampling block adds its 2x2
average-pooled input to the block output where they overlap, zero elsewhere (``tt::add`` over tensors of different
sizes, so 34 -> 17 -> 8 -> 4 -> 2 pixels); the input is ``(pixel − mean) / 256`` per RGB channel. No dlib or torch is
needed to run it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.attributes.dlib_format import LayerSpec, read_metric_network
from fairdiff_jax.attributes.face_chip import DLIB_CHIP_PADDING, DLIB_CHIP_SIZE, extract_face_chips
from fairdiff_jax.errors import FairdiffError

EMBEDDER_NAME = "dlib_face_recognition_resnet_model_v1"
MODEL_FILE = EMBEDDER_NAME + ".dat"
# (channels, halves the resolution) per residual block, input side first
BLOCKS = ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2
BLOCKS += ((256, True),) + ((256, False),) * 2 + ((256, True),)
EMBEDDING_DIM = 128


def dlib_layers(blocks: Sequence[tuple[int, bool]] = BLOCKS, dim: int = EMBEDDING_DIM) -> tuple[LayerSpec, ...]:
    """The network's dlib layer types, outermost first (the order of their headers in the file)."""
    layers = [LayerSpec("fc", dim), LayerSpec("avg_pool", 0, 0, 1)]
    for channels, down in reversed(blocks):
        layers += [LayerSpec("relu"), LayerSpec("add_prev")]
        if down:  # add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<...>>>>>>
            layers += [LayerSpec("avg_pool", 0, 2, 2), LayerSpec("skip"), LayerSpec("tag")]
        layers += [LayerSpec("affine"), LayerSpec("con", channels, 3, 1), LayerSpec("relu"), LayerSpec("affine")]
        layers += [LayerSpec("con", channels, 3, 2 if down else 1), LayerSpec("tag")]
    return tuple(
        layers + [LayerSpec("max_pool", 0, 3, 2), LayerSpec("relu"), LayerSpec("affine")] + [LayerSpec("con", 32, 7, 2)]
    )


def overlap_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's ``add_prev``: ``[B, H, W, C]`` arrays of different sizes summed where they overlap (top-left aligned),
    the larger extent kept and filled from whichever has values."""
    shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape))
    pad = lambda t: jnp.pad(t, [(0, s - d) for s, d in zip(shape, t.shape)])
    return pad(a) + pad(b)


class Affine(nn.Module):
    """dlib's ``affine`` layer in CONV mode (a frozen batch norm): ``x · scale + bias`` per channel."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return x * scale + bias


def _conv(features: int, size: int, stride: int, name: str) -> nn.Conv:
    pad = 0 if stride != 1 else size // 2
    return nn.Conv(features, (size, size), (stride, stride), padding=((pad, pad), (pad, pad)), name=name)


class ResidualBlock(nn.Module):
    """``relu(x + affine(conv(relu(affine(conv(x))))))``; with ``down`` the first conv has stride 2 and the shortcut is
    a 2x2 average pool."""

    features: int
    down: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(self.features, 3, 2 if self.down else 1, "conv_a")(x)
        h = nn.relu(Affine(self.features, name="affine_a")(h))
        h = Affine(self.features, name="affine_b")(_conv(self.features, 3, 1, "conv_b")(h))
        shortcut = nn.avg_pool(x, (2, 2), (2, 2)) if self.down else x
        return nn.relu(overlap_add(shortcut, h))


class DlibFaceResNet(nn.Module):
    """Face chips ``[B, 150, 150, 3]`` in [-1, 1] (RGB) -> embeddings ``[B, 128]`` (dlib's scale: not normalised)."""

    blocks: tuple[tuple[int, bool], ...] = BLOCKS
    dim: int = EMBEDDING_DIM
    input_mean: tuple[float, float, float] = (122.782, 117.001, 104.298)

    @nn.compact
    def __call__(self, chips: jax.Array) -> jax.Array:
        pixels = (chips.astype(jnp.float32) + 1.0) * 127.5
        x = (pixels - jnp.asarray(self.input_mean, jnp.float32)) / 256.0
        x = nn.relu(Affine(32, name="affine_in")(_conv(32, 7, 2, "conv_in")(x)))
        x = nn.max_pool(x, (3, 3), (2, 2))
        for index, (features, down) in enumerate(self.blocks):
            x = ResidualBlock(features, down, name=f"block_{index}")(x)
        return nn.Dense(self.dim, use_bias=False, name="embed")(x.mean(axis=(1, 2)))


def params_from_dlib(layers: Sequence[dict], blocks: Sequence[tuple[int, bool]] = BLOCKS) -> dict:
    """Flax params of :class:`DlibFaceResNet` from the per-layer dicts of ``read_metric_network`` (outermost first)."""
    forward = [layer for layer in reversed(layers) if layer["kind"] in ("con", "affine")]
    slots = [("conv_in", "affine_in")] + [
        (f"block_{i}/conv_a", f"block_{i}/affine_a", f"block_{i}/conv_b", f"block_{i}/affine_b")
        for i in range(len(blocks))
    ]
    names = [name for group in slots for name in group]
    if len(forward) != len(names):
        raise FairdiffError(f"the dlib network has {len(forward)} convolution/affine layers, expected {len(names)}")
    params: dict = {}
    for name, layer in zip(names, forward):
        node = params
        for part in name.split("/")[:-1]:
            node = node.setdefault(part, {})
        if layer["kind"] == "con":  # dlib's [out, in, nr, nc] cross-correlation filters -> Flax HWIO
            entry = {"kernel": np.transpose(layer["kernel"], (2, 3, 1, 0)), "bias": layer["bias"]}
        else:
            entry = {"scale": layer["scale"], "bias": layer["bias"]}
        node[name.split("/")[-1]] = entry
    params["embed"] = {"kernel": layers[0]["kernel"]}
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), params)


@dataclasses.dataclass(frozen=True)
class FaceEmbedder:
    """The face-embedding network E with its alignment: ``E(params, images, landmarks)`` -> ``[B, D]``.

    Attributes:
      module: the Flax network.
      identity: names the weights (file name and the first 16 hex digits of its SHA-256): a reference set built with
        another embedder is refused.
      dim: the embedding size.
      chip_size / chip_padding: the 5-point chip the network expects (dlib's 150, 0.25).
    """

    module: DlibFaceResNet
    identity: str
    dim: int = EMBEDDING_DIM
    chip_size: int = DLIB_CHIP_SIZE
    chip_padding: float = DLIB_CHIP_PADDING

    def chips(self, images: jax.Array, landmarks: jax.Array) -> jax.Array:
        """Differentiable face chips ``[B, s, s, 3]`` of ``images [B, H, W, 3]`` from dlib 5-point ``landmarks``."""
        return extract_face_chips(images, landmarks, self.chip_size, self.chip_padding)

    def embed_chips(self, params, chips: jax.Array, *, flip: bool = True) -> jax.Array:
        """``E(chip)`` (+ ``E(mirrored chip)`` when ``flip``, as the authors embed faces) ``[B, D]``, not normalised."""
        embeddings = self.module.apply({"params": params}, chips)
        if flip:
            embeddings = embeddings + self.module.apply({"params": params}, chips[:, :, ::-1])
        return embeddings

    def __call__(self, params, images: jax.Array, landmarks: jax.Array, *, flip: bool = True) -> jax.Array:
        return self.embed_chips(params, self.chips(images, landmarks), flip=flip)


def file_identity(path: str) -> str:
    """``<file stem>:<sha256[:16]>`` of a weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{stem}:{digest.hexdigest()[:16]}"


def load_face_embedder(path: str) -> tuple[FaceEmbedder, dict]:
    """(embedder, Flax params) from dlib's ``dlib_face_recognition_resnet_model_v1.dat`` at ``path``, read without
    dlib. A missing file or one that is not this network raises a one-line FairdiffError."""
    network = read_metric_network(path, dlib_layers())
    if network.input_size != (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE):
        raise FairdiffError(f"'{path}' expects {network.input_size} input chips; only 150x150 is supported")
    module = DlibFaceResNet(input_mean=tuple(float(v) for v in network.input_mean))
    return FaceEmbedder(module, file_identity(path)), params_from_dlib(network.layers)
