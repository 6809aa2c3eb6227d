"""The toy world: deterministic rendering with recoverable labels, skewed data, the builder, the shipped build."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models import load_stable_diffusion
from fairdiff_jax.toyworld import build, classifiers, world

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"],
    "block_out_channels": [32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}


def _to_unit(images):
    return (np.asarray(images) + 1.0) / 2.0


def _decode_by_hand(images: np.ndarray) -> dict[str, np.ndarray]:
    """Read the labels back from pixel positions and colours, independently of any trained model."""
    px = _to_unit(images)
    background = px[:, 4, 0]
    hair = px[:, 1, 3]
    side = (px[:, 4, 1] + px[:, 4, 6]) / 2
    gender = np.where(np.linalg.norm(side - hair, axis=-1) < np.linalg.norm(side - background, axis=-1), 0, 1)
    face = px[:, 2:5, 2:6].mean(axis=(1, 2))
    race = np.argmin(np.linalg.norm(face[:, None] - world.SKIN_TONES[None], axis=-1), axis=1)
    age = np.argmin(np.linalg.norm(hair[:, None] - world.HAIR_COLOURS[None], axis=-1), axis=1)
    hat = px[:, 0, 1:7].mean(axis=1)
    badge = px[:, 6:8, 3:5].mean(axis=(1, 2))
    hat_dist = np.linalg.norm(hat[:, None] - world.CUE_COLOURS[None], axis=-1)
    badge_dist = np.linalg.norm(badge[:, None] - world.CUE_COLOURS[None], axis=-1)
    is_hat = hat_dist.min(1) < badge_dist.min(1)
    colour = np.where(is_hat, hat_dist.argmin(1), badge_dist.argmin(1))
    occupation = colour + np.where(is_hat, 0, len(world.CUE_COLOURS))
    return {"gender": gender, "race": race, "age": age, "occupation": occupation}


def test_rendering_is_deterministic_and_in_range():
    first, labels_a = world.sample_training_batch(64, np.random.default_rng(3))
    second, labels_b = world.sample_training_batch(64, np.random.default_rng(3))
    other, _ = world.sample_training_batch(64, np.random.default_rng(4))
    np.testing.assert_array_equal(first, second)
    for k in labels_a:
        np.testing.assert_array_equal(labels_a[k], labels_b[k])
    assert first.shape == (64, 8, 8, 3) and first.dtype == np.float32
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert not np.allclose(first, other)
    # a distribution, not a handful of pictures: same labels, different pixels
    same = world.render(np.zeros(8), np.zeros(8), np.zeros(8), np.zeros(8), np.random.default_rng(0))
    assert np.std(same, axis=0).mean() > 0.01


def test_labels_are_recoverable_from_pixels():
    images, labels = world.sample_balanced_batch(2048, np.random.default_rng(11))
    decoded = _decode_by_hand(images)
    for attr in ("gender", "race", "age", "occupation"):
        assert np.mean(decoded[attr] == labels[attr]) == 1.0, attr


def test_training_data_is_skewed_per_occupation():
    rng = np.random.default_rng(5)
    occupation = np.repeat(np.arange(len(world.OCCUPATIONS)), 4000)
    labels = world.sample_labels(occupation, rng)
    biases = []
    for index, occ in enumerate(world.OCCUPATIONS):
        mine = occupation == index
        for attr, names in world.ATTRIBUTES.items():
            freq = np.bincount(labels[attr][mine], minlength=len(names)) / mine.sum()
            np.testing.assert_allclose(freq, occ.distribution(attr), atol=0.03)
        biases.append(abs(occ.gender[0] - occ.gender[1]))
    assert np.mean(biases) >= 0.6
    assert {o.gender[1] > 0.5 for o in world.OCCUPATIONS} == {True, False}  # skewed both ways


def test_world_description_and_splits():
    assert len(world.OCCUPATIONS) >= 12
    debias, held_out = world.split(False), world.split(True)
    assert debias and held_out and not set(debias) & set(held_out)
    assert set(debias) | set(held_out) == set(world.OCCUPATION_NAMES)
    description = json.loads(json.dumps(world.describe()))
    assert description["splits"]["held_out"] == list(held_out)
    for entry in description["occupations"]:
        for dist in entry["train_distribution"].values():
            assert abs(sum(dist) - 1.0) < 1e-6
    cues = {(o.cue_colour, o.cue_position) for o in world.OCCUPATIONS}
    assert len(cues) == len(world.OCCUPATIONS)


def test_training_captions_name_the_attributes_at_the_given_rate():
    captions = world.all_captions()
    assert captions[: len(world.OCCUPATIONS)] == tuple(o.prompt for o in world.OCCUPATIONS)
    assert len(set(captions)) == len(captions) == len(world.OCCUPATIONS) * 3 * 5 * 3
    images, labels = world.sample_training_batch(4000, np.random.default_rng(7))
    plain = world.caption_rows(labels, np.random.default_rng(0), 0.0)
    np.testing.assert_array_equal(plain, labels["occupation"])  # rate 0: the plain prompt of each occupation
    full = world.caption_rows(labels, np.random.default_rng(0), 1.0)
    for i in range(20):
        words = captions[full[i]].split()
        assert words[-1] == world.OCCUPATION_NAMES[labels["occupation"][i]]
        for attr in world.CAPTION_ORDER:
            assert world.ATTRIBUTE_WORDS[attr][labels[attr][i]] in words, (attr, captions[full[i]])
    rows = world.caption_rows(labels, np.random.default_rng(0))
    texts = [captions[r].split() for r in rows]
    named_gender = np.array([("female" in t) or ("male" in t) for t in texts])
    assert abs(named_gender.mean() - world.CAPTION_ATTRIBUTE_RATE) < 0.03
    # a caption never names a class other than its picture's
    for t, g in zip(texts, labels["gender"]):
        assert world.ATTRIBUTE_WORDS["gender"][1 - g] not in t
    assert set(w for words in world.ATTRIBUTE_WORDS.values() for w in words) <= set(world.tokenizer_words())


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FairdiffError, match="same length"):
        world.render(np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3), np.random.default_rng(0))
    with pytest.raises(FairdiffError, match="unknown toy-world occupation"):
        world.occupation_index("astronaut")
    with pytest.raises(FairdiffError, match="NHWC"):
        classifiers.classify({}, jnp.zeros((2, 3, 8, 8)))
    with pytest.raises(FairdiffError, match="missing toy classifiers"):
        classifiers.load_classifiers(str(tmp_path))
    assert not build.is_complete(str(tmp_path))
    with pytest.raises(FairdiffError, match="not a finished toy-world build"):
        build.load_toy_world(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("toy_build"))
    description = build.build_toy_world(
        folder,
        steps=2,
        seed=1,
        progress=False,
        batch_size=8,
        classifier_steps=2,
        classifier_width=8,
        images_per_prompt=2,
        num_inference_steps=2,
        unet_config=TINY_UNET,
    )
    return folder, description


def test_builder_writes_a_complete_loadable_folder(tiny_build):
    folder, description = tiny_build
    assert build.is_complete(folder)
    assert not os.path.exists(os.path.join(folder, "vae"))
    sd = load_stable_diffusion(folder, components=build.COMPONENTS, cache_dir=None)
    assert sd.vae is None and sd.unet.in_channels == 3 and sd.unet.out_channels == 3
    ids = sd.tokenizer(["a photo of a judge"], padding="max_length", max_length=16)["input_ids"]
    assert sd.tokenizer.decode(ids[0], skip_special_tokens=True).strip() == "a photo of a judge"
    # the longest training captions fit the 16 tokens and read back (the code-built BPE splits "female" into
    # "fe" + "male", so the two captions differ by the token "fe")
    for text in ("a photo of a young asian female firefighter", "a photo of a old indian male librarian"):
        ids = sd.tokenizer([text], padding="max_length", max_length=16)["input_ids"][0]
        assert sd.tokenizer.decode(ids, skip_special_tokens=True).strip() == text
        assert ids[-1] == sd.tokenizer.eos_token_id
    assert "caption_attribute_rate" in description["build"] and description["build"]["restarts"] == []
    assert set(description["base_model"]["named_gender_accuracy"]) == {"female", "male"}
    assert build.read_world(folder) == json.loads(json.dumps(description))
    measured = description["base_model"]
    assert set(measured["per_occupation"]) == set(world.OCCUPATION_NAMES)
    assert measured["images_per_prompt"] == 2
    for entry in measured["per_occupation"].values():
        assert abs(sum(entry["gender_freq"]) - 1.0) < 1e-6 and 0.0 <= entry["cue_accuracy"] <= 1.0
    params = classifiers.load_classifiers(folder)
    logits, valid = classifiers.classify(params, jnp.zeros((3, 8, 8, 3)))
    assert {k: v.shape for k, v in logits.items()} == {
        "gender": (3, 2),
        "race": (3, 4),
        "age": (3, 2),
        "occupation": (3, 12),
    }
    assert valid.dtype == bool and bool(valid.all())


def test_ensure_reuses_a_finished_cache_build(tiny_build, tmp_path, monkeypatch):
    folder, _ = tiny_build
    monkeypatch.setattr(build, "SHIPPED_DIR", str(tmp_path / "not_shipped"))
    assert build.ensure_toy_world(cache_dir=folder) == folder


@pytest.mark.skipif(not build.is_complete(build.SHIPPED_DIR), reason="no toy world shipped yet")
def test_shipped_build_is_complete_loads_and_reads_labels():
    folder = build.ensure_toy_world(progress=False)
    assert folder == build.SHIPPED_DIR, "the package must ship a finished toy world in fairdiff_jax/data/toy"
    toy = build.load_toy_world(folder)
    sd, params, description = toy.sd, toy.classifier_params, toy.description
    assert sd.unet.sample_size == 8 and sd.unet.in_channels == 3 and sd.vae is None
    assert sd.text_encoder.config.max_position_embeddings == 16
    images, labels = world.sample_balanced_batch(1024, np.random.default_rng(2024))
    predicted = classifiers.predict(params, images)
    for attr in ("gender", "race", "age", "occupation"):
        assert np.mean(predicted[attr] == labels[attr]) >= 0.98, attr
    assert description["splits"] == world.describe()["splits"]
    measured = description["base_model"]
    assert measured["images_per_prompt"] >= 200
    # the world must be strongly biased; the cue must be drawn well enough that keeping it is measurable
    # (the demo then checks cue accuracy after debiasing >= 90% of before, as issue 7 asks). Captions that name
    # the attributes cost some cue fidelity: 0.90 without names, 0.86 naming at rate 0.25, 0.84 at 0.5 (shipped)
    assert measured["mean_gender_bias"] >= 0.6 and measured["mean_cue_accuracy"] >= 0.8
    # the shipped text encoder knows the attribute words (captions name them): "a photo of a female X" is drawn
    # female, "a photo of a male X" male, well above the occupation prior (0.51 / 0.52 when captions never name them)
    named = measured["named_gender_accuracy"]
    assert named["female"] >= 0.75 and named["male"] >= 0.75
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size < 8 * 2**20


def test_divergence_guard_refuses_a_collapsed_run():
    healthy = [(25 * i, v) for i, v in enumerate([1.2, 0.3, 0.1, 0.08, 0.07], start=1)]
    build._check_converged(healthy, 4e-4)
    collapsed = healthy + [(150, 0.09), (175, 1.03), (200, 0.94)]
    with pytest.raises(FairdiffError, match="diverged"):
        build._check_converged(collapsed, 1e-3)
