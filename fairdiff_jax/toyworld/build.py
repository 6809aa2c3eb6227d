"""Build the toy world (classifiers + base model), measure the base model's bias, find or reuse a build.

A build folder holds the base model in the diffusers layout (model_index.json, unet/, text_encoder/,
tokenizer/, scheduler/ — no vae/: the model works in pixel space), ``classifiers.msgpack`` and
``world.json`` (occupations, splits, training-data distributions, sampling settings, measurements).
``world.json`` is written last, so its presence marks a finished build.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models import StableDiffusion, load_stable_diffusion, loader
from fairdiff_jax.toyworld import base_model, classifiers, world

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "toy")
WORLD_FILE = "world.json"
REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
    classifiers.PARAMS_FILE,
    WORLD_FILE,
)
COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
GUIDANCE_SCALE = 3.0
NUM_INFERENCE_STEPS = 10  # what the demo samples with (demo_config.py: sampler.eval_steps)


def is_complete(folder: str) -> bool:
    """Whether ``folder`` holds every file of a finished toy-world build."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in REQUIRED_FILES)


def read_world(folder: str) -> dict:
    """The ``world.json`` of a build (occupations, splits, distributions, sampling settings, measurements)."""
    path = os.path.join(folder, WORLD_FILE)
    if not os.path.isfile(path):
        raise FairdiffError(
            f"{path} does not exist; build the toy world with fairdiff_jax.toyworld.ensure_toy_world()."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _bias(freq: np.ndarray) -> float:
    """Mean over class pairs i<j of |freq_i - freq_j|."""
    pairs = [abs(freq[i] - freq[j]) for i in range(len(freq)) for j in range(i + 1, len(freq))]
    return float(np.mean(pairs))


def measure_base_model(
    sd,
    classifier_params: Mapping,
    *,
    images_per_prompt: int = 200,
    guidance_scale: float = GUIDANCE_SCALE,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    occupations: Sequence[str] = world.OCCUPATION_NAMES,
    chunk_size: int = 480,
    seed: int = 0,
    named_images_per_prompt: int | None = None,
    progress: bool = True,
) -> dict:
    """Sample ``images_per_prompt`` pictures per occupation with CFG, classify them, report frequencies and bias.

    ``sd`` is a loaded toy model (``load_stable_diffusion(folder, components=COMPONENTS)``). Returns per
    occupation the class frequencies and bias of every attribute and the cue accuracy, plus their means
    and the finite-sample floor 0.8/sqrt(M) of a fair binary attribute. With ``named_images_per_prompt`` > 0
    (default ``min(50, images_per_prompt)``) it also reports how often a caption naming the gender ("a photo
    of a female doctor") is drawn with that gender (``named_gender_accuracy``).
    """
    start = time.perf_counter()
    sampler = base_model.make_sampler(
        sd.unet, sd.text_encoder, num_steps=num_inference_steps, guidance_scale=guidance_scale
    )
    params = {"unet": sd.unet_params, "text_encoder": sd.text_encoder_params}
    empty_ids = base_model.encode_prompts(sd.tokenizer, [""])
    key = jax.random.PRNGKey(seed)

    def sample(prompts: Sequence[str], count: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
        prompt_ids = base_model.encode_prompts(sd.tokenizer, prompts)
        which = np.repeat(np.arange(len(prompts)), count)
        size = min(chunk_size, which.size)
        padded = np.concatenate([which, np.zeros((-which.size) % size, np.int64)])
        pictures = []
        with base_model.quiet_diffusers():
            for index in tqdm(range(padded.size // size), desc="measure base model", disable=not progress):
                rows = padded[index * size : (index + 1) * size]
                uncond = np.repeat(empty_ids, size, axis=0)
                subkey = jax.random.fold_in(key, salt * 1_000_000 + index)
                pictures.append(np.asarray(sampler(params, prompt_ids[rows], uncond, subkey)))
        return np.concatenate(pictures)[: which.size], which

    images, which = sample([world.PROMPT_TEMPLATE.format(occupation=o) for o in occupations], images_per_prompt, 0)
    predicted = classifiers.predict(classifier_params, images)
    per_occupation = {}
    for index, name in enumerate(occupations):
        mine = which == index
        entry = {}
        for attr, names in world.ATTRIBUTES.items():
            if attr in predicted:
                freq = np.bincount(predicted[attr][mine], minlength=len(names)) / mine.sum()
                entry[f"{attr}_freq"] = [round(float(f), 4) for f in freq]
                entry[f"{attr}_bias"] = round(_bias(freq), 4)
        if "occupation" in predicted:
            entry["cue_accuracy"] = round(
                float(np.mean(predicted["occupation"][mine] == world.occupation_index(name))), 4
            )
        per_occupation[name] = entry
    named = {}
    if named_images_per_prompt is None:
        named_images_per_prompt = min(50, images_per_prompt)
    if named_images_per_prompt > 0:
        # does the model follow a caption that names the gender? ("a photo of a female doctor")
        words = world.ATTRIBUTE_WORDS["gender"]
        prompts = [
            world.caption(world.occupation_index(o), {"gender": g}) for g in range(len(words)) for o in occupations
        ]
        named_images, named_which = sample(prompts, named_images_per_prompt, 1)
        named_gender = classifiers.predict(classifier_params, named_images)["gender"]
        asked = named_which // len(occupations)
        for g, word in enumerate(words):
            named[word] = round(float(np.mean(named_gender[asked == g] == g)), 4)
    summary = {
        "images_per_prompt": images_per_prompt,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "binary_bias_floor": round(0.8 / np.sqrt(images_per_prompt), 4),
        "seconds": round(time.perf_counter() - start, 1),
        "per_occupation": per_occupation,
    }
    if named:
        summary["named_gender_accuracy"] = named  # share of "a photo of a female X" pictures read as female, ...
    for metric in ("gender_bias", "race_bias", "age_bias", "cue_accuracy"):
        values = [entry[metric] for entry in per_occupation.values() if metric in entry]
        if values:
            summary[f"mean_{metric}"] = round(float(np.mean(values)), 4)
            summary[f"std_{metric}"] = round(float(np.std(values)), 4)
    return summary


def _check_converged(losses: Sequence[tuple[int, float]], learning_rate: float) -> None:
    """Refuse to write a base model whose denoising loss ended far above its best 25-step mean."""
    if len(losses) < 4:
        return
    best, last = min(v for _, v in losses), losses[-1][1]
    if last > 3.0 * best and last > 0.2:
        raise FairdiffError(
            f"toy base-model training diverged (25-step mean loss {best:.3f} -> {last:.3f}); "
            f"rebuild with a lower learning_rate than {learning_rate:g} or another seed."
        )


def build_toy_world(
    out_dir: str,
    *,
    steps: int = 2000,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 64,
    classifier_steps: int = 200,
    learning_rate: float = 2e-4,
    images_per_prompt: int = 200,
    guidance_scale: float = GUIDANCE_SCALE,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    unet_config: Mapping | None = None,
    text_encoder_config: Mapping | None = None,
    classifier_width: int = 32,
    caption_rate: float = world.CAPTION_ATTRIBUTE_RATE,
) -> dict:
    """Train the classifiers and the base model, write them into ``out_dir``, measure the base model.

    Returns the contents of the written ``world.json``. ``images_per_prompt=0`` skips the measurement.
    ``caption_rate``: the probability that a training caption names each attribute of its picture
    (:func:`fairdiff_jax.toyworld.world.caption_rows`; 0 trains on the plain occupation prompts only).
    """
    total_start = time.perf_counter()
    if os.path.exists(os.path.join(out_dir, WORLD_FILE)):
        os.remove(os.path.join(out_dir, WORLD_FILE))  # the folder is unfinished until world.json is rewritten
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    classifier_params, accuracy = classifiers.train_classifiers(
        steps=classifier_steps, seed=seed, width=classifier_width, progress=progress
    )
    classifiers.save_classifiers(out_dir, classifier_params)
    classifier_seconds = time.perf_counter() - started

    unet_config = dict(unet_config or base_model.UNET_CONFIG)
    text_config = base_model.write_tokenizer(out_dir, text_encoder_config or base_model.TEXT_ENCODER_CONFIG)
    tokenizer = loader.load_tokenizer(out_dir)
    prompts = [*world.all_captions(), ""]
    with base_model.quiet_diffusers():
        unet = loader.build_unet(unet_config)
        text_encoder = loader.build_text_encoder(text_config)
        params = base_model.init_params(unet, text_encoder, seed)
        params, history = base_model.train_base_model(
            unet,
            text_encoder,
            params,
            base_model.encode_prompts(tokenizer, prompts),
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            learning_rate=learning_rate,
            caption_rate=caption_rate,
            progress=progress,
        )
        if history["stopped_at"] is None:
            _check_converged(history["loss"], learning_rate)
        base_model.write_base_model(out_dir, unet_config, text_config, params)
        sd = load_stable_diffusion(out_dir, components=COMPONENTS, cache_dir=None)
    measurement = None
    if images_per_prompt > 0:
        measurement = measure_base_model(
            sd,
            classifier_params,
            images_per_prompt=images_per_prompt,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            seed=seed,
            progress=progress,
        )
    description = world.describe()
    description.update(
        sampling={
            "scheduler": "dpmsolver++",
            "guidance_scale": guidance_scale,
            "num_inference_steps": num_inference_steps,
        },
        build={
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "prompt_drop_rate": base_model.PROMPT_DROP_RATE,
            "caption_attribute_rate": caption_rate,
            "classifier_steps": classifier_steps,
            "classifier_seconds": round(classifier_seconds, 1),
            "train_seconds": history["seconds"],
            "loss": history["loss"],
            "restarts": history["restarts"],
            "stopped_at": history["stopped_at"],
            "returned_step": history["returned_step"],
            "total_seconds": round(time.perf_counter() - total_start, 1),
        },
        classifier_accuracy={k: round(v, 4) for k, v in accuracy.items()},
        base_model=measurement,
    )
    with open(os.path.join(out_dir, WORLD_FILE), "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
    return description


@dataclasses.dataclass
class ToyWorld:
    """A loaded toy-world build: the base model, the classifier params and the ``world.json`` description."""

    path: str
    sd: StableDiffusion
    classifier_params: dict
    description: dict


def load_toy_world(folder: str | None = None, *, dtype=jnp.float32) -> ToyWorld:
    """Load a build (default: :func:`ensure_toy_world`'s) with the project's own diffusers-layout loader."""
    folder = folder or ensure_toy_world()
    if not is_complete(folder):
        raise FairdiffError(
            f"{folder} is not a finished toy-world build (needs {', '.join(REQUIRED_FILES)}); "
            "rebuild it with fairdiff_jax.toyworld.build_toy_world(folder, steps=...)."
        )
    sd = load_stable_diffusion(folder, dtype=dtype, components=COMPONENTS, cache_dir=None)
    return ToyWorld(folder, sd, classifiers.load_classifiers(folder), read_world(folder))


def default_cache_dir() -> str:
    """``$FAIRDIFF_CACHE/toy`` or ``~/.cache/fairdiff_jax/toy``."""
    return os.path.join(loader.cache_root(), "toy")


def ensure_toy_world(cache_dir: str | None = None, *, progress: bool = True) -> str:
    """Path of a finished toy-world build: ``$FAIRDIFF_TOY_WORLD`` if set, else the one shipped in the package,
    else a cached or fresh build."""
    chosen = os.environ.get("FAIRDIFF_TOY_WORLD")
    if chosen:
        if not is_complete(chosen):
            raise FairdiffError(
                f"FAIRDIFF_TOY_WORLD={chosen} is not a complete toy-world build; unset it or build one there with "
                "fairdiff_jax.toyworld.build.build_toy_world(folder)"
            )
        return chosen
    if is_complete(SHIPPED_DIR):
        return SHIPPED_DIR
    folder = cache_dir or default_cache_dir()
    if is_complete(folder):
        return folder
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    build_toy_world(partial, progress=progress)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder
