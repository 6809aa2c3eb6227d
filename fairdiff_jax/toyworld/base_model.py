"""The toy world's base text-to-image model: a pixel-space diffusers Flax U-Net and a tiny CLIP text encoder.

Images are 8x8 RGB, so there is no VAE: the U-Net denoises the pictures themselves (in = out = 3
channels, NCHW). The U-Net and the text encoder are trained jointly from scratch on the ordinary
epsilon-prediction loss with Stable Diffusion 1.5's noise schedule, dropping the prompt 10% of the time so
classifier-free guidance works. The result is written in the diffusers folder layout (no ``vae/``), so the
rest of the project loads it with :func:`fairdiff_jax.models.load_stable_diffusion`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fairdiff_jax.models import loader
from fairdiff_jax.models.tiny import MODEL_INDEX, SD15_SCHEDULER, TINY_TEXT_ENCODER, write_component
from fairdiff_jax.models.tokenizer_files import write_tokenizer_folder
from fairdiff_jax.sampling import sample_latents
from fairdiff_jax.schedules import make_schedule
from fairdiff_jax.toyworld import world

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": world.IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}

# the same tiny CLIP text encoder the tests use (width 32, 2 layers, 16 tokens)
TEXT_ENCODER_CONFIG = dict(TINY_TEXT_ENCODER)

TOY_MODEL_INDEX = {**MODEL_INDEX, "vae": [None, None]}
PROMPT_DROP_RATE = 0.1
MIN_SNR_GAMMA = 5.0


@contextlib.contextmanager
def quiet_diffusers():
    """Silence diffusers' per-module "Flax classes are deprecated" log lines while tracing."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def write_tokenizer(folder: str, text_config: Mapping = TEXT_ENCODER_CONFIG) -> dict:
    """Write ``folder/tokenizer`` for the toy prompts; returns the text-encoder config with its token ids."""
    vocab_size = write_tokenizer_folder(
        os.path.join(folder, "tokenizer"), world.tokenizer_words(), max_length=text_config["max_position_embeddings"]
    )
    config = copy.deepcopy(dict(text_config))
    config.update(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    config["pad_token_id"] = vocab_size - 1
    return config


def encode_prompts(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Token ids ``[P, L]`` (padded to the tokenizer's max length, as Stable Diffusion pipelines do)."""
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    return np.asarray(out["input_ids"], np.int32)


def init_params(unet, text_encoder, seed: int) -> dict:
    """Fresh ``{"unet": ..., "text_encoder": ...}`` weights from the models' own Flax initialisers."""
    length = text_encoder.config.max_position_embeddings
    unet_params = jax.jit(unet.init_weights)(jax.random.PRNGKey(seed))
    text_params = jax.jit(lambda key: text_encoder.init_weights(key, (1, length)))(jax.random.PRNGKey(seed + 1))
    return jax.tree.map(np.asarray, {"unet": dict(unet_params), "text_encoder": dict(text_params)})


def _noise_prediction(unet, text_encoder, params, noisy_nhwc, timesteps, input_ids):
    context = text_encoder(input_ids, params=params["text_encoder"]).last_hidden_state
    sample = jnp.transpose(noisy_nhwc, (0, 3, 1, 2))
    eps = unet.apply({"params": params["unet"]}, sample, timesteps, context).sample
    return jnp.transpose(eps, (0, 2, 3, 1))


def make_train_step(unet, text_encoder, optimizer, alphas_cumprod: np.ndarray, ema_decay: float) -> Callable:
    """A jitted ``(params, ema, opt_state, images [B,8,8,3], input_ids [B,L], key, lr) -> (..., loss)`` step.

    ``optimizer`` yields unscaled update directions (no learning rate); the step applies ``-lr * update``, so
    the host sets the learning rate of every step (schedule, restarts)."""
    alphas = jnp.asarray(alphas_cumprod, jnp.float32)

    def loss_fn(params, images, input_ids, key):
        t_key, n_key = jax.random.split(key)
        timesteps = jax.random.randint(t_key, (images.shape[0],), 0, alphas.shape[0])
        noise = jax.random.normal(n_key, images.shape)
        a = alphas[timesteps][:, None, None, None]
        noisy = jnp.sqrt(a) * images + jnp.sqrt(1.0 - a) * noise
        eps = _noise_prediction(unet, text_encoder, params, noisy, timesteps, input_ids)
        # min-SNR-5 weighting (Hang et al., 2023): at small t the clean 8x8 renders leave almost only the
        # noise to predict, and unweighted epsilon training drives ever larger gains in the U-Net's skip path
        # until it collapses (measured: loss 0.08 -> 1.0 within a few steps, around step 200-600)
        snr = a[:, 0, 0, 0] / (1.0 - a[:, 0, 0, 0])
        weight = jnp.minimum(snr, MIN_SNR_GAMMA) / snr
        return jnp.mean(weight * jnp.mean((eps - noise) ** 2, axis=(1, 2, 3)))

    def step(params, ema, opt_state, images, input_ids, key, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, input_ids, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, ema, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def train_base_model(
    unet,
    text_encoder,
    params: dict,
    prompt_ids: np.ndarray,
    *,
    steps: int,
    seed: int,
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    ema_decay: float = 0.995,
    caption_rate: float = world.CAPTION_ATTRIBUTE_RATE,
    max_restarts: int = 3,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Train U-Net and text encoder on the biased toy data; returns (EMA params, history).

    ``prompt_ids`` is ``[len(world.all_captions()) + 1, L]``: one row per training caption
    (:func:`fairdiff_jax.toyworld.world.all_captions`), the last row the empty prompt. Each picture's caption
    names each of its attributes with probability ``caption_rate`` (0: the plain occupation prompt only).

    A sudden collapse of the loss (a 25-step mean above 3x the best and 0.2; seen on this tiny U-Net at
    steps 200-1250) restarts from the EMA weights of the best window with fresh Adam moments, half the learning
    rate and a 50-step warm-up, at most ``max_restarts`` times; after that training stops and returns those
    weights (``history["stopped_at"]``).
    """
    warmup = min(100, steps // 10 + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps, 0.1)
    # Adam eps 1e-5 and no weight decay: with eps 1e-8 and decay 1e-4 every run collapsed (loss 0.08 -> 1.0)
    # between steps 100 and 650; with these settings 500-step probes stayed stable and learned the conditioning
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-5))
    alphas = loader.SchedulerSettings.from_dict(SD15_SCHEDULER).alphas_cumprod()
    step_fn = make_train_step(unet, text_encoder, optimizer, alphas, ema_decay)
    params = jax.tree.map(jnp.asarray, params)
    ema = jax.tree.map(jnp.array, params)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    empty_row = prompt_ids.shape[0] - 1
    losses, window, restarts = [], [], []
    best, snapshot, stopped_at = float("inf"), None, None
    lr_factor, restarted_at = 1.0, None
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="toy base model", disable=not progress, dynamic_ncols=True)
    for step in bar:
        images, labels = world.sample_training_batch(batch_size, rng)
        captions = world.caption_rows(labels, rng, caption_rate)
        rows = np.where(rng.random(batch_size) < PROMPT_DROP_RATE, empty_row, captions)
        lr = float(schedule(step)) * lr_factor
        if restarted_at is not None:
            lr *= min(1.0, (step - restarted_at + 1) / 50)
        params, ema, opt_state, loss = step_fn(
            params, ema, opt_state, images, prompt_ids[rows], jax.random.fold_in(key, step), jnp.float32(lr)
        )
        if step == 0:
            loss.block_until_ready()
            compile_seconds = time.perf_counter() - start
        window.append(loss)
        if (step + 1) % 25 == 0 or step == steps - 1:
            losses.append((step + 1, round(float(np.mean([float(v) for v in window])), 5)))
            window = []
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            if losses[-1][1] < best:
                best, snapshot = losses[-1][1], (step + 1, jax.tree.map(np.array, ema))  # a copy: ema is donated
            elif step >= 200 and losses[-1][1] > 3.0 * best and losses[-1][1] > 0.2:
                if len(restarts) >= max_restarts:
                    stopped_at = step + 1
                    break
                # a sudden collapse: go back to the best window's EMA weights, fresh moments, half the lr
                restarts.append({"step": step + 1, "loss": losses[-1][1], "from_step": snapshot[0]})
                params = jax.tree.map(jnp.array, snapshot[1])
                ema = jax.tree.map(jnp.array, snapshot[1])
                opt_state = optimizer.init(params)
                lr_factor, restarted_at = lr_factor * 0.5, step + 1
    seconds = time.perf_counter() - start
    history = {
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
        "first_step_seconds": round(compile_seconds, 1),
        "loss": losses,
        "restarts": restarts,
        "stopped_at": stopped_at,
    }
    if stopped_at is not None:
        history["returned_step"] = snapshot[0]
        return snapshot[1], history
    history["returned_step"] = steps
    return jax.tree.map(np.asarray, ema), history


def write_base_model(folder: str, unet_config: Mapping, text_config: Mapping, params: Mapping) -> str:
    """Write model_index.json, unet/, text_encoder/, scheduler/ (tokenizer/ is written by ``write_tokenizer``)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(TOY_MODEL_INDEX, f, indent=2)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(SD15_SCHEDULER, f, indent=2)
    write_component(folder, "unet", unet_config, params["unet"])
    write_component(folder, "text_encoder", text_config, params["text_encoder"])
    return folder


def make_sampler(
    unet,
    text_encoder,
    *,
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    scheduler_config: Mapping = SD15_SCHEDULER,
) -> Callable:
    """A jitted no-grad sampler ``(params, cond_ids [B,L], uncond_ids [B,L], key) -> images [B,8,8,3]``.

    DPM-Solver++ (2M) with classifier-free guidance, pixels clipped to [-1, 1]: the project's one sampler
    (:func:`fairdiff_jax.sampling.sample_latents`) on the schedule of ``scheduler_config`` (the world's own
    ``scheduler_config.json``), so the builder measures the base model with the timesteps training uses.
    """
    schedule = make_schedule(scheduler_config)
    channels = unet.out_channels
    size = unet.sample_size

    def unet_fn(unet_params, latents, timesteps, context):
        return unet.apply({"params": unet_params}, latents, timesteps, context).sample

    def sample(params, cond_ids, uncond_ids, key):
        batch = cond_ids.shape[0]
        context = text_encoder(jnp.concatenate([uncond_ids, cond_ids], axis=0), params=params["text_encoder"])
        uncond, cond = jnp.split(context.last_hidden_state, 2, axis=0)
        noise = jax.random.normal(key, (batch, channels, size, size))
        latents = sample_latents(
            unet_fn,
            params["unet"],
            noise,
            cond,
            uncond,
            num_steps,
            schedule,
            max_steps=num_steps,
            guidance_scale=guidance_scale,
            gradient_mode="detached",
            remat_policy="none",
        )
        return jnp.clip(jnp.transpose(latents, (0, 2, 3, 1)), -1.0, 1.0)

    return jax.jit(sample)
