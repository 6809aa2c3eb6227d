"""debiasVL: a calibrated projection of the prompt embedding (Chuang et al., 2023).

Chuang, Jampani, Li, Torralba, Jegelka, "Debiasing Vision-Language Models via Biased Prompts" (arXiv
2302.00070). With ``z`` the L2-normalised end-of-text embedding of a prompt, biased directions are removed by

    P0 = I - V (V^T V)^-1 V^T                         (V: embeddings of the spurious prompts, "a photo of a male")
    P* = argmin_P ||P - P0||^2 + lam / |S| sum_(i,j in S) ||P z_i - P z_j||^2 = P0 (I + lam M)^-1,
    M  = 1/|S| sum_(i,j in S) (z_i - z_j)(z_i - z_j)^T

where the pairs ``S`` are prompts that differ only in the attribute ("a photo of a male doctor." / "a photo of
a female doctor."). For text-to-image generation the authors' code (chingyaoc/debias_vl, generative/main.py)
uses the calibration alone (``P0 = I``), ``lam = 500``, the template ``"A photo of a {male|female} {class}."``
and applies ``h @ P*^T`` to every token state ``h`` of the conditional prompt's text-encoder output; the
unconditional embedding is left alone. Those are the defaults here; giving ``spurious_template`` adds ``P0``.
The projection is computed once on the host in float64.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.baselines.class_words import DEFAULT_CLASS_WORDS, joint_class_words
from fairdiff_jax.errors import FairdiffError


@dataclasses.dataclass(frozen=True)
class DebiasVLConfig:
    """Hyper-parameters of debiasVL (defaults: the authors' text-to-image script)."""

    lam: float = 500.0
    template: str = "A photo of a {word} {concept}."
    class_words: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CLASS_WORDS))
    spurious_template: str = ""  # e.g. "A photo of a {word}." adds the orthogonal projection P0; "" = P0 = I
    concepts: Sequence[str] = ()  # the calibration subjects; empty = the subjects of the training prompts


def candidate_prompts(
    concepts: Sequence[str], attributes: Sequence[str], config: DebiasVLConfig = DebiasVLConfig()
) -> tuple[list[str], list[tuple[int, int]]]:
    """The positive-pair prompts (one per concept and joint class) and the index pairs ``S`` within each concept."""
    words = joint_class_words(attributes, config.class_words, "debiasVL")
    prompts, pairs = [], []
    for concept in concepts:
        start = len(prompts)
        prompts += [config.template.format(word=w, concept=concept) for w in words]
        pairs += [(start + i, start + j) for i, j in itertools.combinations(range(len(words)), 2)]
    if not pairs:
        raise FairdiffError("debiasVL needs at least one concept and two classes to form positive pairs.")
    return prompts, pairs


def spurious_prompts(attributes: Sequence[str], config: DebiasVLConfig) -> list[str]:
    """Prompts naming only the attribute (``config.spurious_template``); empty when P0 is not used."""
    if not config.spurious_template:
        return []
    return [
        config.spurious_template.format(word=w) for w in joint_class_words(attributes, config.class_words, "debiasVL")
    ]


def eos_embeddings(hidden: jax.Array, ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """``[B, D]`` float64: the text-encoder state ``hidden`` ``[B, L, D]`` at each prompt's first end-of-text token."""
    ids = np.asarray(ids)
    is_eos = ids == int(eos_token_id)
    if not is_eos.any(axis=1).all():
        raise FairdiffError("a prompt has no end-of-text token (it was truncated); shorten the debiasVL prompts.")
    position = np.argmax(is_eos, axis=1)
    return np.asarray(jax.device_get(hidden), np.float64)[np.arange(ids.shape[0]), position]


def _normalise(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def pair_scatter(embeddings: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """``M = 1/|S| sum (z_i - z_j)(z_i - z_j)^T`` ``[D, D]`` over the normalised embeddings ``[N, D]``."""
    z = _normalise(np.asarray(embeddings, np.float64))
    index = np.asarray(pairs, np.int64)
    diff = z[index[:, 0]] - z[index[:, 1]]
    return diff.T @ diff / len(index)


def orthogonal_complement(spurious: np.ndarray | None, dim: int) -> np.ndarray:
    """``P0 = I - V (V^T V)^-1 V^T`` ``[D, D]``: removes the span of the normalised spurious embeddings ``[S, D]``."""
    if spurious is None or len(spurious) == 0:
        return np.eye(dim)
    _, singular, vt = np.linalg.svd(_normalise(np.asarray(spurious, np.float64)), full_matrices=False)
    basis = vt[singular > singular[0] * 1e-10]  # orthonormal rows spanning the spurious directions
    return np.eye(dim) - basis.T @ basis


def calibrated_projection(
    candidates: np.ndarray, pairs: Sequence[tuple[int, int]], lam: float, spurious: np.ndarray | None = None
) -> np.ndarray:
    """``P* = P0 (I + lam M)^-1`` ``[D, D]`` float64 from candidate embeddings ``[N, D]`` (and spurious ``[S, D]``)."""
    if float(lam) < 0:
        raise FairdiffError(f"debiasVL's lam must be >= 0 (got {lam}); the authors use 500.")
    dim = np.shape(candidates)[1]
    gram = np.eye(dim) + float(lam) * pair_scatter(candidates, pairs)
    # P0 G^-1 = (G^-1 P0^T)^T and G is symmetric
    return np.linalg.solve(gram, orthogonal_complement(spurious, dim).T).T


def project_embeddings(cond_emb: jax.Array, projection: np.ndarray | jax.Array) -> jax.Array:
    """Every token state of the conditional embedding ``[B, L, D]`` mapped by ``h -> P h`` (``h @ P^T``)."""
    projection = jnp.asarray(projection, jnp.float32)
    out = jnp.einsum("bld,ed->ble", cond_emb.astype(jnp.float32), projection, precision=jax.lax.Precision.HIGHEST)
    return out.astype(cond_emb.dtype)
