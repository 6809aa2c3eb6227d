"""dlib's 5-point face chip in JAX against ``dlib.get_face_chip`` on a real photograph (at the image's size and
enlarged, so dlib's image pyramid is used), and its gradient against finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

dlib = pytest.importorskip("dlib", reason="dlib is not installed: pip install -e '.[faces]'")
cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (test photographs) is not installed")

from fairdiff_jax.attributes.dlib_detect import LANDMARKS_FILE, dlib_model_file  # noqa: E402
from fairdiff_jax.attributes.face_chip import (  # noqa: E402
    chip_geometry,
    chip_points,
    extract_face_chips,
    pyramid_down,
)


@pytest.fixture(scope="module")
def predictor():
    return dlib.shape_predictor(dlib_model_file(LANDMARKS_FILE))


def _shape(image: np.ndarray, predictor):
    box = dlib.get_frontal_face_detector()(image, 0)[0]
    return predictor(image, box)


def _points(shape) -> np.ndarray:
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float32)


@jax.jit
def _chips(images, landmarks):
    return extract_face_chips(images, landmarks), extract_face_chips(images, landmarks, truncate=True)


@pytest.mark.parametrize(
    "size, angle, depth",
    [(512, 0.0, 0), (512, 25.0, 0), (1400, 0.0, 1), (1400, -15.0, 1)],
)
def test_chip_matches_dlib_get_face_chip(predictor, size, angle, depth):
    image = skdata.astronaut()
    if angle:
        rotation = cv2.getRotationMatrix2D((256.0, 256.0), angle, 1.0)
        image = cv2.warpAffine(image, rotation, (512, 512), flags=cv2.INTER_LINEAR)
    if size != 512:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
    shape = _shape(image, predictor)
    reference = dlib.get_face_chip(image, shape, size=150, padding=0.25).astype(np.float32)
    points = _points(shape)
    geometry = chip_geometry(jnp.asarray(points)[None], size, size)
    assert int(geometry.depth[0]) == depth  # dlib halves the image `depth` times before sampling
    smooth, truncated = _chips(jnp.asarray(image, jnp.float32)[None], jnp.asarray(points)[None])
    # dlib stores every pyramid level and the chip as uint8 (truncating); with that emulated the chips are equal
    exact = np.asarray(truncated[0]) == reference
    assert exact.mean() > 0.999, exact.mean()
    assert np.abs(np.asarray(truncated[0]) - reference).max() <= 1
    # the differentiable chip differs from dlib's by its rounding only
    gap = np.asarray(smooth[0]) - reference
    assert -1e-3 <= gap.min() and gap.max() < depth + 1 + 1e-3, (gap.min(), gap.max())


def test_landmarks_land_on_dlibs_chip_points(predictor):
    image = skdata.astronaut()
    shape = _shape(image, predictor)
    chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    again = _points(predictor(chip, dlib.rectangle(0, 0, 149, 149)))  # dlib's own landmarks on dlib's chip
    assert np.abs(again - chip_points()).max() < 6, again  # the template our geometry maps the landmarks onto


def test_pyramid_down_is_dlibs_five_tap_filter():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1, 21, 18, 3)).astype(np.float32)
    ours = np.asarray(pyramid_down(jnp.asarray(image)))[0]
    # dlib's pyramid_down_2_1 loops: rows of [1 4 6 4 1] at columns 2c..2c+4, then the same down rows 2r..2r+4
    weights = np.array([1, 4, 6, 4, 1], np.float64)
    rows = np.stack([np.einsum("k,rkc->rc", weights, image[0, :, 2 * c : 2 * c + 5]) for c in range(7)], 1)
    want = np.stack([np.tensordot(weights, rows[2 * r : 2 * r + 5], 1) for r in range(9)], 0) / 256
    assert ours.shape == want.shape == (9, 7, 3)
    np.testing.assert_allclose(ours, want, rtol=1e-6)


@pytest.mark.parametrize("size, depth", [(48, 0), (160, 2)])  # 160: the chip is taken from the second halving
def test_chip_gradient_matches_finite_differences(size, depth):
    rng = np.random.default_rng(1)
    image = jnp.asarray(rng.uniform(-1, 1, size=(1, size, size, 3)), jnp.float32)
    scale = size / 64.0
    landmarks = jnp.asarray(np.array([[44, 26], [38, 27], [20, 26], [26, 27], [32, 40]], np.float32) * scale)[None]
    weights = jnp.asarray(rng.normal(size=(1, 24, 24, 3)), jnp.float32)
    loss = lambda im: (extract_face_chips(im, landmarks, size=24) * weights).sum()
    grad = jax.grad(loss)(image)
    assert np.abs(np.asarray(grad)).sum() > 0
    direction = jnp.asarray(rng.normal(size=image.shape), jnp.float32)
    eps = 1e-2  # the chip is linear in the pixels, so central differences are exact up to float32 rounding
    numeric = (loss(image + eps * direction) - loss(image - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float((grad * direction).sum()), float(numeric), rtol=2e-3)
    geometry = chip_geometry(landmarks, size, size, 24)
    assert int(geometry.depth[0]) == depth
    (x0, y0), (width, height) = np.asarray(geometry.origin[0]), np.asarray(geometry.extent[0]).astype(int)
    outside = np.ones((size, size), bool)
    outside[y0 : y0 + height, x0 : x0 + width] = False  # dlib reads nothing outside the crop it takes
    assert outside.any() and not np.abs(np.asarray(grad[0]))[outside].any()
