"""Face pipeline geometry (bilinear crops, 5-point alignment) against analytic references and finite differences,
the classifier wrapper, JAX preprocessing, and CLIP / DINOv2 loader parity with PyTorch transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax import FairdiffError
from fairdiff_jax.attributes import (
    ARCFACE_TEMPLATE_112,
    FaceAttributeClassifier,
    FaceDetections,
    FacePipeline,
    MultiHeadConvNet,
    WholeImageDetector,
    align_faces,
    crop_and_resize,
    expand_square_boxes,
    load_clip_image_encoder,
    load_dinov2_encoder,
    model_input,
    similarity_transform,
)
from fairdiff_jax.attributes.image_ops import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

RNG = np.random.default_rng(3)


def ramp_image(height, width, a=0.03, b=-0.02, c=0.1):
    """I(x, y) = a x + b y + c at pixel centres; bilinear sampling of it is exact inside the image."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.repeat((a * xs + b * ys + c)[None, ..., None], 3, axis=-1).astype(np.float32)


def test_crop_identity_upsampling_and_ramp():
    images = jnp.asarray(RNG.uniform(-1, 1, size=(2, 6, 6, 3)), jnp.float32)
    whole = jnp.array([[0.0, 0.0, 6.0, 6.0]] * 2)
    np.testing.assert_allclose(np.asarray(crop_and_resize(images, whole, 6)), np.asarray(images), atol=1e-6)
    upsampled = jax.image.resize(images, (2, 12, 12, 3), method="linear", antialias=False)
    np.testing.assert_allclose(np.asarray(crop_and_resize(images, whole, 12)), np.asarray(upsampled), atol=1e-5)
    ramp = ramp_image(20, 20)
    box = np.array([[3.0, 5.0, 13.0, 11.0]])
    crop = np.asarray(crop_and_resize(jnp.asarray(ramp), jnp.asarray(box), (4, 8)))
    xs = 3.0 + (np.arange(8) + 0.5) / 8 * 10 - 0.5
    ys = 5.0 + (np.arange(4) + 0.5) / 4 * 6 - 0.5
    np.testing.assert_allclose(crop[0, :, :, 0], 0.03 * xs[None] - 0.02 * ys[:, None] + 0.1, atol=1e-5)


def test_expand_square_boxes():
    boxes = jnp.array([[10.0, 20.0, 30.0, 60.0]])
    np.testing.assert_allclose(np.asarray(expand_square_boxes(boxes, 1.5)), [[-10.0, 10.0, 50.0, 70.0]])


def test_crop_gradients_reach_pixels_and_match_finite_differences():
    from jax.test_util import check_grads

    images = RNG.uniform(-1, 1, size=(1, 5, 5, 2))
    boxes = np.array([[0.7, 0.4, 4.1, 4.6]])
    grad = jax.grad(lambda x: crop_and_resize(x, boxes, 3).sum())(jnp.asarray(images, jnp.float32))
    np.testing.assert_allclose(float(grad.sum()), 3 * 3 * 2, rtol=1e-5)  # bilinear weights sum to one
    with jax.enable_x64(True):
        check_grads(lambda x: crop_and_resize(x, jnp.asarray(boxes), 3), (jnp.asarray(images),), order=1, modes="rev")
        landmarks = jnp.asarray(ARCFACE_TEMPLATE_112 / 112 * 5 + RNG.normal(size=(5, 2)) * 0.1)[None]
        check_grads(lambda x: align_faces(x, landmarks, 4), (jnp.asarray(images),), order=1, modes="rev")


