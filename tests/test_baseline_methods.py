"""The baseline entry point: config sections with the papers' defaults, and each method's effect on a run."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fairdiff_jax import baselines as B
from fairdiff_jax.errors import FairdiffError


@pytest.fixture(scope="module")
def embed(tiny_sd):
    def embed_prompts(prompts):
        ids = np.asarray(
            tiny_sd.tokenizer(list(prompts), padding="max_length", max_length=16, truncation=True).input_ids, np.int32
        )
        return np.asarray(tiny_sd.text_encoder(ids, params=tiny_sd.text_encoder_params).last_hidden_state), ids

    return embed_prompts


def test_method_settings_round_trip_and_reject_unknown_keys():
    for name, cls in B.METHODS.items():
        assert B.method_config(name, B.method_defaults(name)) == cls()
    assert B.method_config("debiasvl", {"lam": 3.0}).lam == 3.0
    assert B.method_defaults("fair_diffusion")["edit_guidance_scale"] == 4.0  # Fair Diffusion's own setting
    with pytest.raises(FairdiffError, match="allowed"):
        B.method_config("uce", {"lambda": 0.5})
    with pytest.raises(FairdiffError, match="choose one of"):
        B.method_config("concept_algebra")


def test_each_method_changes_only_its_part_of_the_run(tiny_sd, embed):
    common = dict(
        attributes=["gender"],
        targets=[np.asarray([0.5, 0.5])],
        embed=embed,
        eos_token_id=tiny_sd.tokenizer.eos_token_id,
    )
    prompts = ["a photo of a doctor", "a photo of a nurse"]
    ethical = B.prepare_baseline("ethical_intervention", {}, **common)
    assert ethical.rewrite_prompts(prompts)[1].endswith("can be a nurse irrespective of their gender")
    assert ethical.map_conditioning is None and ethical.unet_params is None and ethical.guidance is None

    debias = B.prepare_baseline("debiasvl", {}, concepts=["doctor", "nurse", "pilot"], **common)
    cond, _ = embed(prompts)
    mapped = np.asarray(debias.map_conditioning(cond))
    assert mapped.shape == cond.shape and np.abs(mapped - cond).max() > 1e-3
    assert debias.rewrite_prompts(prompts) == prompts and debias.info["num_pairs"] == 3

    fair = B.prepare_baseline("fair_diffusion", {"warmup_steps": 2}, **common)
    assert fair.guidance.concept_emb.shape == (2, 16, 32) and fair.guidance.config.warmup_steps == 2
    assert fair.guidance.directions(jax.random.PRNGKey(0), 6).shape == (6, 2)

    measured = []

    def measure(params, pending):
        measured.append(len(pending))
        return {p: [0.2, 0.8] if len(measured) == 1 else [0.5, 0.5] for p in pending}

    edited = B.prepare_baseline(
        "uce",
        {"templates": ["photo of {}", "{}"]},
        unet_params=tiny_sd.unet_params,
        concepts=["doctor"],
        preserve_prompts=["nurse"],
        measure=measure,
        **common,
    )
    assert measured == [2, 2] and edited.info["rounds"] == 2
    changed = {
        path[-3:-1]
        for path, value in flatten_dict(edited.unet_params).items()
        if np.abs(np.asarray(value) - np.asarray(flatten_dict(tiny_sd.unet_params)[path])).max() > 0
    }
    assert changed == {("attn2", "to_k"), ("attn2", "to_v")}
    with pytest.raises(FairdiffError, match="measure"):
        B.prepare_baseline("uce", {}, concepts=["doctor"], **common)
