"""Issue #13's options wired into configs, generation and the train step (the functions are tested against their
outside references in test_faithful_schedules, test_lora_precision, test_factor_selection, test_age_cost_weights,
test_ema_warmup and test_prompt_context; here: that configs reach them)."""

import dataclasses
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairdiff_jax.adaptors.spec import spec_for_kind
from fairdiff_jax.adaptors.transform import adapt_weights, init_adaptor
from fairdiff_jax.config import load_config
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.generation import embed, prompt_mask, tokenize, uncond_ids
from fairdiff_jax.schedules import timesteps_for
from fairdiff_jax.train_step import LossSettings, TrainState, apply_update, semantic_weights

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_world import tiny_config, tiny_run  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PROMPT = "a photo of a doctor"


@pytest.fixture(scope="module")
def prompt_run(tiny_sd_path):
    cfg = tiny_config(tiny_sd_path, "--config.data.prompt_padding=prompt", "--config.sampler.timestep_spacing=trailing")
    return cfg, tiny_run(tiny_sd_path, cfg)


def test_paper_configs_carry_the_authors_settings(tiny_sd_path):
    for name in ("gender", "race", "gender_race", "gender_race_age", "multi_concept"):
        cfg = load_config(os.path.join(CONFIGS, f"{name}.py"), [f"--config.model.path={tiny_sd_path}"])
        assert cfg.data.prompt_padding == "prompt" and cfg.adaptor.ema_warmup
        assert cfg.sampler.timestep_spacing == "" and cfg.sampler.final_sigmas_type == "sigma_min"
    cfg = load_config(os.path.join(CONFIGS, "gender_race_age.py"), [f"--config.model.path={tiny_sd_path}"])
    loss = LossSettings.from_config(cfg)
    assert loss.cost_weights == (("age", ((1.0, 1.0), (2.0, 1.0))),) and loss.ema_warmup
    assert dict(loss.factor1) == {"age": 0.6, "gender": 0.2, "race": 0.6}
    with pytest.raises(FairdiffError, match="cost_weights"):
        load_config(os.path.join(CONFIGS, "gender.py"), ["--config.attributes.gender.cost_weights=((1.0,),)"])
    with pytest.raises(FairdiffError, match="final_sigmas_type"):
        load_config(os.path.join(CONFIGS, "gender.py"), ["--config.sampler.final_sigmas_type=karras"])


def test_factor1_is_chosen_per_attribute_in_the_step(tiny_sd_path):
    cfg = load_config(os.path.join(CONFIGS, "gender_race.py"), [f"--config.model.path={tiny_sd_path}"])
    model = types.SimpleNamespace(loss=LossSettings.from_config(cfg))
    labels = {"gender": jnp.array([1, 1, 0, 1]), "race": jnp.array([2, 3, 3, 2])}
    original = {"gender": jnp.array([1, 1, 1, -1]), "race": jnp.array([2, 2, 2, 2])}
    weights = semantic_weights(model, labels, original, jnp.array([True, True, True, False]))
    # none differs; race only; both (the minimum); no face (the minimum of all factors)
    np.testing.assert_allclose(np.asarray(weights), [1.0, 0.6, 0.2, 0.2])


def test_schedule_comes_from_the_model_folder_and_the_config(tiny_sd_path, prompt_run):
    torch = pytest.importorskip("torch")  # noqa: F841
    from diffusers import DPMSolverMultistepScheduler

    with open(os.path.join(tiny_sd_path, "scheduler", "scheduler_config.json")) as f:
        folder_config = json.load(f)
    assert "timestep_spacing" not in folder_config
    default = tiny_run(tiny_sd_path, tiny_config(tiny_sd_path)).pipeline.schedule
    for config, schedule in ((folder_config, default), (dict(folder_config, timestep_spacing="trailing"), None)):
        schedule = schedule or prompt_run[1].pipeline.schedule
        reference = DPMSolverMultistepScheduler.from_config(config)
        reference.set_timesteps(20)
        np.testing.assert_array_equal(timesteps_for(schedule, 20), reference.timesteps.numpy())