def test_similarity_alignment_recovers_a_known_transform():
    angle, scale, shift = 0.3, 0.8, np.array([4.0, -2.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    template = ARCFACE_TEMPLATE_112 * (24 / 112)
    # landmarks in the source image are the template pulled back through out = R src + t
    landmarks = (np.linalg.inv(rotation) @ (template - shift).T).T
    matrix = np.asarray(similarity_transform(jnp.asarray(landmarks[None], jnp.float32), template))[0]
    np.testing.assert_allclose(matrix[:, :2], rotation, atol=1e-4)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-3)
    ramp = ramp_image(40, 40)
    aligned = np.asarray(align_faces(jnp.asarray(ramp), jnp.asarray(landmarks[None]), size=24))
    ys, xs = np.meshgrid(np.arange(24.0), np.arange(24.0), indexing="ij")
    source = np.einsum("ij,hwj->hwi", np.linalg.inv(rotation), np.stack([xs, ys], -1) - shift)
    inside = (source.min(-1) >= 0) & (source.max(-1) <= 39)
    want = 0.03 * source[..., 0] - 0.02 * source[..., 1] + 0.1
    np.testing.assert_allclose(aligned[0, ..., 0][inside], want[inside], atol=1e-4)
    assert inside.mean() > 0.5


def test_whole_image_detector_and_pipeline():
    images = jnp.asarray(RNG.uniform(-1, 1, size=(2, 112, 112, 3)), jnp.float32)
    crops = FacePipeline(crop_size=112, align_size=112)(images)
    assert bool(crops.detections.valid.all())
    np.testing.assert_allclose(np.asarray(crops.detections.boxes[0]), [0, 0, 112, 112])
    np.testing.assert_allclose(np.asarray(crops.crops), np.asarray(images), atol=1e-4)
    np.testing.assert_allclose(np.asarray(crops.aligned), np.asarray(images), atol=1e-4)


def test_classifier_wrapper_detects_without_gradient():
    net = MultiHeadConvNet({"gender": 2, "race": 4}, features=(8,))
    params = net.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))

    def image_dependent_detector(images):  # a detector whose output depends on the pixels
        shift = images.mean(axis=(1, 2, 3))
        boxes = jnp.stack([shift, shift, 16 + shift, 16 + shift], -1)
        return FaceDetections(boxes, WholeImageDetector()(images).landmarks, shift > -10)

    classifier = FaceAttributeClassifier(
        lambda p, x: net.apply(p, x), {"gender": 2, "race": 4}, FacePipeline(image_dependent_detector, 16)
    )
    images = jnp.asarray(RNG.uniform(-1, 1, size=(3, 24, 24, 3)), jnp.float32)
    out = classifier(params, images)
    assert out.logits["gender"].shape == (3, 2) and out.logits["race"].shape == (3, 4) and out.valid.shape == (3,)
    boxes = out.detections.boxes

    def with_fixed_boxes(x):
        crops = crop_and_resize(x, boxes, 16)
        return net.apply(params, crops)["race"][:, 1].sum()

    grad = jax.grad(lambda x: classifier(params, x).logits["race"][:, 1].sum())(images)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(with_fixed_boxes)(images)), atol=1e-6)
    assert np.abs(np.asarray(grad)).sum() > 0


def test_model_input_resizes_and_normalises():
    images = jnp.asarray(RNG.uniform(-1, 1, size=(2, 16, 24, 3)), jnp.float32)
    pixels = np.asarray(model_input(images, 8, IMAGENET_MEAN, IMAGENET_STD))
    assert pixels.shape == (2, 8, 8, 3)
    unit = jax.image.resize((images + 1) / 2, (2, 8, 12, 3), method="bicubic", antialias=True)[:, :, 2:10]
    np.testing.assert_allclose(pixels, (np.asarray(unit) - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)
    same = np.asarray(model_input(images[:, :, :16], 16, CLIP_MEAN, CLIP_STD))
    np.testing.assert_allclose(same, ((np.asarray(images[:, :, :16]) + 1) / 2 - CLIP_MEAN) / CLIP_STD, atol=1e-6)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FairdiffError, match="config.json"):
        load_clip_image_encoder(str(tmp_path))


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_vision")
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
    clip_vision = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, projection_dim=16, **vision)).eval()
    clip_vision.save_pretrained(root / "clip_vision", safe_serialization=True)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    clip_full = CLIPModel(
        CLIPConfig(text_config=text, vision_config={**vision, "image_size": 32}, projection_dim=12)
    ).eval()
    clip_full.save_pretrained(root / "clip_full", safe_serialization=True)
    dino = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            layerscale_value=0.5,
        )
    ).eval()
    with torch.no_grad():  # random layer scales, so a mis-mapped one cannot hide behind its all-equal init
        for param in dino.parameters():
            param.add_(0.1 * torch.randn_like(param))
    dino.save_pretrained(root / "dino", safe_serialization=True)
    return torch, root, clip_vision, clip_full, dino


def relative_error(got, want):
    return np.abs(np.asarray(got) - want).max() / np.abs(want).max()


def test_clip_image_features_match_pytorch(torch_models):
    torch, root, clip_vision, clip_full, _ = torch_models
    images = jnp.asarray(RNG.uniform(-1, 1, size=(2, 48, 48, 3)), jnp.float32)
    pixels = torch.from_numpy(np.asarray(model_input(images, 32, CLIP_MEAN, CLIP_STD)).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want_vision = clip_vision(pixel_values=pixels).image_embeds.numpy()
        want_full = clip_full.get_image_features(pixel_values=pixels).numpy()
    encoder = load_clip_image_encoder(str(root / "clip_vision"))
    assert relative_error(encoder(images), want_vision) <= 1e-4
    assert relative_error(load_clip_image_encoder(str(root / "clip_full"))(images), want_full) <= 1e-4
    grad = jax.grad(lambda x: encoder.bind()(x).sum())(images)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0


@pytest.mark.parametrize("size", [28, 42])  # native size, and one that interpolates the position table
def test_dinov2_features_match_pytorch(torch_models, size):
    torch, root, _, _, dino = torch_models
    images = jnp.asarray(RNG.uniform(-1, 1, size=(2, size, size, 3)), jnp.float32)
    pixels = np.asarray(model_input(images, size, IMAGENET_MEAN, IMAGENET_STD)).transpose(0, 3, 1, 2).copy()
    with torch.no_grad():
        want = dino(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    encoder = load_dinov2_encoder(str(root / "dino"), image_size=size)
    assert relative_error(encoder(images), want) <= 1e-4
