"""Semantics-preservation metrics of evaluation (DESIGN.md §1.4, the paper's Tables 1/5/6).

- CLIP-T: cosine between the CLIP image embedding of a generated image and the CLIP text embedding of its prompt.
- CLIP-I: cosine between the CLIP image embeddings of the adapted model's image and the original model's image
  made from the same noise (evaluation noise is fixed per prompt, so image i of a prompt pairs up across models).
- DINO: the same with DINOv2 CLS embeddings (``pooler_output``).

Each is averaged over a prompt's images; the reported value is the mean over prompts of those per-prompt means,
with the standard deviation over prompts (``std``) as for the bias metrics, and over all images (``std_images``).
Evaluation encoders (``eval.clip_path``, ``eval.dino_path``) are separate from the training-loss ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax import parallel
from fairdiff_jax.attributes.clip_text import TextEncoder, clip_text_encoder_from_state
from fairdiff_jax.attributes.vision_features import (
    ImageEncoder,
    clip_image_encoder_from_state,
    load_dinov2_encoder,
    read_hf_folder,
)

log = logging.getLogger(__name__)

# table column -> metrics.json key
SEMANTIC_COLUMNS = {"CLIP-T": "clip_t", "CLIP-I": "clip_i", "DINO": "dino"}


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``a [N, D]`` and ``b [N, D]`` (or ``[1, D]``, broadcast) -> ``[N]`` float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12)


def summarise(per_prompt: Sequence[np.ndarray]) -> dict:
    """``{"mean", "std", "std_images", "per_prompt"}`` of per-image scores, one ``[M]`` array per prompt."""
    means = np.array([float(np.mean(v)) for v in per_prompt])
    every = np.concatenate([np.ravel(v) for v in per_prompt])
    return {
        "mean": float(means.mean()),
        "std": float(means.std()),
        "std_images": float(every.std()),
        "per_prompt": [float(m) for m in means],
    }


def semantic_metrics(
    image_embeds: Sequence[Mapping[str, np.ndarray]],
    text_embeds: np.ndarray | None = None,
    original_embeds: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> dict:
    """CLIP-T / CLIP-I / DINO from embeddings; only those whose inputs are present are returned.

    Args:
      image_embeds: per prompt, ``{"clip": [M, D], "dino": [M, E]}`` of one model's images (either key optional).
      text_embeds: ``[P, D]`` CLIP text embeddings of the prompts, in the same order (for CLIP-T).
      original_embeds: the original model's image embeddings, same layout and order (for CLIP-I and DINO).
    Returns: ``{"clip_t" | "clip_i" | "dino": summarise(...)}``.
    """
    out = {}
    if text_embeds is not None and image_embeds and all("clip" in e for e in image_embeds):
        if len(text_embeds) != len(image_embeds):
            raise ValueError(f"{len(text_embeds)} text embeddings for {len(image_embeds)} prompts")
        out["clip_t"] = summarise([cosine_similarity(e["clip"], t[None]) for e, t in zip(image_embeds, text_embeds)])
    if original_embeds is not None:
        if len(original_embeds) != len(image_embeds):
            raise ValueError(f"{len(original_embeds)} original prompts for {len(image_embeds)} adapted ones")
        for key, name in (("clip", "clip_i"), ("dino", "dino")):
            if all(key in e for e in image_embeds) and all(key in o for o in original_embeds):
                pairs = zip(image_embeds, original_embeds)
                out[name] = summarise([cosine_similarity(e[key], o[key]) for e, o in pairs])
    return out


@dataclasses.dataclass
class SemanticScorer:
    """Frozen evaluation encoders; any may be absent. Embeddings are computed in fixed-size jitted batches."""

    clip: ImageEncoder | None = None
    clip_text: TextEncoder | None = None
    dino: ImageEncoder | None = None
    batch_size: int = 32
    _fns: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def _encoders(self) -> dict[str, ImageEncoder]:
        return {name: enc for name, enc in (("clip", self.clip), ("dino", self.dino)) if enc is not None}

    def _embed_fn(self, name: str, encoder: ImageEncoder):
        if name not in self._fns:
            mesh = parallel.make_mesh()
            batch = max(mesh.size, self.batch_size // mesh.size * mesh.size)

            def embed(params, images_uint8):
                images = images_uint8.astype(jnp.float32) / 127.5 - 1.0
                return jax.lax.stop_gradient(encoder.apply(params, images))

            self._fns[name] = (jax.jit(embed), parallel.replicate(encoder.params, mesh), mesh, batch)
        return self._fns[name]

    def embed_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``{"clip": [M, D], "dino": [M, E]}`` (the loaded encoders only) of uint8 images ``[M, H, W, 3]``."""
        images = np.asarray(images)
        out = {}
        for name, encoder in self._encoders().items():
            embed, params, mesh, batch = self._embed_fn(name, encoder)
            chunks = []
            for start in range(0, images.shape[0], batch):
                chunk = images[start : start + batch]
                real = chunk.shape[0]
                padded = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
                chunks.append(np.asarray(embed(params, parallel.shard_batch(padded, mesh)))[:real])
            out[name] = np.concatenate(chunks).astype(np.float32)
        return out

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray | None:
        """CLIP text embeddings ``[P, D]`` of ``prompts`` (None without a CLIP folder)."""
        return None if self.clip_text is None else self.clip_text(prompts)


def load_semantic_scorer(clip_path: str = "", dino_path: str = "", *, batch_size: int = 32) -> SemanticScorer | None:
    """Encoders from local folders: a CLIPModel folder (both towers and its tokenizer) and/or a Dinov2Model folder.

    Returns None when both paths are empty. Missing or malformed folders raise ``FairdiffError``.
    """
    if not clip_path and not dino_path:
        return None
    scorer = SemanticScorer(batch_size=batch_size)
    if clip_path:
        config, state = read_hf_folder(clip_path, "CLIP")
        scorer.clip = clip_image_encoder_from_state(config, state, clip_path)
        if config.get("model_type") == "clip_vision_model":
            log.warning("CLIP folder %s has no text tower: CLIP-I only, no CLIP-T (give a CLIPModel folder)", clip_path)
        else:
            scorer.clip_text = clip_text_encoder_from_state(config, state, clip_path)
    if dino_path:
        scorer.dino = load_dinov2_encoder(dino_path)
    return scorer


def embed_results(scorer: SemanticScorer, results: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Per prompt, the image embeddings of ``results`` as from ``evaluate.generate_prompt_set``."""
    return [scorer.embed_images(record["images"]) for record in results]
