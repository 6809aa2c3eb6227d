"""Fair Diffusion's semantic guidance against a hand-written formula and diffusers' SEGA pipeline.

The pipeline test runs diffusers' ``SemanticStableDiffusionPipeline`` on the tiny SD folder, records every U-Net
output (unconditional, text and concept chunks) and the guided prediction handed to the scheduler, and replays
the recorded chunks through :func:`semantic_guidance`, carrying the momentum across steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax import baselines as B
from fairdiff_jax.errors import FairdiffError


def _reference_step(u, t, e, directions, momentum, step, w, config):
    """The Fair Diffusion / SEGA update written out element by element (numpy float64)."""
    edit = np.zeros_like(u)
    for c in range(e.shape[0]):
        for b in range(u.shape[0]):
            for ch in range(u.shape[1]):
                g = config.edit_guidance_scale * directions[b, c] * (e[c, b, ch] - u[b, ch])
                cutoff = np.quantile(np.abs(g), config.threshold)
                edit[b, ch] += np.where(np.abs(g) >= cutoff, g, 0.0)
    edit = edit + config.momentum_scale * momentum
    momentum = config.momentum_beta * momentum + (1 - config.momentum_beta) * edit
    guided = u + w * (t - u) + (edit if step >= config.warmup_steps else 0.0)
    return guided, momentum


def test_semantic_guidance_matches_the_formula_over_several_steps():
    config = B.FairDiffusionConfig(warmup_steps=2, threshold=0.9)
    rng = np.random.default_rng(0)
    directions = np.asarray([[1.0, -1.0, 1.0], [-1.0, 1.0, 0.0]])
    ours_m = jnp.zeros((2, 4, 6, 6))
    ref_m = np.zeros((2, 4, 6, 6))
    for step in range(5):
        u, t = rng.normal(size=(2, 2, 4, 6, 6))
        e = rng.normal(size=(3, 2, 4, 6, 6))
        ours, ours_m = B.semantic_guidance(
            jnp.asarray(u, jnp.float32),
            jnp.asarray(t, jnp.float32),
            jnp.asarray(e, jnp.float32),
            jnp.asarray(directions),
            ours_m,
            step,
            7.5,
            config,
        )
        ref, ref_m = _reference_step(u, t, e, directions, ref_m, step, 7.5, config)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)
        np.testing.assert_allclose(np.asarray(ours_m), ref_m, atol=2e-5)
        if step < config.warmup_steps:  # before the warm-up ends it is plain classifier-free guidance
            np.testing.assert_allclose(np.asarray(ours), u + 7.5 * (t - u), atol=2e-5)


def test_fair_guided_output_batches_the_unet_call_in_order():
    def unet_fn(params, latents, timesteps, context):  # depends on each sample's own context and the timestep
        return latents * (1.0 + context.mean(axis=(1, 2)))[:, None, None, None] + 1e-3 * timesteps[:, None, None, None]

    rng = np.random.default_rng(1)
    latents = jnp.asarray(rng.normal(size=(2, 4, 5, 5)), jnp.float32)
    cond, uncond = jnp.asarray(rng.normal(size=(2, 2, 3, 8)), jnp.float32)
    concepts = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    directions = jnp.asarray([[1.0, -1.0], [-1.0, 1.0]])
    momentum = jnp.asarray(rng.normal(size=(2, 4, 5, 5)), jnp.float32)
    ours, ours_m = B.fair_guided_output(
        unet_fn, None, latents, jnp.asarray(500), cond, uncond[:1], concepts, directions, momentum, 7, 7.5
    )
    steps = jnp.full((2,), 500)
    u = unet_fn(None, latents, steps, jnp.broadcast_to(uncond[:1], cond.shape))
    t = unet_fn(None, latents, steps, cond)
    e = jnp.stack([unet_fn(None, latents, steps, jnp.broadcast_to(c, cond.shape)) for c in concepts])
    ref, ref_m = B.semantic_guidance(u, t, e, directions, momentum, 7, 7.5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours_m), np.asarray(ref_m), rtol=1e-6)
    with pytest.raises(FairdiffError, match="draw_directions"):
        B.fair_guided_output(unet_fn, None, latents, 500, cond, uncond, concepts, directions[:, :1], momentum, 0, 7.5)


def test_directions_follow_the_target_distribution():
    directions = np.asarray(B.draw_directions(jax.random.PRNGKey(0), [(0.3, 0.7), (0.25, 0.25, 0.25, 0.25)], 4000))
    assert directions.shape == (4000, 6)
    assert set(np.unique(directions)) == {-1.0, 1.0}
    np.testing.assert_array_equal((directions[:, :2] > 0).sum(1), 1)  # one class towards per attribute
    np.testing.assert_array_equal((directions[:, 2:] > 0).sum(1), 1)
    np.testing.assert_allclose((directions[:, :2] > 0).mean(0), [0.3, 0.7], atol=0.03)
    np.testing.assert_allclose((directions[:, 2:] > 0).mean(0), [0.25] * 4, atol=0.03)
    assert B.edit_prompts(["gender"]) == ["female person", "male person"]


@pytest.mark.torch
def test_guidance_matches_diffusers_sega_pipeline(tiny_sd_path):
    torch = pytest.importorskip("torch", reason="the pipeline check needs the torch extra: pip install -e '.[torch]'")
    from diffusers import DDIMScheduler, SemanticStableDiffusionPipeline

    pipe = SemanticStableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    unet_outputs, guided = [], []
    pipe.unet.register_forward_hook(lambda module, args, out: unet_outputs.append(out.sample.detach().numpy().copy()))
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        guided.append(model_output.detach().numpy().copy())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    config = B.FairDiffusionConfig(warmup_steps=3)
    pipe(
        prompt=["a photo of the face of a doctor"] * 2,
        num_inference_steps=8,
        guidance_scale=7.5,
        editing_prompt=["male person", "female person"],
        reverse_editing_direction=[True, False],  # away from "male person", towards "female person"
        edit_guidance_scale=config.edit_guidance_scale,
        edit_warmup_steps=config.warmup_steps,
        edit_threshold=config.threshold,
        edit_momentum_scale=config.momentum_scale,
        edit_mom_beta=config.momentum_beta,
        output_type="latent",
        generator=torch.manual_seed(0),
    )
    assert len(unet_outputs) == len(guided) == 8
    directions = jnp.asarray([[-1.0, 1.0], [-1.0, 1.0]])
    momentum = jnp.zeros(guided[0].shape)
    worst = 0.0
    for i, (out, theirs) in enumerate(zip(unet_outputs, guided)):
        chunks = jnp.asarray(out.reshape(4, 2, *out.shape[1:]))  # uncond, text, then the two concepts
        ours, momentum = B.semantic_guidance(chunks[0], chunks[1], chunks[2:], directions, momentum, i, 7.5, config)
        err = float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())
        worst = max(worst, err)
        if i >= config.warmup_steps:  # the edit is active: our result must differ from plain guidance
            plain = np.asarray(chunks[0] + 7.5 * (chunks[1] - chunks[0]))
            assert np.abs(plain - theirs).max() > 1e-3 * np.abs(theirs).max()
    print(f"Fair Diffusion guidance, max relative error vs diffusers SEGA over 8 steps: {worst:.2e}")
    assert worst < 1e-5


def _guided_inputs(tiny_sd, prompt, concepts):
    ids = np.asarray(
        tiny_sd.tokenizer([prompt, "", *concepts], padding="max_length", max_length=16, truncation=True).input_ids
    )
    hidden = tiny_sd.text_encoder(ids, params=tiny_sd.text_encoder_params).last_hidden_state
    return hidden[:1], hidden[1:2], hidden[2:]


def test_guide_state_is_kept_on_padded_steps(tiny_sd):
    from fairdiff_jax import sampling

    cond, uncond, concepts = _guided_inputs(tiny_sd, "a photo of a doctor", ["male person", "female person"])
    noise = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8))
    guide = B.SemanticGuide(concepts, jnp.asarray([[-1.0, 1.0], [1.0, -1.0]]), B.FairDiffusionConfig(warmup_steps=1))
    schedule = sampling.make_schedule(tiny_sd.scheduler)
    unet_fn = sampling.unet_apply_fn(tiny_sd.unet)
    args = (unet_fn, tiny_sd.unet_params, noise, jnp.broadcast_to(cond, (2, 16, 32)), uncond, 4, schedule)
    padded = sampling.sample_latents(*args, max_steps=6, guidance_scale=7.5, gradient_mode="detached", guide=guide)
    exact = sampling.sample_latents(*args, max_steps=4, guidance_scale=7.5, gradient_mode="detached", guide=guide)
    plain = sampling.sample_latents(*args, max_steps=4, guidance_scale=7.5, gradient_mode="detached")
    np.testing.assert_allclose(np.asarray(padded), np.asarray(exact), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(exact - plain).max()) > 1e-2  # the guide changes the samples


@pytest.mark.torch
def test_sampling_with_the_guide_matches_diffusers_sega_end_to_end(tiny_sd, tiny_sd_path):
    torch = pytest.importorskip("torch", reason="the pipeline check needs the torch extra: pip install -e '.[torch]'")
    from diffusers import DDIMScheduler, SemanticStableDiffusionPipeline

    from fairdiff_jax import sampling

    pipe = SemanticStableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    config = B.FairDiffusionConfig(warmup_steps=2)
    prompt, concepts = "a photo of the face of a nurse", ["male person", "female person"]
    noise = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    theirs = pipe(
        prompt=[prompt] * 2,
        latents=torch.from_numpy(noise),
        num_inference_steps=8,
        guidance_scale=7.5,
        editing_prompt=concepts,
        reverse_editing_direction=[False, True],  # towards "male person", away from "female person"
        edit_guidance_scale=config.edit_guidance_scale,
        edit_warmup_steps=config.warmup_steps,
        edit_threshold=config.threshold,
        edit_momentum_scale=config.momentum_scale,
        edit_mom_beta=config.momentum_beta,
        output_type="latent",
    ).images.numpy()
    cond, uncond, concept_emb = _guided_inputs(tiny_sd, prompt, concepts)
    guide = B.SemanticGuide(concept_emb, jnp.asarray([[1.0, -1.0]] * 2), config)
    ours = sampling.sample_latents(
        sampling.unet_apply_fn(tiny_sd.unet),
        tiny_sd.unet_params,
        jnp.asarray(noise),
        jnp.broadcast_to(cond, (2, 16, 32)),
        uncond,
        8,
        sampling.make_schedule(tiny_sd.scheduler),
        max_steps=8,
        solver="ddim",
        guidance_scale=7.5,
        gradient_mode="detached",
        guide=guide,
    )
    err = float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())
    print(f"DDIM + Fair Diffusion guidance, 8 steps: relative error of the final latents vs diffusers {err:.2e}")
    assert err < 1e-4
