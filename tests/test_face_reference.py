"""The reference set of real faces: its file (round trip, refusals) and ``fairdiff faces build-reference`` on a
folder of photographs (faces embedded by our dlib port, classes from a classifier folder, faceless images skipped)."""

from __future__ import annotations

import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.face_reference import FaceReferenceSet, load_face_reference, main, save_face_reference


def _reference(count: int = 5, dim: int = 8) -> FaceReferenceSet:
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(count, dim)).astype(np.float32)
    probs = rng.dirichlet(np.ones(2), size=count).astype(np.float32)
    return FaceReferenceSet(
        embeddings=unit / np.linalg.norm(unit, axis=1, keepdims=True),
        labels={"gender": probs.argmax(1).astype(np.int32)},
        probs={"gender": probs},
        classes={"gender": ("female", "male")},
        embedder="dlib_face_recognition_resnet_model_v1:0123456789abcdef",
        files=tuple(f"img_{i}.png" for i in range(count)),
    )


def test_round_trip_and_refusals(tmp_path):
    path = str(tmp_path / "faces.safetensors")
    reference = _reference()
    save_face_reference(path, reference)
    back = load_face_reference(path, embedder=reference.embedder, dim=8)
    np.testing.assert_array_equal(back.embeddings, reference.embeddings)
    np.testing.assert_array_equal(back.labels["gender"], reference.labels["gender"])
    np.testing.assert_array_equal(back.probs["gender"], reference.probs["gender"])
    assert back.classes == reference.classes and back.files == reference.files and back.dim == 8
    cases = [
        (dict(embedder="dlib_face_recognition_resnet_model_v1:ffffffffffffffff"), "was built with embedder"),
        (dict(dim=128), "8-D embeddings, the embedder gives 128-D"),
    ]
    for kwargs, message in cases:
        with pytest.raises(FairdiffError, match=message) as err:
            load_face_reference(path, **kwargs)
        assert "build-reference" in str(err.value) or "128-D" in str(err.value)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(FairdiffError, match="not a readable face reference file"):
        load_face_reference(str(garbled))
    from safetensors.numpy import save_file

    other = str(tmp_path / "other.safetensors")
    save_file({"weight": np.zeros((2, 2), np.float32)}, other)  # some other safetensors file
    with pytest.raises(FairdiffError, match="is not a fairdiff-face-reference file"):
        load_face_reference(other)
    with pytest.raises(FairdiffError, match="does not exist"):
        load_face_reference(str(tmp_path / "missing.safetensors"))


def test_build_reference_embeds_the_faces_of_a_folder(tmp_path):
    pytest.importorskip("dlib", reason="dlib is not installed: pip install -e '.[faces]'")
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (test photographs) is not installed")
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from fairdiff_jax.attributes.classifier_io import load_classifier, save_classifier
    from fairdiff_jax.attributes.dlib_detect import RECOGNITION_FILE, DlibFaceDetector, dlib_model_file
    from fairdiff_jax.attributes.face_embedder import load_face_embedder
    from fairdiff_jax.attributes.mobilenet import MobileNetV3Large, init_variables

    photo = skdata.astronaut()
    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(folder / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(photo[:, ::-1])).save(folder / "sub" / "mirrored.png")
    Image.fromarray(np.full((512, 512, 3), 90, np.uint8)).save(folder / "blank.png")
    (folder / "notes.txt").write_text("not an image")
    variables = flatten_dict(init_variables(MobileNetV3Large({"gender": 2}, width_multiplier=0.25), 32, seed=1))
    variables[("params", "head_gender", "kernel")] = variables[("params", "head_gender", "kernel")] * 1e9
    save_classifier(str(tmp_path / "cls"), unflatten_dict(variables), classes={"gender": ("female", "male")},
                    width_multiplier=0.25, input_size=32)  # fmt: skip
    out = str(tmp_path / "ref.safetensors")
    args = ["build-reference", "--images", str(folder), "--classifier", str(tmp_path / "cls"), "--out", out]
    assert main([*args, "--detector", "dlib_hog", "--batch-size", "2"]) == 0

    embedder, params = load_face_embedder(dlib_model_file(RECOGNITION_FILE))
    reference = load_face_reference(out, embedder=embedder.identity, dim=128)
    assert reference.files == ("astronaut.png", "sub/mirrored.png")  # the blank image has no face
    detector = DlibFaceDetector("dlib_hog")
    images = jnp.asarray(np.stack([photo, photo[:, ::-1]]), jnp.float32) / 127.5 - 1.0
    found = detector(images)
    expected = np.array(jax.jit(embedder)(params, images, found.landmarks))  # E(face) + E(mirrored face)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(reference.embeddings, expected, atol=1e-5)
    classifier, cls_params = load_classifier(str(tmp_path / "cls"), detector=detector)
    probs = np.asarray(jax.nn.softmax(jax.jit(classifier)(cls_params, images).logits["gender"], -1))
    np.testing.assert_allclose(reference.probs["gender"], probs, atol=1e-5)
    np.testing.assert_array_equal(reference.labels["gender"], probs.argmax(1))
    # a face and its mirror image embed alike (E(face) + E(mirror) is symmetric)
    assert float(reference.embeddings[0] @ reference.embeddings[1]) > 0.95

    with pytest.raises(FairdiffError, match="is not a folder"):
        main(["build-reference", "--images", str(tmp_path / "nowhere"), "--classifier", "x", "--out", out])
    with pytest.raises(FairdiffError, match="--detector haar is unknown"):
        main([*args, "--detector", "haar"])


def test_the_cli_dispatches_faces_and_errors_are_one_line(tmp_path, capsys):
    from fairdiff_jax import cli

    code = cli.main(["faces", "build-reference", "--images", str(tmp_path / "none"), "--classifier", "c", "--out", "o"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a folder" in err, err
