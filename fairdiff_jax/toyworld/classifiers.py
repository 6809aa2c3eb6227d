"""Small Flax CNN classifiers for the toy world: protected attributes and the occupation cue.

Both are trained on freshly rendered pictures in which every label is uniform and independent (so the
classifiers carry none of the training data's bias), with extra pixel noise and blur so they also read the
slightly soft pictures a diffusion model draws. The common interface is

    logits, valid = classify(params, images)   # images [B, 8, 8, 3] in [-1, 1]

with ``logits = {"gender": [B, 2], "race": [B, 4], "age": [B, 2], "occupation": [B, 12]}`` (those whose
params are present) and ``valid`` a ``[B]`` bool mask — all True: the toy world needs no face detection.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm.auto import tqdm

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.toyworld import world

ATTRIBUTE_HEADS = tuple((attr, len(names)) for attr, names in world.ATTRIBUTES.items())
CUE_HEADS = (("occupation", len(world.OCCUPATIONS)),)
HEADS = {"attributes": ATTRIBUTE_HEADS, "cue": CUE_HEADS}
PARAMS_FILE = "classifiers.msgpack"


class ToyCNN(nn.Module):
    """Three 3x3 convolutions, one 2x2 pooling, a hidden dense layer, one linear head per label."""

    heads: tuple[tuple[str, int], ...]
    width: int = 32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
        x = nn.relu(nn.Conv(self.width, (3, 3))(images))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
        x = nn.relu(nn.Dense(4 * self.width)(x.reshape(x.shape[0], -1)))
        return {name: nn.Dense(classes, name=f"head_{name}")(x) for name, classes in self.heads}


def _model(kind: str, width: int = 32) -> ToyCNN:
    return ToyCNN(heads=HEADS[kind], width=width)


def classify(params: Mapping, images: jnp.ndarray) -> tuple[dict[str, jnp.ndarray], jnp.ndarray]:
    """Logits per label and the validity mask for ``images [B, 8, 8, 3]`` in [-1, 1]; differentiable.

    ``params`` is ``{"attributes": ..., "cue": ...}`` (either may be absent), as returned by
    :func:`train_classifiers` or :func:`load_classifiers`.
    """
    if images.ndim != 4 or images.shape[1:] != (world.IMAGE_SIZE, world.IMAGE_SIZE, 3):
        raise FairdiffError(
            f"toy classifiers take images [B, {world.IMAGE_SIZE}, {world.IMAGE_SIZE}, 3] (NHWC) in [-1, 1], "
            f"got shape {tuple(images.shape)}; transpose NCHW samples with x.transpose(0, 2, 3, 1)."
        )
    logits = {}
    for kind in HEADS:
        if kind in params:
            width = params[kind]["Conv_0"]["kernel"].shape[-1]
            logits.update(_model(kind, width).apply({"params": params[kind]}, images))
    return logits, jnp.ones(images.shape[:1], bool)


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend a random share of each picture with its 3x3 box blur and add noise of a random strength."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)) / 9.0
    amount = rng.uniform(0.0, 0.5, size=(images.shape[0], 1, 1, 1)) * (rng.random((images.shape[0], 1, 1, 1)) < 0.5)
    sigma = rng.uniform(0.0, 0.12, size=(images.shape[0], 1, 1, 1))
    out = (1 - amount) * images + amount * blurred + sigma * rng.standard_normal(images.shape)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _labelled_batch(batch: int, rng: np.random.Generator, augment: bool) -> tuple[np.ndarray, dict]:
    images, labels = world.sample_balanced_batch(batch, rng)
    return (_augment(images, rng) if augment else images), labels


def train_classifiers(
    *, steps: int = 400, seed: int = 0, batch_size: int = 256, width: int = 32, progress: bool = True
) -> tuple[dict, dict]:
    """Train the attribute and cue classifiers; returns (params, held-out accuracy per label)."""
    rng = np.random.default_rng(seed)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, max(steps, 1), 0.05))
    models = {kind: _model(kind, width) for kind in HEADS}
    probe = jnp.zeros((1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(models))
    params = {kind: model.init(k, probe)["params"] for (kind, model), k in zip(models.items(), keys)}

    def loss_fn(params, images, labels):
        logits, _ = classify(params, images)
        return sum(optax.softmax_cross_entropy_with_integer_labels(v, labels[k]).mean() for k, v in logits.items())

    @jax.jit
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    bar = tqdm(range(steps), desc="toy classifiers", disable=not progress, dynamic_ncols=True)
    for index in bar:
        images, labels = _labelled_batch(batch_size, rng, augment=True)
        params, opt_state, loss = step(params, opt_state, images, labels)
        if index % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    params = jax.tree.map(np.asarray, params)
    return params, evaluate_classifiers(params, seed=seed + 1)


def evaluate_classifiers(params: Mapping, *, seed: int = 1, num_images: int = 4096) -> dict[str, float]:
    """Accuracy per label on freshly rendered (clean, balanced) pictures the classifiers never saw."""
    images, labels = world.sample_balanced_batch(num_images, np.random.default_rng(seed + 10_000))
    predicted = predict(params, images)
    return {k: float(np.mean(v == labels[k])) for k, v in predicted.items()}


def predict(params: Mapping, images: np.ndarray, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Predicted class per label, ``{label: [B] int}``, for many images (in chunks, no gradient)."""
    run = jax.jit(classify)
    chunks = [run(params, images[i : i + batch_size])[0] for i in range(0, images.shape[0], batch_size)]
    return {k: np.concatenate([np.argmax(c[k], -1) for c in chunks]) for k in chunks[0]}


def save_classifiers(folder: str, params: Mapping) -> str:
    """Write ``folder/classifiers.msgpack`` (flax.serialization); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PARAMS_FILE)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(params))))
    return path


def load_classifiers(folder: str, kinds: Sequence[str] = tuple(HEADS)) -> dict:
    """Read the classifier params of a built toy world (``{"attributes": ..., "cue": ...}``)."""
    path = os.path.join(folder, PARAMS_FILE)
    if not os.path.isfile(path):
        raise FairdiffError(
            f"missing toy classifiers {path}; build the toy world with fairdiff_jax.toyworld.ensure_toy_world()."
        )
    try:
        with open(path, "rb") as f:
            params = serialization.msgpack_restore(f.read())
    except Exception as err:
        raise FairdiffError(
            f"cannot read toy classifiers {path} ({err}); delete it and rebuild the toy world."
        ) from err
    missing = [k for k in kinds if k not in params]
    if missing:
        raise FairdiffError(f"toy classifiers {path} lack {missing}; delete the folder and rebuild the toy world.")
    return {k: params[k] for k in kinds}
