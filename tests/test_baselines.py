"""Ethical intervention, debiasVL and UCE against independent references.

- ethical intervention: the prompts Bansal et al.'s ENTIGEN files spell out;
- debiasVL: the calibrated projection vs numpy least squares on the objective it minimises, the end-of-text
  position vs transformers' pooled output, and the authors' candidate prompts;
- UCE: the closed form vs numpy least squares on its objective, the last-word index vs the authors'
  ``attention_mask.sum() - 2``, and the edit loop's rule ``w = 0.1 (uniform - ratio)``.
"""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fairdiff_jax import baselines as B
from fairdiff_jax.baselines import uce
from fairdiff_jax.errors import FairdiffError

# ------------------------------------------------------------------------------------ ethical intervention


def test_ethical_intervention_appends_the_entigen_clause():
    prompts = ["a photo of a doctor", "A photo of the face of a firefighter, a person"]
    assert B.intervene(prompts[:1], ["gender"]) == [
        "a photo of a doctor if all individuals can be a doctor irrespective of their gender"
    ]
    assert B.intervene(prompts[1:], ["race"]) == [
        "A photo of the face of a firefighter, a person if all individuals can be a firefighter irrespective of "
        "their race"
    ]
    both = B.intervene(prompts, ["gender", "race"])
    assert all(p.endswith("irrespective of their gender and race") for p in both)
    assert B.intervene(["a photo of a nurse"], ["gender"], subjects=["medical nurse"])[0].endswith(
        "can be a medical nurse irrespective of their gender"
    )


def test_ethical_intervention_errors_name_the_fix():
    with pytest.raises(FairdiffError, match="axis_words"):
        B.intervene(["a photo of a doctor"], ["age"])
    with pytest.raises(FairdiffError, match="subject_pattern"):
        B.intervene(["doctors at work"], ["gender"])


# ------------------------------------------------------------------------------------------------ debiasVL


def _embed(tiny_sd, prompts):
    ids = np.asarray(
        tiny_sd.tokenizer(list(prompts), padding="max_length", max_length=16, truncation=True).input_ids, np.int32
    )
    out = tiny_sd.text_encoder(ids, params=tiny_sd.text_encoder_params)
    return out, ids


def test_candidate_prompts_follow_the_authors_template():
    prompts, pairs = B.candidate_prompts(["doctor", "nurse"], ["gender"])
    assert prompts == [
        "A photo of a female doctor.",
        "A photo of a male doctor.",
        "A photo of a female nurse.",
        "A photo of a male nurse.",
    ]
    assert pairs == [(0, 1), (2, 3)]
    prompts, pairs = B.candidate_prompts(["judge"], ["race"])
    assert len(prompts) == 4 and len(pairs) == 6  # every pair of the four race classes


@pytest.mark.parametrize("lam", [3.0, 500.0])
@pytest.mark.parametrize("with_spurious", [False, True])
def test_calibrated_projection_minimises_its_objective(lam, with_spurious):
    rng = np.random.default_rng(0)
    dim, count = 12, 10
    candidates = rng.normal(size=(2 * count, dim))
    pairs = [(2 * i, 2 * i + 1) for i in range(count)]
    spurious = rng.normal(size=(3, dim)) if with_spurious else None
    ours = B.calibrated_projection(candidates, pairs, lam, spurious)

    # reference: P0 as a least-squares residual map, then min ||P - P0||^2 + lam/|S| sum ||P (z_i - z_j)||^2
    # written as one stacked least-squares problem in P^T
    eye = np.eye(dim)
    if spurious is None:
        p0 = eye
    else:
        basis = (spurious / np.linalg.norm(spurious, axis=1, keepdims=True)).T  # [D, S]
        p0 = eye - basis @ np.linalg.lstsq(basis, eye, rcond=None)[0]
    z = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    diffs = np.stack([z[i] - z[j] for i, j in pairs])  # [S, D]
    lhs = np.concatenate([eye, np.sqrt(lam / len(pairs)) * diffs])
    rhs = np.concatenate([p0.T, np.zeros((len(pairs), dim))])
    reference = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    np.testing.assert_allclose(ours, reference, atol=1e-9)
    if spurious is not None:
        np.testing.assert_allclose(B.orthogonal_complement(spurious, dim) @ spurious.T, 0.0, atol=1e-12)


def test_eos_embedding_is_the_text_encoders_pooled_output(tiny_sd):
    out, ids = _embed(tiny_sd, ["a photo of a doctor", "a nurse", ""])
    ours = B.eos_embeddings(out.last_hidden_state, ids, tiny_sd.tokenizer.eos_token_id)
    np.testing.assert_allclose(ours, np.asarray(out.pooler_output), atol=1e-6)


def test_projection_shrinks_the_gender_difference_of_every_concept(tiny_sd):
    concepts = ["doctor", "nurse", "teacher", "pilot"]
    prompts, pairs = B.candidate_prompts(concepts, ["gender"])
    out, ids = _embed(tiny_sd, prompts)
    eos = tiny_sd.tokenizer.eos_token_id
    projection = B.calibrated_projection(B.eos_embeddings(out.last_hidden_state, ids, eos), pairs, lam=500.0)
    projected = B.project_embeddings(out.last_hidden_state, projection)
    assert projected.shape == out.last_hidden_state.shape
    before = B.eos_embeddings(out.last_hidden_state, ids, eos)
    after = B.eos_embeddings(projected, ids, eos)
    np.testing.assert_allclose(after, before @ projection.T, rtol=1e-4, atol=1e-4)
    for i, j in pairs:
        gap_before = np.linalg.norm(before[i] - before[j]) / np.linalg.norm(before[i])
        gap_after = np.linalg.norm(after[i] - after[j]) / np.linalg.norm(after[i])
        assert gap_after < 0.1 * gap_before


