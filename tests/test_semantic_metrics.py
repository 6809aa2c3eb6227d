"""CLIP-T / CLIP-I / DINO: CLIP text-tower parity with PyTorch transformers, the metrics against an independent
numpy computation, and a 2-prompt end-to-end ``evaluate`` that writes them into metrics.json and table.md."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from fairdiff_jax.attributes.clip_text import load_clip_text_encoder
from fairdiff_jax.attributes.tiny_encoders import write_tiny_clip_folder, write_tiny_dinov2_folder
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.evaluate import evaluate
from fairdiff_jax.semantic_metrics import embed_results, load_semantic_scorer, semantic_metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_world import tiny_config, tiny_run, write_finished_run  # noqa: E402

PROMPTS = ["a photo of a doctor", "a photo of the face of a nurse, a person", "a " * 30]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("semantic")
    return write_tiny_clip_folder(str(root / "clip"), seed=1), write_tiny_dinov2_folder(str(root / "dino"), seed=2)


@pytest.fixture(scope="module")
def scorer(folders):
    return load_semantic_scorer(*folders, batch_size=8)


def independent_embeddings(scorer, images_uint8):
    """Embeddings by a plain (unjitted, unbatched) call of each encoder on ``[M, H, W, 3]`` uint8 images."""
    images = np.asarray(images_uint8, np.float32) / 127.5 - 1.0
    return {"clip": np.asarray(scorer.clip(images)), "dino": np.asarray(scorer.dino(images))}


def numpy_cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.einsum("nd,nd->n", a, b) / np.sqrt(np.einsum("nd,nd->n", a, a) * np.einsum("nd,nd->n", b, b))


@pytest.mark.torch
def test_clip_text_embeddings_match_pytorch(folders):
    torch = pytest.importorskip("torch")
    from transformers import CLIPModel

    model, info = CLIPModel.from_pretrained(folders[0], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the tiny folder is a complete CLIPModel
    encoder = load_clip_text_encoder(folders[0])
    ids = encoder.token_ids(PROMPTS)
    eos = model.config.text_config.eos_token_id
    assert ids.shape == (3, 16) and ids[2, -1] == eos  # an over-long prompt is truncated but keeps its end token
    with torch.no_grad():
        want = model.eval().get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).numpy()
    got = encoder(PROMPTS)
    assert got.shape == want.shape == (3, 12)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_metrics_on_hand_built_embeddings():
    # prompt 0: cosines to the text (1, 0) are 1 and 0; prompt 1: 1/sqrt(2) and 1
    adapted = [{"clip": np.array([[2.0, 0.0], [0.0, 3.0]])}, {"clip": np.array([[1.0, 1.0], [5.0, 0.0]])}]
    text = np.array([[1.0, 0.0], [1.0, 0.0]])
    # against the original: prompt 0 identical images (1, 1); prompt 1 opposite and orthogonal (-1, 0)
    original = [{"clip": np.array([[1.0, 0.0], [0.0, 1.0]])}, {"clip": np.array([[-1.0, -1.0], [0.0, 2.0]])}]
    out = semantic_metrics(adapted, text, original)
    assert set(out) == {"clip_t", "clip_i"}  # no DINO embeddings, no DINO metric
    clip_t = [0.5, (2**-0.5 + 1) / 2]
    assert out["clip_t"]["per_prompt"] == pytest.approx(clip_t)
    assert out["clip_t"]["mean"] == pytest.approx(np.mean(clip_t)) and out["clip_t"]["std"] == pytest.approx(
        np.std(clip_t)
    )
    assert out["clip_t"]["std_images"] == pytest.approx(np.std([1, 0, 2**-0.5, 1]))
    assert out["clip_i"]["per_prompt"] == pytest.approx([1.0, -0.5]) and out["clip_i"]["mean"] == pytest.approx(0.25)
    assert set(semantic_metrics(adapted, None, None)) == set()


def test_scorer_metrics_equal_independent_numpy(scorer):
    rng = np.random.default_rng(0)
    original = [rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8) for _ in range(2)]  # 10 > batch 8: 2 chunks
    adapted = [np.clip(o.astype(int) + rng.integers(-60, 60, o.shape), 0, 255).astype(np.uint8) for o in original]
    prompts = PROMPTS[:2]
    embeds = embed_results(scorer, [{"images": a} for a in adapted])
    original_embeds = embed_results(scorer, [{"images": o} for o in original])
    text = scorer.embed_prompts(prompts)
    out = semantic_metrics(embeds, text, original_embeds)

    reference = [independent_embeddings(scorer, a) for a in adapted]
    reference_original = [independent_embeddings(scorer, o) for o in original]
    reference_text = np.asarray(scorer.clip_text(prompts))
    for got, want in zip(embeds, reference):
        for key in ("clip", "dino"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
    expected = {
        "clip_t": [numpy_cosines(r["clip"], np.repeat(t[None], 10, 0)) for r, t in zip(reference, reference_text)],
        "clip_i": [numpy_cosines(r["clip"], o["clip"]) for r, o in zip(reference, reference_original)],
        "dino": [numpy_cosines(r["dino"], o["dino"]) for r, o in zip(reference, reference_original)],
    }
    for key, per_image in expected.items():
        per_prompt = [v.mean() for v in per_image]
        assert out[key]["per_prompt"] == pytest.approx(per_prompt, abs=1e-5)
        assert out[key]["mean"] == pytest.approx(np.mean(per_prompt), abs=1e-5)
        assert out[key]["std"] == pytest.approx(np.std(per_prompt), abs=1e-5)
    assert out["clip_i"]["mean"] < 0.999 and out["dino"]["mean"] < 0.999  # the perturbation is visible

    itself = semantic_metrics(embeds, text, embeds)  # a model against itself
    for key in ("clip_i", "dino"):
        assert itself[key]["mean"] == pytest.approx(1.0, abs=1e-6) and itself[key]["std"] == pytest.approx(0, abs=1e-6)


def test_clip_folder_without_tokenizer_is_a_clear_error(folders, tmp_path):
    broken = str(tmp_path / "clip")
    shutil.copytree(folders[0], broken)
    os.remove(os.path.join(broken, "vocab.json"))
    with pytest.raises(FairdiffError, match="vocab.json"):
        load_clip_text_encoder(broken)
    assert load_semantic_scorer("", "") is None


def test_evaluate_writes_clip_and_dino_metrics(tiny_sd_path, folders, tmp_path):
    clip_path, dino_path = folders
    cfg = tiny_config(
        tiny_sd_path,
        "--config.eval.images_per_prompt=4",
        "--config.sampler.eval_steps=2",
        "--config.eval.batch_size=8",
        f"--config.eval.clip_path={clip_path}",
        f"--config.eval.dino_path={dino_path}",
    )
    comp = tiny_run(tiny_sd_path, cfg)
    comp.eval_prompts = {"test": PROMPTS[:2]}
    workdir = str(tmp_path / "run")
    write_finished_run(workdir, comp)  # an adaptor that changes the images
    out = str(tmp_path / "eval")
    evaluate(cfg, workdir, out, run=comp, progress=False)

    with open(os.path.join(out, "metrics.json")) as f:
        stored = json.load(f)
    for key in ("clip_t", "clip_i", "dino"):
        assert set(stored[key]) >= {"mean", "std"} and -1.0 <= stored[key]["mean"] <= 1.0
    assert "clip_t" in stored["models"]["original"] and "clip_i" not in stored["models"]["original"]

    # CLIP-I / DINO pair each debiased image with the original image from the same noise
    scorer = load_semantic_scorer(clip_path, dino_path)
    for key, name in (("clip", "clip_i"), ("dino", "dino")):
        per_prompt = []
        for index in range(2):
            debiased = np.load(os.path.join(out, "debiased", "test", f"prompt_{index:04d}.npz"))["images"]
            original = np.load(os.path.join(out, "original", "test", f"prompt_{index:04d}.npz"))["images"]
            cos = numpy_cosines(
                independent_embeddings(scorer, debiased)[key], independent_embeddings(scorer, original)[key]
            )
            per_prompt.append(cos.mean())
        assert stored[name]["per_prompt"] == pytest.approx(per_prompt, abs=1e-5)

    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert table[0] == "| model | gender | CLIP-T | CLIP-I | DINO |"
    original_row = next(line for line in table if line.startswith("| original |"))
    debiased_row = next(line for line in table if line.startswith("| debiased (step 1) |"))
    original_clip_t = stored["models"]["original"]["clip_t"]["mean"]
    assert original_row.endswith("| — | — |") and f"| {original_clip_t:.2f}±" in original_row
    assert (
        "—" not in debiased_row
        and f"{stored['clip_i']['mean']:.2f}±{stored['clip_i']['std_images']:.2f}" in debiased_row
    )

    # without the original model, CLIP-I / DINO come from the stored original images (or a named folder)
    alone = evaluate(cfg, workdir, out, include_original=False, run=comp, progress=False)
    assert alone["clip_i"]["per_prompt"] == pytest.approx(stored["clip_i"]["per_prompt"], abs=1e-6)
    elsewhere = str(tmp_path / "elsewhere")
    alone = evaluate(cfg, workdir, elsewhere, include_original=False, run=comp, progress=False)
    assert "clip_i" not in alone and "clip_t" in alone
    named = os.path.join(out, "original", "test")
    alone = evaluate(cfg, workdir, elsewhere, include_original=False, original_images=named, run=comp, progress=False)
    assert alone["dino"]["per_prompt"] == pytest.approx(stored["dino"]["per_prompt"], abs=1e-6)
    with pytest.raises(FairdiffError, match="original-images"):
        evaluate(cfg, workdir, elsewhere, include_original=False, original_images=workdir, run=comp)
