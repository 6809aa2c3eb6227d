"""OpenCV face detection on real photographs: the largest face, no face -> invalid, inside jit, crops and classifiers
that see the face, the config wiring through build_run, and invalid images left out of the bias metrics."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed: pip install -e '.[faces]'")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (test photographs) is not installed")
if not hasattr(cv2, "CascadeClassifier"):
    pytest.skip(
        "this OpenCV has no Haar cascades (OpenCV 5); install opencv-python-headless<5", allow_module_level=True
    )

from fairdiff_jax.attributes import detectors  # noqa: E402
from fairdiff_jax.attributes.classifier_io import (  # noqa: E402
    load_classifier,
    network_fn,
    read_classifier_config,
    save_classifier,
)
from fairdiff_jax.attributes.detectors import OpenCVFaceDetector, make_face_detector  # noqa: E402
from fairdiff_jax.attributes.faces import FacePipeline  # noqa: E402
from fairdiff_jax.attributes.image_ops import crop_and_resize, expand_square_boxes  # noqa: E402
from fairdiff_jax.attributes.mobilenet import MobileNetV3Large, init_variables  # noqa: E402
from fairdiff_jax.errors import FairdiffError  # noqa: E402

# Hand-checked on skimage.data.astronaut() (512x512): the face from hairline to chin and cheek to cheek, and the
# subject's right eye, left eye, nose tip, right and left mouth corners (image-left first), in pixels.
ASTRONAUT_FACE = (184.0, 80.0, 260.0, 175.0)
ASTRONAUT_POINTS = np.array([[205, 102], [246, 103], [225, 125], [204, 141], [244, 142]], np.float32)


def _to_signed(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) / 127.5 - 1.0


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _to_signed(skdata.astronaut())


@pytest.fixture(scope="module")
def blank() -> np.ndarray:
    return np.full((512, 512, 3), 0.2, np.float32)


@pytest.fixture(scope="module")
def haar() -> OpenCVFaceDetector:
    return OpenCVFaceDetector("haar")


def test_haar_finds_the_astronauts_face_and_places_template_landmarks(astronaut, haar):
    found = haar.detect_numpy(astronaut[None])
    box = found.boxes[0]
    assert found.valid[0]
    assert _iou(box, ASTRONAUT_FACE) > 0.5, box
    inside = (ASTRONAUT_POINTS >= box[:2]) & (ASTRONAUT_POINTS <= box[2:])
    assert inside.all(), box
    # Landmarks come from the box through the template: within 15% of the box side of the hand-marked points.
    error = np.linalg.norm(found.landmarks[0] - ASTRONAUT_POINTS, axis=-1)
    assert error.max() < 0.15 * (box[2] - box[0]), error


def _paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int) -> tuple[float, float, float, float]:
    canvas[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
    return (x, y, x + patch.shape[1], y + patch.shape[0])


@pytest.mark.parametrize("big_first", [True, False])
def test_the_largest_of_two_faces_is_kept(haar, big_first):
    head = skdata.astronaut()[30:210, 140:300]  # 160 x 180 around the face
    small = cv2.resize(head, (96, 108), interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 512, 3), 128, np.uint8)
    spots = [(20, 20), (300, 280)] if big_first else [(300, 280), (20, 20)]
    big_region = _paste(canvas, head, *spots[0])
    small_region = _paste(canvas, small, *spots[1])
    all_faces, _ = haar._faces(canvas)
    assert len(all_faces) == 2, all_faces  # both copies are detected, so picking one is the question
    found = haar.detect_numpy(_to_signed(canvas)[None])
    box = found.boxes[0]
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert found.valid[0]
    assert big_region[0] < centre[0] < big_region[2] and big_region[1] < centre[1] < big_region[3], box
    assert not (small_region[0] < centre[0] < small_region[2] and small_region[1] < centre[1] < small_region[3])


def test_no_face_is_invalid_with_the_whole_image_box(haar, blank):
    noise = np.random.default_rng(0).uniform(-1, 1, (512, 512, 3)).astype(np.float32)
    found = haar.detect_numpy(np.stack([blank, noise]))
    np.testing.assert_array_equal(found.valid, [False, False])
    np.testing.assert_array_equal(found.boxes, np.tile([0.0, 0.0, 512.0, 512.0], (2, 1)))
    assert np.isfinite(found.landmarks).all()


def test_inside_jit_with_a_batch(haar, astronaut, blank):
    batch = jnp.asarray(np.stack([astronaut, blank, astronaut[:, ::-1]]))
    jitted = jax.jit(haar)(batch)
    host = haar.detect_numpy(np.asarray(batch))
    np.testing.assert_array_equal(np.asarray(jitted.valid), [True, False, True])
    np.testing.assert_allclose(np.asarray(jitted.boxes), host.boxes)
    np.testing.assert_allclose(np.asarray(jitted.landmarks), host.landmarks)
    mirrored = np.asarray(jitted.boxes[2])  # the mirrored photo's face is the mirror of the original's
    assert _iou([512 - mirrored[2], mirrored[1], 512 - mirrored[0], mirrored[3]], ASTRONAUT_FACE) > 0.5
    low = jax.jit(haar)(batch.astype(jnp.bfloat16))  # bfloat16 images (the SD decoder's dtype) work too
    np.testing.assert_array_equal(np.asarray(low.valid), [True, False, True])


def test_pipeline_crops_the_detected_box_and_gradients_stay_inside(haar, astronaut):
    x0, y0, x1, y1 = (int(v) for v in haar.detect_numpy(astronaut[None]).boxes[0])
    assert x1 - x0 == y1 - y0  # Haar boxes are square, so crop_size = side gives one pixel per pixel
    pipeline = FacePipeline(haar, crop_size=x1 - x0, expand=1.0)
    image = jnp.asarray(astronaut[None])
    crops = jax.jit(lambda im: pipeline(im, aligned=False).crops)(image)
    np.testing.assert_allclose(np.asarray(crops[0]), astronaut[y0:y1, x0:x1], atol=1e-5)
    grad = jax.jit(jax.grad(lambda im: (pipeline(im).crops ** 2).sum()))(image)
    inside = np.zeros((512, 512), bool)
    inside[y0:y1, x0:x1] = True
    touched = np.abs(np.asarray(grad[0])).sum(-1) > 0
    assert touched[inside].mean() > 0.99 and not touched[~inside].any()


def _visible_logits(variables, name):
    """An untrained MobileNet's pooled features are ~1e-9 (He init over fan-out shrinks every block): scale the head
    so the logits are O(0.1) and differ between inputs."""
    flat = flatten_dict(variables)
    flat[("params", f"head_{name}", "kernel")] = flat[("params", f"head_{name}", "kernel")] * 1e9
    return unflatten_dict(flat)


@pytest.fixture(scope="module")
def classifier_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("face_classifiers")
    for name, classes, seed in (("gender", ("female", "male"), 1), ("age", ("young", "old"), 2)):
        variables = _visible_logits(
            init_variables(MobileNetV3Large({name: 2}, width_multiplier=0.25), 32, seed=seed), name
        )
        save_classifier(str(root / name), variables, classes={name: classes}, width_multiplier=0.25, input_size=32)
    return {"gender": str(root / "gender"), "age": str(root / "age")}


def test_face_classifier_sees_the_expanded_face_crop(haar, astronaut, blank, classifier_folders):
    folder = classifier_folders["gender"]
    spec = read_classifier_config(folder)
    classifier, variables = load_classifier(folder, detector=haar)
    whole, _ = load_classifier(folder)  # without a detector: the whole image, a different input
    network = network_fn(spec)
    images = jnp.asarray(np.stack([astronaut, blank]))
    box = jnp.asarray(haar.detect_numpy(astronaut[None]).boxes)  # the face box, found on the host

    @jax.jit  # one compiled program for the three MobileNet passes (compiling dominates this test)
    def run(variables, images, box):
        crop = crop_and_resize(images[:1], expand_square_boxes(box, spec.crop_expand), spec.input_size)
        return classifier(variables, images), network(variables, crop)["gender"], whole(variables, images)

    out, expected, whole_out = run(variables, images, box)
    np.testing.assert_array_equal(np.asarray(out.valid), [True, False])
    np.testing.assert_allclose(np.asarray(out.logits["gender"][:1]), np.asarray(expected), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(whole_out.logits["gender"][:1]) - np.asarray(expected)).max() > 1e-2


def _faces_config(tiny_sd_path, folders, detector):
    from fairdiff_jax.config import attribute, base_config, validate_config

    cfg = base_config()
    cfg.model.path, cfg.model.dtype, cfg.adaptor.rank = tiny_sd_path, "float32", 2
    cfg.attributes.gender = attribute("gender", classifier=folders["gender"])
    cfg.attributes.age = attribute("age", classifier=folders["age"], facial=False)
    cfg.faces.detector = detector
    validate_config(cfg)
    return cfg


def test_components_give_facial_attributes_the_detector_and_metrics_drop_faceless_images(
    tiny_sd_path, classifier_folders, astronaut, blank
):
    from fairdiff_jax.metrics import bias_metrics
    from fairdiff_jax.run import build_run

    images = jnp.asarray(np.stack([astronaut, blank, astronaut[:, ::-1], blank]))
    comp = build_run(_faces_config(tiny_sd_path, classifier_folders, "haar"))
    plain = build_run(_faces_config(tiny_sd_path, classifier_folders, "none"))  # today's behaviour
    gender, gender_vars = load_classifier(classifier_folders["gender"], detector=OpenCVFaceDetector("haar"))
    age, age_vars = load_classifier(classifier_folders["age"])  # non-facial: whole image, no detector

    @jax.jit  # one compiled program for all the MobileNet passes (compiling dominates this test)
    def run(params, plain_params, gender_vars, age_vars):
        reference = {"gender": gender(gender_vars, images).logits["gender"], "age": age(age_vars, images).logits["age"]}
        return comp.classifier(params, images), plain.classifier(plain_params, images)[1], reference

    (logits, valid), plain_valid, reference = run(
        comp.frozen["classifier"], plain.frozen["classifier"], gender_vars, age_vars
    )
    np.testing.assert_array_equal(np.asarray(valid), [True, False, True, False])
    np.testing.assert_allclose(logits["gender"], reference["gender"], atol=1e-5)
    np.testing.assert_allclose(logits["age"], reference["age"], atol=1e-5)
    assert np.asarray(plain_valid).all()

    # Faceless images carry the other class; the metrics must count the face images only (freq 1/0, bias 1).
    labels = {"gender": np.array([0, 1, 0, 1]), "age": np.array([1, 0, 1, 0])}
    record = {"prompt": "p", "labels": labels, "valid": np.asarray(valid)}
    metrics = bias_metrics([record, record], comp.task.num_classes)
    assert metrics["n_valid"] == 4 and metrics["n_images"] == 8
    assert metrics["freq"]["gender"] == [1.0, 0.0] and metrics["bias"]["gender"] == pytest.approx(1.0)


class _FakeYuNet:
    """Stands in for cv2.FaceDetectorYN (no model file ships with OpenCV): fixed rows, records what it was given."""

    def __init__(self, rows):
        self.rows, self.seen = np.asarray(rows, np.float32), []

    def setInputSize(self, size):  # noqa: N802 (OpenCV's name)
        self.size = size

    def detect(self, image):
        self.seen.append(image.copy())
        return 1, self.rows


def test_yunet_rows_largest_face_thresholds_landmark_order_and_bgr(tmp_path, monkeypatch):
    model = tmp_path / "yunet.onnx"
    model.write_bytes(b"not read: the engine is replaced")
    points = np.arange(10, dtype=np.float32).reshape(5, 2) + 300
    rows = [
        [10, 10, 40, 40, *range(10), 0.9],  # small face
        [200, 250, 150, 160, *points.ravel(), 0.8],  # largest kept face
        [0, 0, 400, 400, *range(10), 0.3],  # larger but below the score threshold
        [450, 450, 20, 20, *range(10), 0.99],  # below min_face_size
    ]
    fake = _FakeYuNet(rows)
    monkeypatch.setattr(OpenCVFaceDetector, "_create", lambda self: fake)
    monkeypatch.setattr(detectors, "_local", type(detectors._local)())
    detector = OpenCVFaceDetector("yunet", str(model), min_face_size=32, score_threshold=0.5)
    red = np.zeros((1, 480, 640, 3), np.float32) - 1.0
    red[..., 0] = 1.0
    found = jax.jit(detector)(jnp.asarray(red))
    np.testing.assert_array_equal(np.asarray(found.boxes[0]), [200, 250, 350, 410])
    np.testing.assert_array_equal(np.asarray(found.landmarks[0]), points)  # YuNet order is the template's order
    assert bool(found.valid[0]) and fake.size == (640, 480)
    np.testing.assert_array_equal(fake.seen[-1][0, 0], [0, 0, 255])  # red arrives as BGR


def test_errors_are_one_line_and_say_how_to_fix(tmp_path, monkeypatch):
    from fairdiff_jax.config import base_config, validate_config

    with pytest.raises(FairdiffError, match="does not exist"):
        OpenCVFaceDetector("yunet", str(tmp_path / "missing.onnx"))
    with pytest.raises(FairdiffError, match="needs a local ONNX"):
        make_face_detector("yunet")
    with pytest.raises(FairdiffError, match="choose one of"):
        make_face_detector("mtcnn")
    assert make_face_detector("none") is None
    cfg = base_config()
    cfg.faces.detector = "mtcnn"
    with pytest.raises(FairdiffError, match="faces.detector"):
        validate_config(cfg)
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    monkeypatch.setattr(detectors, "_local", type(detectors._local)())
    with pytest.raises(FairdiffError, match=r"pip install -e '\.\[faces\]'"):
        OpenCVFaceDetector("haar")


# ---------------------------------------------------------------- dlib (faces extra: dlib-bin, face-recognition-models)

# dlib's 5 points on the astronaut, hand-checked: outer and inner corner of the image-right eye, of the image-left
# eye, bottom of the nose (image pixels)
ASTRONAUT_DLIB_POINTS = np.array([[255, 104], [237, 105], [195, 101], [212, 103], [224, 135]], np.float32)


@pytest.fixture(scope="module")
def dlib_module():
    return pytest.importorskip("dlib", reason="dlib is not installed: pip install -e '.[faces]'")


@pytest.mark.parametrize("kind", ["dlib_hog", "dlib_cnn"])
def test_dlib_detectors_find_the_face_and_give_dlibs_five_points(dlib_module, astronaut, blank, kind):
    from fairdiff_jax.attributes.dlib_detect import LANDMARKS_FILE, dlib_model_file

    detector = make_face_detector(kind)
    assert detector.landmark_scheme == "dlib"
    found = jax.jit(detector)(jnp.asarray(np.stack([astronaut, blank])))
    np.testing.assert_array_equal(np.asarray(found.valid), [True, False])
    box = np.asarray(found.boxes[0])
    assert _iou(box, ASTRONAUT_FACE) > 0.5, box
    points = np.asarray(found.landmarks[0])
    assert np.abs(points - ASTRONAUT_DLIB_POINTS).max() <= 4, points
    # exactly what dlib's shape predictor gives on the detector's box (dlib rectangles are inclusive)
    rgb = skdata.astronaut()
    shape = dlib_module.shape_predictor(dlib_model_file(LANDMARKS_FILE))(
        rgb, dlib_module.rectangle(*(int(v) for v in box[:2]), int(box[2]) - 1, int(box[3]) - 1)
    )
    np.testing.assert_array_equal(points, [[shape.part(i).x, shape.part(i).y] for i in range(5)])
    assert np.isfinite(np.asarray(found.landmarks[1])).all()  # placeholder for the faceless image


def test_dlib_boxes_are_clipped_and_the_largest_clipped_face_wins(dlib_module):
    """A face cut by the image edge whose raw dlib box (-46..93) is the largest but whose part inside the image is
    smaller than a whole face elsewhere: the authors rank faces by the clipped area, so the whole face wins."""
    head = skdata.astronaut()[30:210, 140:300]
    canvas = np.full((400, 560, 3), 128, np.uint8)
    _paste(canvas, cv2.resize(head, (200, 225)), 340, 40)
    canvas[60:352, :140] = cv2.resize(head, (260, 292))[:, 120:]
    detector = make_face_detector("dlib_hog")
    raw = detector._engine()[0](canvas, 0)
    areas = sorted((r.right() - r.left() + 1) * (r.bottom() - r.top() + 1) for r in raw)
    assert len(raw) == 2 and min(r.left() for r in raw) < 0 and areas[1] > areas[0]  # the cut face's raw box is larger
    found = detector.detect_numpy(_to_signed(canvas)[None])
    box = found.boxes[0]
    assert found.valid[0] and box[0] > 300 and box[2] <= 560, box


def test_dlib_errors_are_one_line_and_say_how_to_fix(dlib_module, tmp_path, monkeypatch):
    from fairdiff_jax.attributes import dlib_detect
    from fairdiff_jax.attributes.detectors import FACE_DETECTORS

    assert FACE_DETECTORS == ("none", "haar", "yunet", "dlib_cnn", "dlib_hog")
    garbled = tmp_path / "garbled.dat"
    garbled.write_bytes(b"\x01\x01\x01\x0dnot a network at all")
    with pytest.raises(FairdiffError, match="dlib could not read the CNN face detector") as err:
        make_face_detector("dlib_cnn", str(garbled))
    assert "\n" not in str(err.value)
    with pytest.raises(FairdiffError, match="does not exist"):
        make_face_detector("dlib_cnn", str(tmp_path / "missing.dat"))
    monkeypatch.setattr(dlib_detect, "_local", type(dlib_detect._local)())
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if dlib were not installed
    with pytest.raises(FairdiffError, match=r"need dlib.*pip install -e '\.\[faces\]'"):
        make_face_detector("dlib_hog")
    monkeypatch.setattr(dlib_detect.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FairdiffError, match="face-recognition-models"):
        dlib_detect.dlib_model_file(dlib_detect.LANDMARKS_FILE)
