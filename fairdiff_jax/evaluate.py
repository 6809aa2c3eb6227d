"""Evaluation: fixed-noise generation per test prompt, attribute frequencies and bias, tables and grids.

:func:`evaluate` generates ``eval.images_per_prompt`` images per test prompt from reproducible noise with the
original model and with the trained adaptor (EMA weights by default), an exported / imported adaptor folder or a
baseline method (``method``, see ``fairdiff_jax.baselines``), classifies them, and writes
``OUT/metrics.json`` (DESIGN.md §3), ``OUT/table.md`` (the layout of the paper's Table 1) and image grids with a
colour bar per attribute under every image. Generation is resumable: each prompt's images are stored as they are
made and are not generated again. With evaluation encoders (``eval.clip_path``, ``eval.dino_path``) it also
reports CLIP-T, and CLIP-I / DINO against the original model's images from the same noise (``semantic_metrics``).
``fairdiff evaluate`` parses its arguments in ``fairdiff_jax/cli``.
"""

from __future__ import annotations

import dataclasses
import functools
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
from fairdiff_jax.checkpoints import load_flax_adaptor, restore_adaptor_item
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.eval_store import (
    generation_key,
    load_prompt_set,
    params_digest,
    prompt_file,
    read_stored_prompt,
    store_prompt_record,
)
from fairdiff_jax.generation import SamplerSettings, make_generator, prompt_noise, tokenize, uncond_ids
from fairdiff_jax.images import save_grids, to_uint8
from fairdiff_jax.metrics import bias_metrics
from fairdiff_jax.models.attention import run_attention
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


def _traced_with_run_attention(fn):
    """Run ``fn(run, ...)`` with the attention implementation the run's config names (``model.attention``)."""

    @functools.wraps(fn)
    def wrapper(run, *args, **kwargs):
        with run_attention(run.attention):
            return fn(run, *args, **kwargs)

    return wrapper


@_traced_with_run_attention
def generate_prompt_set(
    run: Run,
    settings: EvalSettings,
    unet_params,
    te_params,
    prompts: Sequence[str],
    out_dir: str,
    *,
    soft_tokens: bool,
    model_id: str,
    progress: bool = True,
    baseline=None,
    branches: dict | None = None,
    scoring: Scoring | None = None,
) -> list[dict]:
    """Generate and classify ``settings.images_per_prompt`` images for each prompt; resumable via ``out_dir``.

    ``model_id`` names the weights (see :func:`original_model_id`, :func:`adaptor_model_id`): stored images are
    reused only when they were made by the same model with the same settings and scored by the same classifier.
    ``baseline`` (a ``fairdiff_jax.baselines.BaselineSetup``) rewrites the conditional prompt, maps its embedding
    or guides the sampler (give its edited U-Net parameters as ``unet_params``); records keep the original prompt.
    ``branches`` are the unmerged LoRA branches of ``adapt_weights``; ``scoring`` the evaluation classifier
    (default: the run's). Returns, per prompt, ``{"prompt", "images" uint8 [M,H,W,3], "labels" {attr: [M]},
    "valid" [M], "scored_by" {attr: source}}``.
    """
    num_images = settings.images_per_prompt
    mesh = parallel.make_mesh()
    batch = max(mesh.size, settings.batch_size // mesh.size * mesh.size)
    sampler = settings.sampler
    scoring = scoring or Scoring(run.classifier, run.frozen["classifier"], {})
    guidance = getattr(baseline, "guidance", None)
    generate = make_generator(
        run.pipeline,
        sampler,
        scoring.classifier,
        sampler.eval_steps,
        condition=getattr(baseline, "map_conditioning", None),
        guide_for=None if guidance is None else guidance.guide,
    )
    weights = parallel.replicate((unet_params, te_params, run.frozen["vae"], scoring.params), mesh)
    branches = parallel.replicate(branches or {}, mesh)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    bar = progress_bar(len(prompts) * num_images, desc=os.path.basename(out_dir), enabled=progress)
    for index, prompt in enumerate(prompts):
        path = prompt_file(out_dir, index)
        key = generation_key(model_id, settings, prompt, index, run.task.attributes)
        stored = read_stored_prompt(path, prompt, num_images, key)
        if (
            stored is not None
            and set(run.task.attributes) <= set(stored["labels"])  # else classified for fewer
            and stored["scored_by"] == dict(scoring.scored_by)  # else scored by another classifier
        ):
            results.append(stored)
            bar.update(num_images)
            continue
        text = prompt if baseline is None else baseline.rewrite_prompts([prompt])[0]
        ids = tokenize(run.pipeline, [text], soft_tokens=soft_tokens)
        cond_ids = parallel.replicate(jnp.asarray(ids), mesh)
        uncond = parallel.replicate(jnp.asarray(uncond_ids(run.pipeline, ids)), mesh)
        per_image = [prompt_noise(run.pipeline, index, num_images, settings.seed)]
        if guidance is not None:  # per-image guidance directions, reproducible like the noise
            per_image.append(
                guidance.directions(jax.random.fold_in(jax.random.PRNGKey(settings.seed + 1), index), num_images)
            )
        chunks = []
        for start in range(0, num_images, batch):
            parts = [x[start : start + batch] for x in per_image]
            real = parts[0].shape[0]
            parts = [
                jnp.concatenate([x, jnp.zeros((batch - real,) + x.shape[1:], x.dtype)]) for x in parts
            ]  # one shape
            sharded = [parallel.shard_batch(x, mesh) for x in parts]
            out = generate(*weights, cond_ids, uncond, sharded[0], branches, *sharded[1:])
            chunks.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], out))
            bar.update(real)
        images = np.concatenate([to_uint8(c[0]) for c in chunks])[:num_images]
        labels = {a: np.concatenate([c[1][a] for c in chunks])[:num_images] for a in run.task.attributes}
        valid = np.concatenate([c[2] for c in chunks])[:num_images]
        record = {"prompt": prompt, "images": images, "labels": labels, "valid": valid}
        record["scored_by"] = dict(scoring.scored_by)
        if is_main_process():
            store_prompt_record(path, record, key)
        results.append(record)
    bar.close()
    return results


