"""UCE: a closed-form edit of the U-Net's cross-attention key/value projections (Gandikota et al., WACV 2024).

Gandikota, Orgad, Belinkov, Materzyńska, Bau, "Unified Concept Editing in Diffusion Models" (arXiv
2308.14761). For every cross-attention ``to_v`` (and ``to_k``) kernel ``K`` [in, out] (Flax layout) the edit solves

    min_K  lam ||K - K_old||^2 + e sum_i ||c_i K - v*_i||^2 + p sum_j ||c_j K - c_j K_old||^2
    K = (lam I + e sum c_i^T c_i + p sum c_j^T c_j)^-1 (lam K_old + e sum c_i^T v*_i + p sum c_j^T c_j K_old)

over token states ``c_i`` of the edited prompts and ``c_j`` of the preserved ones. For debiasing, the target
of an edited prompt (``"photo of doctor"``) mixes in its attribute prompts (``"photo of male"``, ``"photo of
female"``): ``v* = c K_old + sum_a w_a ||c K_old|| (c_a K_old) / ||c_a K_old||`` (Frobenius norms over the
aligned token block), with ``w_a = 0.1 (1/K - ratio of class a)``. The ratios are measured on images of each
edited prompt after every round, until each is within 0.05 of uniform (at most 30 rounds); each round edits
the current weights. This follows the authors' train-scripts/train_debias.py
(rohitgandikota/unified-concept-editing): edited prompts ``"image of X"``, ``"photo of X"``, ``"portrait of
X"``, ``"picture of X"``, ``"X"``; token rows from the last word to the end, aligned across the prompts;
``lam = 0.5``, ``e = 1``, ``p = 0.1``; keys edited too; an edited prompt whose ratio is reached gets zero
weights and joins the preserved prompts. (Their loop reads ``||c K_old||`` after adding the previous
attributes' terms in place; we use the norm before any addition.) Solved on the host in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.baselines.class_words import DEFAULT_CLASS_WORDS, joint_class_words
from fairdiff_jax.errors import FairdiffError

EDIT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "{}")

# prompts -> (text-encoder states [N, L, D], token ids [N, L])
EmbedFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class UCEConfig:
    """Hyper-parameters of UCE debiasing (defaults: the authors' train_debias.py)."""

    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    edit_keys: bool = True
    templates: Sequence[str] = EDIT_TEMPLATES
    class_words: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CLASS_WORDS))
    weight_step: float = 0.1
    max_ratio_gap: float = 0.05
    max_rounds: int = 30
    measure_images: int = 50  # images per edited prompt and round (the authors: 5 seeds x 10)
    measure_steps: int = 20  # sampler steps of those images (the authors: 20)
    concepts: Sequence[str] = ()  # the edited subjects; empty = the subjects of the training prompts
    preserve: Sequence[str] = ()  # prompts kept unchanged (the authors: the other professions of their list)


@dataclasses.dataclass
class EditRows:
    """One edited prompt: aligned token rows ``[n, D]``, its attribute prompts' ``[A, n, D]``, all states ``[L, D]``."""

    prompt: str
    context: np.ndarray
    attributes: np.ndarray
    full: np.ndarray  # preserved once the prompt's ratio is reached


def cross_attention_modules(unet_params: Mapping, edit_keys: bool = True) -> list[tuple[str, ...]]:
    """Module paths of every cross-attention (``attn2``) ``to_v`` (and ``to_k``) kernel, sorted."""
    names = ("to_v", "to_k") if edit_keys else ("to_v",)
    found = sorted(
        tuple(map(str, p[:-1]))
        for p in flatten_dict(dict(unet_params))
        if str(p[-1]) == "kernel" and len(p) >= 3 and str(p[-3]) == "attn2" and str(p[-2]) in names
    )
    if not found:
        raise FairdiffError(
            "the U-Net has no cross-attention attn2/to_k|to_v kernels; UCE needs a text-conditioned U-Net."
        )
    return found


