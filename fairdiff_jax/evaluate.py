"""Evaluation: fixed-noise generation per test prompt, attribute frequencies and bias, tables and grids.

:func:`evaluate` generates ``eval.images_per_prompt`` images per test prompt from reproducible noise with the
original model and with the trained adaptor (EMA weights by default), classifies them, and writes
``OUT/metrics.json`` (DESIGN.md §3), ``OUT/table.md`` (the layout of the paper's Table 1) and image grids with a
colour bar per attribute under every image. Generation is resumable: each prompt's images are stored as they are
made and are not generated again. With evaluation encoders (``eval.clip_path``, ``eval.dino_path``) it also
reports CLIP-T, and CLIP-I / DINO against the original model's images from the same noise (``semantic_metrics``).
``fairdiff evaluate`` parses its arguments in ``fairdiff_jax/cli``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax import parallel
from fairdiff_jax.adaptors.spec import check_base_model, read_adaptor_metadata
from fairdiff_jax.adaptors.transform import adapt_weights
from fairdiff_jax.checkpoints import restore_adaptor_item
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.eval_store import load_prompt_set, prompt_file, read_stored_prompt, store_prompt_record
from fairdiff_jax.generation import SamplerSettings, make_generator, prompt_noise, tokenize, uncond_ids
from fairdiff_jax.images import save_grids, to_uint8
from fairdiff_jax.metrics import bias_metrics
from fairdiff_jax.reporting import is_main_process, progress_bar
from fairdiff_jax.run import Run, build_run
from fairdiff_jax.scoring import Scoring, scored_by_note, scoring_classifier
from fairdiff_jax.semantic_metrics import SEMANTIC_COLUMNS, embed_results, load_semantic_scorer, semantic_metrics
from fairdiff_jax.tables import format_table

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """``config.eval`` and the sampler: images per prompt, noise seed, batch size, sampler settings."""

    images_per_prompt: int
    seed: int
    batch_size: int
    sampler: SamplerSettings

    @classmethod
    def from_config(cls, cfg) -> EvalSettings:
        return cls(
            images_per_prompt=int(cfg.eval.images_per_prompt),
            seed=int(cfg.eval.seed),
            batch_size=int(cfg.eval.batch_size),
            sampler=SamplerSettings.from_config(cfg.sampler),
        )


def generate_prompt_set(
    run: Run,
    settings: EvalSettings,
    unet_params,
    te_params,
    prompts: Sequence[str],
    out_dir: str,
    *,
    soft_tokens: bool,
    progress: bool = True,
    branches: dict | None = None,
    scoring: Scoring | None = None,
) -> list[dict]:
    """Generate and classify ``settings.images_per_prompt`` images for each prompt; resumable via ``out_dir``.

    ``branches`` are the unmerged LoRA branches of ``adapt_weights``; ``scoring`` the evaluation classifier
    (default: the run's). Returns, per prompt, ``{"prompt", "images" uint8 [M,H,W,3], "labels" {attr: [M]},
    "valid" [M], "scored_by" {attr: source}}``; stored images scored by another classifier are made again.
    """
    num_images = settings.images_per_prompt
    mesh = parallel.make_mesh()
    batch = max(mesh.size, settings.batch_size // mesh.size * mesh.size)
    sampler = settings.sampler
    scoring = scoring or Scoring(run.classifier, run.frozen["classifier"], {})
    generate = make_generator(run.pipeline, sampler, scoring.classifier, sampler.eval_steps)
    weights = parallel.replicate((unet_params, te_params, run.frozen["vae"], scoring.params), mesh)
    branches = parallel.replicate(branches or {}, mesh)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    bar = progress_bar(len(prompts) * num_images, desc=os.path.basename(out_dir), enabled=progress)
    for index, prompt in enumerate(prompts):
        path = prompt_file(out_dir, index)
        stored = read_stored_prompt(path, prompt, num_images)
        if (
            stored is not None
            and set(run.task.attributes) <= set(stored["labels"])  # else classified for fewer
            and stored["scored_by"] == dict(scoring.scored_by)  # else scored by another classifier
        ):
            results.append(stored)
            bar.update(num_images)
            continue
        ids = tokenize(run.pipeline, [prompt], soft_tokens=soft_tokens)
        cond_ids = parallel.replicate(jnp.asarray(ids), mesh)
        uncond = parallel.replicate(jnp.asarray(uncond_ids(run.pipeline, ids)), mesh)
        noise = prompt_noise(run.pipeline, index, num_images, settings.seed)
        chunks = []
        for start in range(0, num_images, batch):
            chunk = noise[start : start + batch]
            real = chunk.shape[0]
            chunk = jnp.concatenate([chunk, jnp.zeros((batch - real,) + chunk.shape[1:])])  # one compiled shape
            out = generate(*weights, cond_ids, uncond, parallel.shard_batch(chunk, mesh), branches)
            chunks.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], out))
            bar.update(real)
        images = np.concatenate([to_uint8(c[0]) for c in chunks])[:num_images]
        labels = {a: np.concatenate([c[1][a] for c in chunks])[:num_images] for a in run.task.attributes}
        valid = np.concatenate([c[2] for c in chunks])[:num_images]
        record = {"prompt": prompt, "images": images, "labels": labels, "valid": valid}
        record["scored_by"] = dict(scoring.scored_by)
        if is_main_process():
            store_prompt_record(path, record)
        results.append(record)
    bar.close()
    return results


def adapted_weights(run: Run, workdir: str, step: int | None = None, *, use_ema: bool = True):
    """``(step, unet_params, te_params, branches)``: the base weights with the adaptor of ``workdir`` (newest step
    by default); ``branches`` holds the unmerged float32 LoRA of bf16 components (``adapt_weights``)."""
    spec = read_adaptor_metadata(workdir)
    check_base_model(spec, run.frozen["unet"], run.frozen["text_encoder"])
    found_step, item = restore_adaptor_item(workdir, step)
    unet_params, te_params, branches = adapt_weights(
        spec, item["ema" if use_ema else "params"], run.frozen["unet"], run.frozen["text_encoder"]
    )
    return found_step, unet_params, te_params, branches


def evaluate(
    cfg,
    workdir: str | None,
    out: str,
    *,
    step: int | None = None,
    use_ema: bool = True,
    include_original: bool = True,
    split: str | None = None,
    original_images: str | None = None,
    run: Run | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate the original model and/or the adaptor trained in ``workdir``; returns the metrics dict.

    With ``eval.clip_path`` / ``eval.dino_path`` set, every model also gets CLIP-T, and each adapted model CLIP-I /
    DINO against the original model's images: those generated here, else the per-prompt files in
    ``original_images`` (default ``OUT/original/SPLIT`` when it holds every prompt).
    """
    run = run or build_run(cfg)
    settings = EvalSettings.from_config(cfg)
    split = split or next(iter(run.eval_prompts))
    if split not in run.eval_prompts:
        raise FairdiffError(f"unknown prompt split '{split}'; choose one of {sorted(run.eval_prompts)}")
    prompts = run.eval_prompts[split]
    models = {}
    if include_original:
        models["original"] = (run.frozen["unet"], run.frozen["text_encoder"], False, {})
    if workdir is not None:
        found_step, unet_params, te_params, branches = adapted_weights(run, workdir, step, use_ema=use_ema)
        models[f"debiased (step {found_step})"] = (unet_params, te_params, True, branches)
    if not models:
        raise FairdiffError("nothing to evaluate: give --workdir with a trained adaptor, or include the original model")
    scorer = load_semantic_scorer(cfg.eval.clip_path, cfg.eval.dino_path, batch_size=settings.batch_size)
    scoring = scoring_classifier(cfg, run)
    if scoring.uses_training_classifier:
        log.warning("evaluation scores with the training classifier (set attributes.<name>.eval_classifier)")
    report, embeddings = {}, {}
    for name, (unet_params, te_params, soft, branches) in models.items():
        folder = os.path.join(out, "original" if name == "original" else "debiased", split)
        results = generate_prompt_set(
            run,
            settings,
            unet_params,
            te_params,
            prompts,
            folder,
            soft_tokens=soft,
            progress=progress,
            branches=branches,
            scoring=scoring,
        )
        report[name] = dict(bias_metrics(results, run.task.num_classes), scored_by=dict(scoring.scored_by))
        if scorer is not None:
            embeddings[name] = embed_results(scorer, results)
        if is_main_process():
            save_grids(results, folder)
    if scorer is not None:
        text_embeds = scorer.embed_prompts(prompts)
        original = embeddings.get("original")
        if original is None and len(report) > (1 if "original" in report else 0):
            original = _stored_original_embeddings(scorer, out, split, prompts, settings, original_images)
        for name, embeds in embeddings.items():
            report[name].update(semantic_metrics(embeds, text_embeds, None if name == "original" else original))
    main = report[list(report)[-1]]
    metrics = dict(main, models=report, split=split)
    if is_main_process():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
            f.write(format_table(report, list(main["bias"]) + list(SEMANTIC_COLUMNS)))
            f.write("\n" + scored_by_note(scoring.scored_by) + "\n")
    return metrics


def _stored_original_embeddings(scorer, out, split, prompts, settings: EvalSettings, original_images):
    """Embeddings of the original model's stored images for CLIP-I / DINO, or None (with a log line)."""
    num_images = settings.images_per_prompt
    folder = original_images or os.path.join(out, "original", split)
    results = load_prompt_set(folder, prompts, num_images) if os.path.isdir(folder) else None
    if results is None:
        if original_images:
            raise FairdiffError(
                f"--original-images {original_images} does not hold {num_images} images for each of the "
                f"{len(prompts)} '{split}' prompts (prompt_NNNN.npz, as written by an evaluation of the original "
                "model with the same prompts and eval.images_per_prompt); point to such a folder, e.g. OUT/original/"
                f"{split} of that evaluation."
            )
        log.info("no original images in %s: CLIP-I / DINO not computed (evaluate without --no-original)", folder)
        return None
    return embed_results(scorer, results)