def original_model_id(run: Run) -> str:
    """The identity of the base model's weights, for the keys of its stored images."""
    return "original:" + json.dumps({"folder": os.path.abspath(run.model_folder), "weights": run.spec.fingerprint})


def adaptor_model_id(run: Run, workdir: str, step: int, which: str, params) -> str:
    """The identity of an adapted model: the run folder, step, EMA or raw, the adaptor's values, the base model."""
    return f"adaptor:{os.path.abspath(workdir)}:{step}:{which}:{params_digest(params)}|{original_model_id(run)}"


def adapted_weights(run: Run, workdir: str, step: int | None = None, *, use_ema: bool = True):
    """``(step, unet_params, te_params, branches, model_id)``: the base weights with the adaptor of ``workdir``
    (newest step by default); ``branches`` holds the unmerged float32 LoRA of bf16 components (``adapt_weights``),
    ``model_id`` the identity of the result."""
    spec = read_adaptor_metadata(workdir)
    check_base_model(spec, run.frozen["unet"], run.frozen["text_encoder"])
    found_step, item = restore_adaptor_item(workdir, step)
    which = "ema" if use_ema else "params"
    unet_params, te_params, branches = adapt_weights(spec, item[which], run.frozen["unet"], run.frozen["text_encoder"])
    return found_step, unet_params, te_params, branches, adaptor_model_id(run, workdir, found_step, which, item[which])


