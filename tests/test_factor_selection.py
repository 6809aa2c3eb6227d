"""factor1 selection against the paper authors' rules (sail-sg/finetune-fair-diffusion, ``gen_dynamic_weights``).

The reference below restates, image by image, the branches of ``gen_dynamic_weights`` in
exp-1-debias-gender/1-main-debias.py (one attribute; exp-2 and exp-6 are the same),
exp-3-debias-gender-race/1-main-debias.py (two) and exp-4-debias-gender-race-age/1-main-debias.py (three).
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.alignment.semantic import mismatch_factor
from fairdiff_jax.errors import FairdiffError

PAPER = {"gender": 0.2, "race": 0.6, "age": 0.6}  # PAPER.md factor1 per attribute


def authors_factor(face: bool, targets: dict, originals: dict, factors: dict) -> float:
    """One image, written as the authors' if/elif chains."""
    names = list(targets)
    if len(names) == 1:
        (name,) = names
        if not face:
            return 1.0
        if targets[name] == -1:
            return factors[name]
        return 1.0 if targets[name] == originals[name] else factors[name]
    if not face:
        return min(factors[n] for n in names)
    differing = [factors[n] for n in names if targets[n] != originals[n]]
    return min(differing) if differing else 1.0


def factors_of(face, targets, originals, factors=PAPER):
    labels = {n: jnp.asarray([v]) for n, v in targets.items()}
    original = {n: jnp.asarray([v]) for n, v in originals.items()}
    chosen = {n: factors[n] for n in targets}
    return float(mismatch_factor(labels, original, jnp.asarray([face]), chosen)[0])


@pytest.mark.parametrize(
    "face, target, original, want",
    [(False, 1, 0, 1.0), (False, -1, -1, 1.0), (True, -1, 0, 0.2), (True, -1, -1, 0.2), (True, 1, 1, 1.0),
     (True, 1, 0, 0.2), (True, 0, -1, 0.2)],
)  # fmt: skip
def test_one_attribute_cases(face, target, original, want):
    assert factors_of(face, {"gender": target}, {"gender": original}) == pytest.approx(want)


@pytest.mark.parametrize(
    "face, targets, originals, want",
    [
        (True, (1, 2), (0, 2), 0.2),  # gender-only mismatch
        (True, (1, 2), (1, 3), 0.6),  # race-only mismatch
        (True, (1, 2), (0, 3), 0.2),  # both: the minimum over the mismatched
        (True, (1, 2), (1, 2), 1.0),  # none
        (False, (1, 2), (0, 3), 0.2),  # no face: the minimum of all factors
        (True, (-1, 2), (-1, 2), 1.0),  # an uncertain target against an original without a face agrees there
        (True, (-1, 2), (0, 2), 0.2),  # an uncertain gender target counts as a gender mismatch
    ],
)
def test_gender_x_race_cases(face, targets, originals, want):
    got = factors_of(face, dict(zip(("gender", "race"), targets)), dict(zip(("gender", "race"), originals)))
    assert got == pytest.approx(want)


def test_gender_x_race_x_age_cases():
    names = ("gender", "race", "age")
    for targets, originals, want in [
        ((1, 2, 0), (1, 2, 1), 0.6),  # age only
        ((1, 2, 0), (0, 2, 1), 0.2),  # gender and age
        ((1, 2, 0), (1, 3, 1), 0.6),  # race and age
        ((1, 2, 0), (1, 2, 0), 1.0),
    ]:
        assert factors_of(True, dict(zip(names, targets)), dict(zip(names, originals))) == pytest.approx(want)
    assert factors_of(False, dict(zip(names, (1, 2, 0))), dict(zip(names, (1, 2, 0)))) == pytest.approx(0.2)


@pytest.mark.parametrize("names", [("gender",), ("race",), ("gender", "race"), ("gender", "race", "age")])
def test_every_combination_against_the_authors_branches(names):
    classes = {"gender": 2, "race": 4, "age": 2}
    factors = {"gender": 0.2, "race": 0.6, "age": 0.45}
    rows = list(
        itertools.product(
            [False, True], *[range(-1, classes[n]) for n in names], *[range(-1, classes[n]) for n in names]
        )
    )
    faces = np.array([r[0] for r in rows])
    k = len(names)
    targets = {n: np.array([r[1 + i] for r in rows]) for i, n in enumerate(names)}
    originals = {n: np.array([r[1 + k + i] for r in rows]) for i, n in enumerate(names)}
    got = np.asarray(mismatch_factor(targets, originals, faces, {n: factors[n] for n in names}))
    want = [
        authors_factor(bool(r[0]), dict(zip(names, r[1 : 1 + k])), dict(zip(names, r[1 + k :])), factors) for r in rows
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_no_face_override_and_errors():
    got = mismatch_factor({"gender": jnp.array([1])}, {"gender": jnp.array([0])}, jnp.array([False]), {"gender": 0.2})
    assert float(got[0]) == 1.0
    two = ({"gender": jnp.array([1]), "race": jnp.array([0])}, {"gender": jnp.array([0]), "race": jnp.array([0])})
    assert float(mismatch_factor(*two, jnp.array([False]), {"gender": 0.2, "race": 0.3}, no_face=1.0)[0]) == 1.0
    with pytest.raises(FairdiffError, match="one factor"):
        mismatch_factor(*two, jnp.array([True]), {"gender": 0.2})