def test_prompt_padding_reaches_tokenize_and_embed(tiny_sd_path, prompt_run):
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextModel

    _, run = prompt_run
    pipeline = run.pipeline
    ids = tokenize(pipeline, [PROMPT], soft_tokens=False)
    authors = pipeline.tokenizer([PROMPT], padding=True)  # the authors' call
    np.testing.assert_array_equal(ids, authors["input_ids"])
    empty = uncond_ids(pipeline, ids)
    authors_empty = pipeline.tokenizer([""], padding="max_length", max_length=ids.shape[1])
    np.testing.assert_array_equal(empty, authors_empty["input_ids"])
    np.testing.assert_array_equal(
        np.asarray(prompt_mask(pipeline, jnp.asarray(empty))), authors_empty["attention_mask"]
    )
    reference = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").eval()
    for token_ids, tokens in ((ids, authors), (empty, authors_empty)):
        ours = embed(pipeline, run.frozen["text_encoder"], jnp.asarray(token_ids))
        with torch.no_grad():
            want = reference(torch.tensor(tokens["input_ids"]), torch.tensor(tokens["attention_mask"]))
        np.testing.assert_allclose(np.asarray(ours), want.last_hidden_state.numpy(), rtol=1e-4, atol=1e-5)
    plain = dataclasses.replace(pipeline, prompt_padding="max_length")
    assert tokenize(plain, [PROMPT], soft_tokens=False).shape[1] == plain.max_length > ids.shape[1]
    assert prompt_mask(plain, jnp.asarray(ids)) is None


def test_bf16_weights_generate_through_the_fp32_branch(tiny_sd_path):
    from fairdiff_jax.models import load_stable_diffusion

    sd = load_stable_diffusion(tiny_sd_path, dtype=jnp.bfloat16, cache_dir=None)
    spec = spec_for_kind(
        "both",
        sd.unet_params,
        sd.text_encoder_params,
        base_model="tiny",
        rank=2,
        alpha=2.0,
        num_tokens=0,
        ema_decay=0.9,
    )
    params = init_adaptor(jax.random.PRNGKey(0), spec, sd.unet_params, sd.text_encoder_params)
    unet, text, branches = adapt_weights(spec, params, sd.unet_params, sd.text_encoder_params)
    assert set(branches) == {"unet", "text_encoder"}
    assert unet is sd.unet_params and text is sd.text_encoder_params  # bf16 kernels are left as they are
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (sd.unet_params, sd.text_encoder_params))
    unet, text, branches = adapt_weights(spec, params, *f32)
    assert branches == {} and unet is not f32[0]  # float32 kernels: merged


def test_ema_warms_up_in_the_update():
    model = types.SimpleNamespace(
        loss=types.SimpleNamespace(ema_warmup=True), spec=types.SimpleNamespace(ema_decay=0.996)
    )
    optimizer = optax.sgd(1.0)
    params = {"w": jnp.zeros(3)}
    state = TrainState(params, {"w": jnp.zeros(3)}, optimizer.init(params), jnp.zeros((), jnp.int32), jnp.asarray(0))
    grads = {"w": -jnp.ones(3)}
    state, _ = apply_update(model, optimizer, state, grads, jnp.asarray(1.0))
    np.testing.assert_allclose(np.asarray(state.ema["w"]), 1.0)  # update 1: decay 0, the EMA is the parameters
    state, _ = apply_update(model, optimizer, state, grads, jnp.asarray(1.0))
    np.testing.assert_allclose(np.asarray(state.ema["w"]), 2 / 11 * 1.0 + 9 / 11 * 2.0, rtol=1e-6)  # decay 2/11
    state, _ = apply_update(model, optimizer, state, {"w": jnp.full(3, jnp.nan)}, jnp.asarray(1.0))
    assert int(state.ema_updates) == 2 and int(state.skipped) == 1  # a refused update is not counted


def test_lambda_img_without_encoders_is_refused(tiny_sd_path, tmp_path):
    from fairdiff_jax.train import train

    cfg = tiny_config(tiny_sd_path)
    run = dataclasses.replace(tiny_run(tiny_sd_path, cfg), feature_fns=())
    with pytest.raises(FairdiffError, match="loss.clip_path and --config.loss.dino_path") as info:
        train(cfg, str(tmp_path / "run"), run=run, progress=False)
    assert "lambda_img=0" in str(info.value) and "\n" not in str(info.value)
