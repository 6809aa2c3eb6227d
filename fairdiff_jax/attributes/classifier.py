"""Attribute classifiers: an interface returning logits per attribute and a validity mask, a face-crop wrapper
around any network, and a small multi-head CNN for the toy world and tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairdiff_jax.attributes.faces import FaceDetections, FacePipeline
from fairdiff_jax.errors import FairdiffError


class ClassifierOutput(NamedTuple):
    """``logits``: attribute name -> ``[B, K_a]``; ``valid``: ``[B]`` bool (False: no face, no prediction)."""

    logits: dict[str, jax.Array]
    valid: jax.Array
    detections: FaceDetections | None = None


class AttributeClassifier(Protocol):
    """What the training loop calls: ``classifier(params, images [B, H, W, 3] in [-1, 1]) -> ClassifierOutput``;
    face classifiers also take the ``detections`` of these images when the caller has them already."""

    num_classes: Mapping[str, int]

    def __call__(
        self, params: Any, images: jax.Array, detections: FaceDetections | None = None
    ) -> ClassifierOutput: ...


@dataclasses.dataclass(frozen=True)
class FaceAttributeClassifier:
    """Run ``network(params, crops [B, S, S, 3]) -> {name: [B, K]}`` on the differentiable face crop.

    Detection is gradient-free; gradients of the logits flow through the crop to the image pixels.
    """

    network: Callable[[Any, jax.Array], Mapping[str, jax.Array]]
    num_classes: Mapping[str, int]
    faces: FacePipeline = FacePipeline()

    def __call__(self, params: Any, images: jax.Array, detections: FaceDetections | None = None) -> ClassifierOutput:
        crops = self.faces(images, aligned=False, detections=detections)
        logits = dict(self.network(params, crops.crops))
        for name, k in self.num_classes.items():
            if name not in logits or logits[name].shape[-1] != k:
                got = None if name not in logits else logits[name].shape
                raise FairdiffError(
                    f"classifier network gave logits of shape {got} for attribute '{name}', expected [B, {k}]; "
                    "make the network return one [B, K] logit array per configured attribute."
                )
        return ClassifierOutput(logits, crops.detections.valid, crops.detections)


class MultiHeadConvNet(nn.Module):
    """A small CNN with one linear head per attribute: images ``[B, H, W, 3]`` -> {name: ``[B, K]``}."""

    num_classes: Mapping[str, int]
    features: Sequence[int] = (16, 32)

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        hidden = images
        for width in self.features:
            hidden = nn.Conv(width, (3, 3), strides=(2, 2))(hidden)
            hidden = nn.gelu(hidden)
        pooled = jnp.mean(hidden, axis=(1, 2))
        return {name: nn.Dense(k, name=f"head_{name}")(pooled) for name, k in self.num_classes.items()}