def folder_weights(run: Run, adaptor_dir: str):
    """``(unet_params, te_params, branches, model_id)``: the base weights with the adaptor of an exported or
    imported folder."""
    from fairdiff_jax.adaptors.authors import read_provenance

    spec, params = load_flax_adaptor(adaptor_dir, run.frozen["unet"], run.frozen["text_encoder"])
    layout = (spec.num_soft_tokens, spec.soft_token if spec.num_soft_tokens else None)
    if layout != (run.pipeline.num_soft_tokens, run.pipeline.soft_token if run.pipeline.num_soft_tokens else None):
        raise FairdiffError(
            f"the adaptor in {adaptor_dir} has {spec.num_soft_tokens} soft token(s) but the run's pipeline was built "
            f"for {run.pipeline.num_soft_tokens}; build the run with build_run(cfg, adaptor_spec) of that folder."
        )
    context = (read_provenance(adaptor_dir) or {}).get("prompt_context", {})
    if context.get("padding") == "prompt_length" and run.pipeline.prompt_padding != "prompt":
        log.warning(
            "%s was trained on prompts padded to their own length with the attention mask (the authors' context); "
            "this evaluation pads prompts to %d tokens (set data.prompt_padding=prompt to match)",
            adaptor_dir,
            run.pipeline.max_length,
        )
    unet_params, te_params, branches = adapt_weights(spec, params, run.frozen["unet"], run.frozen["text_encoder"])
    model_id = f"folder:{os.path.abspath(adaptor_dir)}:{params_digest(params)}|{original_model_id(run)}"
    return unet_params, te_params, branches, model_id


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
    adaptor: str | None = None,
    run: Run | None = None,
    progress: bool = True,
    method: str | None = None,
) -> dict:
    """Evaluate the original model and/or an adaptor (the one trained in ``workdir``, or the exported or imported
    adaptor folder ``adaptor``) or the baseline ``method`` (one of ``fairdiff_jax.baselines.METHODS``,
    hyper-parameters from ``config.baselines.<method>``); returns the metrics dict.

    With ``eval.clip_path`` / ``eval.dino_path`` set, every model also gets CLIP-T, and each adapted model CLIP-I /
    DINO against the original model's images: those generated here, else the per-prompt files in
    ``original_images`` (default ``OUT/original/SPLIT`` when it holds every prompt).
    """
    if workdir is not None and adaptor is not None:
        raise FairdiffError("give --workdir (a training run) or --adaptor (an adaptor folder), not both")
    run = run or build_run(cfg, read_adaptor_metadata(adaptor) if adaptor is not None else None)
    settings = EvalSettings.from_config(cfg)
    split = split or next(iter(run.eval_prompts))
    if split not in run.eval_prompts:
        raise FairdiffError(f"unknown prompt split '{split}'; choose one of {sorted(run.eval_prompts)}")
    prompts = run.eval_prompts[split]
    if workdir is not None and method is not None:
        raise FairdiffError(
            "give --workdir (a trained adaptor) or --method (a baseline), not both; run them separately"
        )
    models, setup = {}, None
    if include_original:
        models["original"] = (
            run.frozen["unet"],
            run.frozen["text_encoder"],
            False,
            {},
            original_model_id(run),
            "original",
        )
    if workdir is not None:
        found_step, unet_params, te_params, branches, model_id = adapted_weights(run, workdir, step, use_ema=use_ema)
        models[f"debiased (step {found_step})"] = (unet_params, te_params, True, branches, model_id, "debiased")
    if adaptor is not None:
        unet_params, te_params, branches, model_id = folder_weights(run, adaptor)
        name = f"adaptor ({os.path.basename(os.path.normpath(adaptor))})"
        models[name] = (unet_params, te_params, True, branches, model_id, "debiased")
    if method is not None:
        from fairdiff_jax.baselines.harness import baseline_setup

        setup = baseline_setup(run, cfg, method, os.path.join(out, method), progress=progress)
        unet_params = run.frozen["unet"] if setup.unet_params is None else setup.unet_params
        settings_json = json.dumps(cfg.baselines[method].to_dict(), sort_keys=True, default=str)
        model_id = f"baseline:{method}:{settings_json}|{original_model_id(run)}"
        models[method] = (unet_params, run.frozen["text_encoder"], False, {}, model_id, method)
    if not models:
        raise FairdiffError(
            "nothing to evaluate: give --workdir with a trained adaptor, --adaptor DIR or --method NAME, or include "
            "the original model"
        )
    scorer = load_semantic_scorer(cfg.eval.clip_path, cfg.eval.dino_path, batch_size=settings.batch_size)
    scoring = scoring_classifier(cfg, run)
    if scoring.uses_training_classifier:
        log.warning("evaluation scores with the training classifier (set attributes.<name>.eval_classifier)")
    report, embeddings = {}, {}
    for name, (unet_params, te_params, soft, branches, model_id, folder_name) in models.items():
        folder = os.path.join(out, folder_name, split)
        results = generate_prompt_set(
            run,
            settings,
            unet_params,
            te_params,
            prompts,
            folder,
            soft_tokens=soft,
            model_id=model_id,
            progress=progress,
            baseline=setup if name == method else None,
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
    if setup is not None:
        metrics["baseline"] = {"method": method, "settings": cfg.baselines[method].to_dict(), **setup.info}
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
