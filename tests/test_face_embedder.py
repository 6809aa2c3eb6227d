"""The Flax port of dlib's face-recognition ResNet, read from the shipped .dat by our own reader: parity with
``dlib.face_recognition_model_v1`` on a real photograph (a chip, and the whole detect -> align -> embed path), and
one-line errors for missing or garbled files."""

from __future__ import annotations

import bz2

import jax
import jax.numpy as jnp
import numpy as np
import pytest

dlib = pytest.importorskip("dlib", reason="dlib is not installed: pip install -e '.[faces]'")
cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (test photographs) is not installed")

from fairdiff_jax.attributes.dlib_detect import (  # noqa: E402
    LANDMARKS_FILE,
    RECOGNITION_FILE,
    DlibFaceDetector,
    dlib_model_file,
)
from fairdiff_jax.attributes.dlib_format import read_metric_network  # noqa: E402
from fairdiff_jax.attributes.face_embedder import DlibFaceResNet, dlib_layers, load_face_embedder  # noqa: E402
from fairdiff_jax.errors import FairdiffError  # noqa: E402


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model_path() -> str:
    return dlib_model_file(RECOGNITION_FILE)


@pytest.fixture(scope="module")
def embedder(model_path):
    return load_face_embedder(model_path)


@pytest.fixture(scope="module")
def dlib_recognizer(model_path):
    return dlib.face_recognition_model_v1(model_path)


@pytest.fixture(scope="module")
def dlib_shape():
    predictor = dlib.shape_predictor(dlib_model_file(LANDMARKS_FILE))
    return lambda image, rect: predictor(image, rect)


def test_reader_walks_the_whole_file(model_path):
    network = read_metric_network(model_path, dlib_layers())  # raises unless every byte is accounted for
    kinds = [layer["kind"] for layer in network.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("add_prev") == 14
    assert network.input_size == (150, 150)
    np.testing.assert_allclose(network.input_mean, (122.782, 117.001, 104.298), rtol=1e-6)  # dlib's input_rgb_image
    assert network.margin == pytest.approx(0.04) and network.distance_threshold == pytest.approx(0.6)
    assert network.layers[0]["kernel"].shape == (256, 128) and network.layers[-1]["kernel"].shape == (32, 3, 7, 7)


def test_params_fit_the_flax_module(embedder):
    face_embedder, params = embedder
    expected = jax.eval_shape(DlibFaceResNet().init, jax.random.key(0), jnp.zeros((1, 150, 150, 3)))["params"]
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, expected)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 5_614_592  # every weight the file holds
    assert face_embedder.identity.startswith("dlib_face_recognition_resnet_model_v1:")


@pytest.fixture(scope="module")
def astronaut_chip(dlib_shape):
    image = skdata.astronaut()
    shape = dlib_shape(image, dlib.get_frontal_face_detector()(image, 0)[0])
    return dlib.get_face_chip(image, shape, size=150, padding=0.25)


def test_chip_embedding_matches_dlib(embedder, dlib_recognizer, astronaut_chip):
    face_embedder, params = embedder
    chips = jnp.asarray(np.stack([astronaut_chip, astronaut_chip[:, ::-1]]), jnp.float32) / 127.5 - 1.0
    ours = np.asarray(jax.jit(lambda p, c: face_embedder.embed_chips(p, c, flip=False))(params, chips))
    theirs = [
        np.asarray(dlib_recognizer.compute_face_descriptor(np.ascontiguousarray(c)))
        for c in np.asarray((chips + 1.0) * 127.5 + 0.5, np.uint8)
    ]
    for mine, reference in zip(ours, theirs):
        assert _cos(mine, reference) >= 0.999
        np.testing.assert_allclose(mine, reference, atol=1e-4)  # same scale too, not only the direction
    both = np.asarray(jax.jit(face_embedder.embed_chips)(params, chips[:1]))[0]  # E(face) + E(mirror), the default
    assert _cos(both, theirs[0] + theirs[1]) >= 0.999


@pytest.mark.parametrize("variant", ["photo", "rotated", "enlarged"])
def test_detect_align_embed_matches_dlibs_whole_path(embedder, dlib_recognizer, dlib_shape, variant):
    image = skdata.astronaut()
    if variant == "rotated":
        image = cv2.warpAffine(image, cv2.getRotationMatrix2D((256.0, 256.0), 20.0, 1.0), (512, 512))
    if variant == "enlarged":  # a large face: dlib extracts the chip from a pyramid level
        image = cv2.resize(image, (1400, 1400), interpolation=cv2.INTER_CUBIC)
    kind = "dlib_cnn" if variant == "photo" else "dlib_hog"
    face_embedder, params = embedder
    pixels = jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0
    found = DlibFaceDetector(kind)(pixels)
    ours = np.asarray(jax.jit(lambda p, x, lm: face_embedder(p, x, lm, flip=False))(params, pixels, found.landmarks))
    # dlib's own path: the same detector, its shape predictor, compute_face_descriptor(image, shape)
    if kind == "dlib_cnn":
        rect = dlib.cnn_face_detection_model_v1(dlib_model_file("mmod_human_face_detector.dat"))(image, 0)[0].rect
    else:
        rect = dlib.get_frontal_face_detector()(image, 0)[0]
    theirs = np.asarray(dlib_recognizer.compute_face_descriptor(image, dlib_shape(image, rect)))
    assert bool(found.valid[0])
    assert _cos(ours[0], theirs) >= 0.99


def test_gradients_reach_the_pixels(embedder, astronaut_chip):
    face_embedder, params = embedder
    image = jnp.asarray(skdata.astronaut(), jnp.float32)[None] / 127.5 - 1.0
    landmarks = DlibFaceDetector("dlib_hog")(image).landmarks
    target = jnp.asarray(np.random.default_rng(0).normal(size=(1, 128)), jnp.float32)
    grad = jax.jit(jax.grad(lambda x: (face_embedder(params, x, landmarks) * target).sum()))(image)
    magnitude = np.abs(np.asarray(grad[0])).sum(-1)
    assert np.isfinite(magnitude).all() and magnitude[80:180, 180:270].sum() > 0  # the face region
    assert magnitude[:, :100].sum() == 0 and magnitude[300:].sum() == 0  # far from the chip: nothing


def test_missing_and_garbled_files_are_one_line_errors(model_path, tmp_path):
    data = open(model_path, "rb").read()
    cases = {
        "missing": (None, "does not exist"),
        "truncated": (data[: len(data) // 2], "unexpected end of file"),
        "flipped": (data[:300] + bytes([data[300] ^ 0x5A]) + data[301:], "not a readable dlib model"),
        "other model": (open(dlib_model_file(LANDMARKS_FILE), "rb").read(), "not a readable dlib model"),
        "compressed": (bz2.compress(data[:4096]), "decompress it"),
        "trailing bytes": (data + b"\x00\x01", "unread bytes"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.dat"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(FairdiffError, match=message) as err:
            load_face_embedder(str(path))
        assert "\n" not in str(err.value) and str(path) in str(err.value), (name, str(err.value))
