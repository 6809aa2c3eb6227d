"""Exported adaptors load into PyTorch diffusers and reproduce the JAX adapted model.

A workdir is built as the train loop leaves it (adaptor.json + orbax checkpoints holding params, EMA and an
optimizer item), exported with ``fairdiff export``, and loaded with ``pipe.load_lora_weights`` /
``pipe.load_textual_inversion``. With random non-zero LoRA factors and soft tokens, the PyTorch U-Net noise
prediction and text-encoder hidden states must equal the JAX adapted model's.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export checks need the torch extra: pip install -e '.[torch]'")
pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft: pip install -e '.[torch]'")

from diffusers import StableDiffusionPipeline  # noqa: E402

from fairdiff_jax import adaptors as A  # noqa: E402
from fairdiff_jax.checkpoints import Checkpointer  # noqa: E402
from fairdiff_jax.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-4
NUM_TOKENS = 5
PROMPTS = ["a photo of the face of a doctor", "a photo of a nurse"]


def _rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _random_adaptor(params, seed, std):
    """Every LoRA factor and soft token replaced by random values (as after training)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def exported(tiny_sd, tmp_path_factory):
    """(spec, EMA params, OUT) after 'fairdiff export' of a workdir whose EMA differs from the raw params."""
    spec = A.make_adaptor_spec(
        tiny_sd.unet_params,
        tiny_sd.text_encoder_params,
        base_model=tiny_sd.path,
        lora_rank=4,
        lora_alpha=6.0,
        lora_targets=["unet", "text_encoder"],
        num_soft_tokens=NUM_TOKENS,
    )
    initial = A.init_adaptor(jax.random.PRNGKey(0), spec, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    ema = _random_adaptor(initial, seed=1, std=0.1)
    raw = _random_adaptor(initial, seed=2, std=0.1)
    workdir = str(tmp_path_factory.mktemp("run"))
    out = str(tmp_path_factory.mktemp("export"))
    A.write_adaptor_metadata(workdir, spec)
    with Checkpointer(workdir, save_every=3) as checkpointer:
        checkpointer.save(3, {"params": raw, "ema": ema}, {"count": jnp.asarray(3)}, {"prompts": {}})
    assert cli_main(["export", "--workdir", workdir, "--out", out]) == 0
    return spec, ema, out


@pytest.fixture(scope="module")
def pipes(tiny_sd_path, exported):
    """(base pipeline, pipeline with the exported LoRA and soft tokens loaded)."""
    _, _, out = exported
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    adapted = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    adapted.load_lora_weights(out)
    adapted.load_textual_inversion(os.path.join(out, "learned_embeds.safetensors"))
    return base, adapted


def test_export_writes_every_format(exported):
    _, _, out = exported
    names = sorted(os.listdir(out))
    assert names == ["adaptor.json", "flax_adaptor", "learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]


def _torch_ids(pipe, prompts):
    texts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True)
    return np.asarray(tokens.input_ids)


def test_text_encoder_matches_diffusers(tiny_sd, exported, pipes):
    spec, ema, _ = exported
    base, adapted = pipes
    vocab = A.soft_tokens.token_embedding(tiny_sd.text_encoder_params).shape[0]
    tokenizer, _ = A.add_soft_tokens(tiny_sd.tokenizer, NUM_TOKENS, spec.soft_token, vocab_size=vocab)
    cond = A.conditional_prompt_ids(tokenizer, PROMPTS, spec.soft_token, NUM_TOKENS)
    uncond = A.prompt_ids(tokenizer, [""])
    torch_cond = _torch_ids(adapted, [f"{spec.soft_token} {p}" for p in PROMPTS])
    np.testing.assert_array_equal(cond, torch_cond)  # diffusers expands "<fair>" into the same ids
    np.testing.assert_array_equal(uncond, _torch_ids(adapted, [""]))

    _, text_params = A.apply_adaptor(spec, ema, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    encoder = A.grow_text_encoder(tiny_sd.text_encoder, NUM_TOKENS)
    ids = np.concatenate([cond, uncond])
    ours = np.asarray(encoder(ids, params=text_params).last_hidden_state)
    with torch.no_grad():
        theirs = adapted.text_encoder(torch.from_numpy(ids).long())[0].numpy()
        base_hidden = base.text_encoder(torch.from_numpy(uncond).long())[0].numpy()
    err = _rel_err(ours, theirs)
    print(f"text encoder (LoRA + {NUM_TOKENS} soft tokens) relative error vs diffusers: {err:.2e}")
    assert err <= TOL
    assert _rel_err(base_hidden, theirs[-1:]) > 1e-2  # the adaptor changes even the unconditional embedding


def test_unet_matches_diffusers(tiny_sd, exported, pipes):
    spec, ema, _ = exported
    base, adapted = pipes
    unet_params, _ = A.apply_adaptor(spec, ema, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    timesteps = np.asarray([25, 800])
    context = rng.standard_normal((2, 16, 32)).astype(np.float32)
    ours = tiny_sd.unet.apply(
        {"params": unet_params}, jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context)
    )
    ours = np.asarray(ours.sample)
    with torch.no_grad():
        args = (torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context))
        theirs = adapted.unet(*args).sample.numpy()
        base_eps = base.unet(*args).sample.numpy()
    err = _rel_err(ours, theirs)
    print(f"U-Net LoRA relative error vs diffusers: {err:.2e}")
    assert err <= TOL
    assert _rel_err(base_eps, theirs) > 1e-2  # the LoRA is active in diffusers, so the check above can fail
