"""Bias measures against independent references, the fair-sample floor, writers, grids and the guards."""

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fairdiff_jax import FairdiffError
from fairdiff_jax.images import PALETTE, image_grid, save_image_grid
from fairdiff_jax.metrics import (
    bias_from_freq,
    bias_from_labels,
    class_frequencies,
    fair_bias_floor,
    intersection_labels,
)
from fairdiff_jax.reporting import MetricsWriter, compile_with_stats, progress_bar, read_metrics
from fairdiff_jax.train import NonFiniteGuard
from fairdiff_jax.train_step import all_finite, keep_if_finite


def pairwise_bias_loop(freq):
    """Reference: the definition written as an explicit double loop."""
    pairs = list(itertools.combinations(range(len(freq)), 2))
    return sum(abs(freq[i] - freq[j]) for i, j in pairs) / len(pairs)


def test_bias_from_freq_matches_definition():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 8):
        freq = rng.dirichlet(np.ones(k), size=5)
        np.testing.assert_allclose(np.asarray(bias_from_freq(freq)), [pairwise_bias_loop(f) for f in freq], rtol=1e-6)
    assert float(bias_from_freq(np.array([1.0, 0.0]))) == 1.0  # all one gender
    assert float(bias_from_freq(np.array([0.25] * 4))) == 0.0
    # Paper's scale: all images of one race out of 4 gives bias 0.5.
    assert float(bias_from_freq(np.array([1.0, 0, 0, 0]))) == pytest.approx(0.5)


def test_frequencies_ignore_invalid_images():
    labels = np.array([0, 1, 1, -1, 1, 0])
    valid = np.array([True, True, True, True, False, True])
    np.testing.assert_allclose(np.asarray(class_frequencies(labels, 2, valid)), [0.5, 0.5])
    np.testing.assert_allclose(np.asarray(class_frequencies(labels, 2)), [0.4, 0.6])
    assert float(bias_from_labels(labels, 2, valid)) == 0.0
    assert np.isnan(np.asarray(class_frequencies(np.array([-1, -1]), 2))).all()
    batched = class_frequencies(np.array([[0, 0, 1, 1], [2, 2, 2, 0]]), 3)  # [prompts, images]
    np.testing.assert_allclose(np.asarray(batched), [[0.5, 0.5, 0], [0.25, 0, 0.75]])


def test_intersection_labels_enumerate_joint_classes():
    gender = np.array([0, 1, 0, 1, -1])
    race = np.array([0, 0, 3, 3, 2])
    joint = np.asarray(intersection_labels([gender, race], [2, 4]))
    assert joint.tolist() == [0, 4, 3, 7, -1]


def test_fair_floor_exact_matches_binomial_and_monte_carlo():
    # Binary: exact E|2k/M - 1| for k ~ Binomial(M, 1/2), summed independently with math.comb.
    for m in (1, 7, 60):
        reference = sum(math.comb(m, k) * 0.5**m * abs(2 * k / m - 1) for k in range(m + 1))
        assert fair_bias_floor(2, m) == pytest.approx(reference, rel=1e-9)
    # DESIGN.md: about 0.8/sqrt(M) (≈ .10 at M = 60).
    assert fair_bias_floor(2, 60) == pytest.approx(0.8 / math.sqrt(60), rel=0.03)
    # Four classes: exact enumeration agrees with a Monte-Carlo estimate of the same quantity.
    exact = fair_bias_floor(4, 20)
    sampled = fair_bias_floor(4, 20, exact_limit=0, mc_draws=100_000, seed=1)
    assert sampled == pytest.approx(exact, rel=0.02)
    assert fair_bias_floor(2, 40, probs=(1.0, 0.0)) == pytest.approx(1.0)  # a fully skewed generator
    with pytest.raises(FairdiffError):
        fair_bias_floor(1, 10)


def test_writer_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"loss": jnp.float32(0.5), "bias/gender": 0.25})
        writer.write_scalars(2, {"loss": float("nan")})
        writer.write_image(2, "samples", np.zeros((4, 6, 3), np.uint8))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[0]["bias/gender"] == 0.25 and records[1]["loss"] is None
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
    silent = MetricsWriter(str(tmp_path / "other"), enabled=False)
    silent.write_scalars(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "other")


def test_progress_bar_counts_from_resumed_step():
    bar = progress_bar(10, initial=4, enabled=True)
    bar.update(2)
    assert bar.n == 6 and bar.total == 10
    bar.close()


def test_image_grid_layout_and_label_bars(tmp_path):
    images = np.stack([np.full((8, 6, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])  # black, grey, white
    labels = {"gender": [0, 1, -1], "race": [3, 2, 1]}
    path = str(tmp_path / "grid.png")
    grid = save_image_grid(images, path, ncols=2, labels=labels)
    bar, pad = 2, 2
    cell_h = 8 + 2 * bar
    assert grid.shape == (2 * (cell_h + pad) + pad, 2 * (6 + pad) + pad, 3)
    assert (grid[pad, pad] == 0).all() and (grid[pad, pad + 6 + pad] == 128).all()
    assert (grid[pad + cell_h + pad, pad] == 255).all()  # third image starts the second row
    np.testing.assert_array_equal(grid[pad + 8, pad], PALETTE[0])  # gender bar of image 0
    np.testing.assert_array_equal(grid[pad + 8 + bar, pad], PALETTE[3])  # race bar of image 0
    np.testing.assert_array_equal(grid[pad + cell_h + pad + 8, pad], [200, 200, 200])  # no gender label
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(FairdiffError, match="B, H, W, 3"):
        image_grid(np.zeros((8, 8, 3)), ncols=2)


def test_non_finite_guard_in_jit_and_on_host():
    old = {"w": jnp.ones(3)}
    bad = {"w": jnp.array([1.0, jnp.nan, 2.0])}
    step = jax.jit(lambda new, old: keep_if_finite(all_finite(new), new, old))
    np.testing.assert_array_equal(np.asarray(step(bad, old)["w"]), np.ones(3))
    good = {"w": jnp.array([3.0, 4.0, 5.0])}
    np.testing.assert_array_equal(np.asarray(step(good, old)["w"]), [3.0, 4.0, 5.0])
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.update(True, 1) and not guard.update(False, 2) and not guard.update(False, 3)
    assert guard.update(True, 4) and guard.skipped == 2
    guard.update(False, 5)
    guard.update(False, 6)
    with pytest.raises(FairdiffError, match="diverged"):
        guard.update(False, 7)


def test_compile_with_stats_reports_memory():
    fn = jax.jit(lambda x: jnp.sin(x) @ x.T)
    compiled, stats = compile_with_stats(fn, jnp.ones((64, 64)), name="toy")
    assert stats["compile_seconds"] > 0
    assert stats["argument_mib"] == pytest.approx(64 * 64 * 4 / 2**20)
    np.testing.assert_allclose(np.asarray(compiled(jnp.ones((64, 64)))), np.full((64, 64), 64 * np.sin(1.0)), rtol=1e-5)
    json.dumps(stats)