def last_word_index(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """``[N]`` position of each prompt's last word token (the one before the first end-of-text token)."""
    ids = np.asarray(ids)
    is_eos = ids == int(eos_token_id)
    if not is_eos[:, 1:].any(axis=1).all():
        raise FairdiffError("a UCE prompt has no end-of-text token (it was truncated); shorten the prompts.")
    return np.argmax(is_eos[:, 1:], axis=1)  # first eos after bos, minus one


def edit_rows(
    embed: EmbedFn, concepts: Sequence[str], attributes: Sequence[str], eos_token_id: int, config: UCEConfig
) -> list[EditRows]:
    """Token rows of every (concept, template) edit and its attribute prompts, aligned from the last word on."""
    words = joint_class_words(attributes, config.class_words, "UCE")
    rows = []
    for concept in concepts:
        for template in config.templates:
            prompts = [template.format(concept)] + [template.format(w) for w in words]
            hidden, ids = embed(prompts)
            hidden = np.asarray(jax.device_get(hidden), np.float64)
            last = last_word_index(ids, eos_token_id)
            count = hidden.shape[1] - int(last.max())  # rows from each last word, as many as all prompts have
            block = np.stack([hidden[k, last[k] : last[k] + count] for k in range(len(prompts))])
            rows.append(EditRows(prompt=prompts[0], context=block[0], attributes=block[1:], full=hidden[0]))
    return rows


def closed_form_kernel(
    kernel: np.ndarray,
    edit_context: Sequence[np.ndarray],
    edit_targets: Sequence[np.ndarray],
    preserve_context: Sequence[np.ndarray],
    config: UCEConfig,
) -> np.ndarray:
    """The minimiser ``K`` [in, out] of the UCE objective (module docstring) for one kernel, float64."""
    kernel = np.asarray(kernel, np.float64)
    lhs = config.lam * np.eye(kernel.shape[0])
    rhs = config.lam * kernel
    for context, target in zip(edit_context, edit_targets):
        lhs += config.erase_scale * context.T @ context
        rhs += config.erase_scale * context.T @ target
    for context in preserve_context:
        lhs += config.preserve_scale * context.T @ context
        rhs += config.preserve_scale * context.T @ (context @ kernel)
    return np.linalg.solve(lhs, rhs)


def debias_targets(kernel: np.ndarray, rows: EditRows, weights: np.ndarray) -> np.ndarray:
    """``v* = c K + sum_a w_a ||c K|| (c_a K) / ||c_a K||`` ``[n, out]`` for one edit and its attribute weights."""
    kernel = np.asarray(kernel, np.float64)
    values = rows.context @ kernel
    scale = np.linalg.norm(values)
    target = values.copy()
    for weight, attribute in zip(np.asarray(weights, np.float64), rows.attributes):
        direction = attribute @ kernel
        target += weight * scale * direction / np.linalg.norm(direction)
    return target


def uce_edit(
    unet_params: Mapping,
    rows: Sequence[EditRows],
    weights: Mapping[str, np.ndarray],
    preserve: Sequence[np.ndarray],
    config: UCEConfig = UCEConfig(),
) -> dict:
    """One UCE edit of every cross-attention key/value kernel; ``weights[prompt]`` ``[A]``, ``preserve`` ``[L, D]``s.

    Returns a new parameter tree (kernels in their original dtype); every other parameter is unchanged.
    """
    flat = flatten_dict(dict(unet_params))
    for module in cross_attention_modules(unet_params, config.edit_keys):
        kernel = np.asarray(jax.device_get(flat[module + ("kernel",)]), np.float64)
        targets = [debias_targets(kernel, r, weights[r.prompt]) for r in rows]
        edited = closed_form_kernel(kernel, [r.context for r in rows], targets, preserve, config)
        flat[module + ("kernel",)] = edited.astype(flat[module + ("kernel",)].dtype)
    return unflatten_dict(flat)


def uce_debias(
    unet_params: Mapping,
    rows: Sequence[EditRows],
    preserve: Sequence[np.ndarray],
    measure: Callable[[Mapping, Sequence[str]], Mapping[str, np.ndarray]],
    config: UCEConfig = UCEConfig(),
) -> tuple[dict, list[dict]]:
    """The authors' loop: measure class ratios, edit with ``w = step (uniform - ratio)``, repeat until fair.

    ``measure(params, prompts) -> {prompt: ratios [A]}`` generates and classifies images of the edited prompts
    that still need it (the others keep their last ratios); a prompt whose ratio is reached gets zero weights
    and joins the preserved prompts. Returns the edited parameters and one record per round.
    """
    preserve, ratios, history = list(preserve), {}, []
    reached: set[str] = set()
    params = dict(unet_params)
    for _ in range(int(config.max_rounds)):
        pending = [r.prompt for r in rows if r.prompt not in reached]
        ratios.update({p: np.asarray(v, np.float64) for p, v in measure(params, pending).items()})
        gaps = {p: float(np.abs(r - 1.0 / len(r)).max()) for p, r in ratios.items()}
        history.append({"ratios": {p: r.tolist() for p, r in ratios.items()}, "gaps": gaps})
        if max(gaps.values()) < config.max_ratio_gap:
            break
        weights = {}
        for row in rows:
            ratio = ratios[row.prompt]
            if gaps[row.prompt] < config.max_ratio_gap:
                weights[row.prompt] = np.zeros(len(ratio))
                if row.prompt not in reached:
                    reached.add(row.prompt)
                    preserve.append(row.full)
            else:
                weights[row.prompt] = config.weight_step * (1.0 / len(ratio) - ratio)
        history[-1]["weights"] = {p: w.tolist() for p, w in weights.items()}
        params = uce_edit(params, rows, weights, preserve, config)
    return params, history