# ----------------------------------------------------------------------------------------------------- UCE


def test_closed_form_minimises_the_uce_objective():
    rng = np.random.default_rng(1)
    fan_in, fan_out = 10, 6
    kernel = rng.normal(size=(fan_in, fan_out))
    edits = [rng.normal(size=(3, fan_in)) for _ in range(2)]
    targets = [rng.normal(size=(3, fan_out)) for _ in range(2)]
    preserve = [rng.normal(size=(4, fan_in)) for _ in range(3)]
    config = B.UCEConfig(lam=0.5, erase_scale=1.0, preserve_scale=0.1)
    ours = B.closed_form_kernel(kernel, edits, targets, preserve, config)
    # reference: lam ||K - K0||^2 + e sum ||C K - V||^2 + p sum ||C_p K - C_p K0||^2 as stacked least squares
    lhs = [np.sqrt(config.lam) * np.eye(fan_in)] + [np.sqrt(config.erase_scale) * c for c in edits]
    rhs = [np.sqrt(config.lam) * kernel] + [np.sqrt(config.erase_scale) * v for v in targets]
    lhs += [np.sqrt(config.preserve_scale) * c for c in preserve]
    rhs += [np.sqrt(config.preserve_scale) * c @ kernel for c in preserve]
    reference = np.linalg.lstsq(np.concatenate(lhs), np.concatenate(rhs), rcond=None)[0]
    np.testing.assert_allclose(ours, reference, atol=1e-10)


def test_last_word_index_is_the_authors_mask_rule(tiny_sd):
    prompts = ["photo of doctor", "doctor", "portrait of female", ""]
    tokens = tiny_sd.tokenizer(prompts, padding="max_length", max_length=16, truncation=True)
    ours = uce.last_word_index(np.asarray(tokens.input_ids), tiny_sd.tokenizer.eos_token_id)
    np.testing.assert_array_equal(ours, np.asarray(tokens.attention_mask).sum(axis=1) - 2)


@pytest.fixture(scope="module")
def uce_rows(tiny_sd):
    def embed(prompts):
        out, ids = _embed(tiny_sd, prompts)
        return np.asarray(out.last_hidden_state), ids

    rows = B.edit_rows(embed, ["doctor", "nurse"], ["gender"], tiny_sd.tokenizer.eos_token_id, B.UCEConfig())
    preserve = list(embed(["photo of teacher", "pilot"])[0])
    return rows, preserve


def test_uce_edit_reaches_its_targets_and_touches_only_cross_attention(tiny_sd, uce_rows):
    rows, preserve = uce_rows
    assert [r.prompt for r in rows[:5]] == [t.format("doctor") for t in uce.EDIT_TEMPLATES]
    assert all(r.context.shape[0] == r.attributes.shape[1] and r.attributes.shape[0] == 2 for r in rows)
    weights = {r.prompt: np.asarray([0.3, -0.3]) for r in rows}
    config = B.UCEConfig(lam=1e-4, preserve_scale=1e-4)
    edited = flatten_dict(B.uce_edit(tiny_sd.unet_params, rows, weights, preserve, config))
    frozen = flatten_dict(tiny_sd.unet_params)
    modules = set(B.cross_attention_modules(tiny_sd.unet_params))
    assert {m[-1] for m in modules} == {"to_k", "to_v"} and all(m[-2] == "attn2" for m in modules)
    for path, value in frozen.items():
        if path[:-1] in modules:
            old, new = np.asarray(value, np.float64), np.asarray(edited[path], np.float64)
            assert np.abs(new - old).max() > 1e-3
            # with little regularisation the edit comes close to the least-squares fit of the edited rows
            context = np.concatenate([r.context for r in rows])
            target = np.concatenate([uce.debias_targets(old, r, weights[r.prompt]) for r in rows])
            fit = np.linalg.lstsq(context, target, rcond=None)[0]
            before, after = np.linalg.norm(context @ old - target), np.linalg.norm(context @ new - target)
            best = np.linalg.norm(context @ fit - target)
            print(
                f"{'/'.join(path[-3:-1])}: edited-row residual {before:.3f} -> {after:.3f} (least squares {best:.3f})"
            )
            assert after < 0.5 * before and after < 1.25 * best  # the gap is the 1e-4 regularisation
        else:
            np.testing.assert_array_equal(np.asarray(edited[path]), np.asarray(value))


def test_uce_debias_loop_follows_the_authors_weight_rule(tiny_sd, uce_rows):
    rows, preserve = uce_rows
    prompts = [r.prompt for r in rows]
    calls = []

    def measure(params, pending):
        calls.append(list(pending))
        if len(calls) == 1:  # first round: doctor prompts skewed, nurse prompts already fair
            return {p: ([0.1, 0.9] if "doctor" in p else [0.52, 0.48]) for p in pending}
        return {p: [0.49, 0.51] for p in pending}

    params, history = B.uce_debias(tiny_sd.unet_params, rows, preserve, measure)
    assert len(history) == 2 and calls[0] == prompts
    assert calls[1] == [p for p in prompts if "doctor" in p]  # reached prompts are not measured again
    expected_weights = {p: ([0.04, -0.04] if "doctor" in p else [0.0, 0.0]) for p in prompts}
    assert sorted(history[0]["weights"]) == sorted(prompts)
    for prompt, weight in expected_weights.items():
        np.testing.assert_allclose(history[0]["weights"][prompt], weight, atol=1e-12)
    nurse_full = [r.full for r in rows if "nurse" in r.prompt]
    weights = {p: np.asarray(w) for p, w in expected_weights.items()}
    expected = B.uce_edit(tiny_sd.unet_params, rows, weights, preserve + nurse_full)
    for ours, theirs in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
