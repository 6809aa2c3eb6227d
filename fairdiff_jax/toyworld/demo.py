"""The demo: the whole method on the embedded toy world, on a laptop CPU, nothing downloaded.

Builds (or reuses) the toy world, measures the base model's bias with M images per prompt, debiases it with
the paper's method (adjusted DFT + distributional alignment; U-Net LoRA by default, see demo_config.py), evaluates again
on the debiased and the held-out occupations, and writes ``DIR/report/``: ``metrics.json`` (``before`` and
``after`` sections in the DESIGN.md §3 format), ``report.md``, image grids with attribute bars, and plots.
It calls the library's public functions (``build_run``, ``train``, ``generate_prompt_set``); ``fairdiff demo``
parses its arguments in ``demo_cli.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from fairdiff_jax.adaptors.transform import apply_adaptor
from fairdiff_jax.checkpoints import restore_adaptor_item
from fairdiff_jax.config import load_config
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.evaluate import EvalSettings, adaptor_model_id, generate_prompt_set, original_model_id
from fairdiff_jax.images import save_image_grid
from fairdiff_jax.metrics import bias_metrics
from fairdiff_jax.models.loader import cache_root
from fairdiff_jax.reporting import read_metrics
from fairdiff_jax.run import Run, build_run
from fairdiff_jax.toyworld import plots
from fairdiff_jax.train import train

log = logging.getLogger(__name__)
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_config.py")
GRID_ZOOM = 6


def cue_accuracy(run: Run, results: Sequence[dict]) -> float:
    """Share of images whose occupation cue (read by the toy cue classifier) matches the prompt's."""
    from fairdiff_jax.toyworld import classifiers, world

    correct = total = 0
    for record in results:
        occupation = record["prompt"].split("a photo of a ", 1)[-1]
        images = record["images"].astype(np.float32) / 127.5 - 1.0
        predicted = classifiers.predict({"cue": run.frozen["classifier"]["cue"]}, images)["occupation"]
        correct += int(np.sum(predicted == world.occupation_index(occupation)))
        total += len(predicted)
    return correct / max(total, 1)


def measure(
    run: Run,
    settings: EvalSettings,
    unet_params,
    te_params,
    out_dir: str,
    *,
    soft_tokens: bool,
    model_id: str,
    progress: bool,
    baseline=None,
) -> dict:
    """Bias metrics and cue accuracy on the debiased and the held-out occupations (``model_id``: see
    ``evaluate.original_model_id`` / ``adaptor_model_id``; stored images of another model are regenerated; of a
    baseline method's images with ``baseline``, a ``fairdiff_jax.baselines.BaselineSetup``)."""
    section = {}
    for split, prompts in run.eval_prompts.items():
        results = generate_prompt_set(
            run,
            settings,
            unet_params,
            te_params,
            prompts,
            os.path.join(out_dir, split),
            soft_tokens=soft_tokens,
            model_id=model_id,
            progress=progress,
            baseline=baseline,
        )
        metrics = bias_metrics(results, run.task.num_classes)
        metrics["cue_accuracy"] = cue_accuracy(run, results)
        metrics["per_prompt_freq"] = {
            r["prompt"]: {
                a: np.bincount(r["labels"][a][r["valid"]], minlength=k).tolist()
                for a, k in run.task.num_classes.items()
            }
            for r in results
        }
        metrics["target_distance"] = target_distance(metrics["per_prompt_freq"], run.task.targets)
        section[split] = (metrics, results)
    return section


def target_distance(per_prompt_counts: dict, targets: dict) -> dict:
    """Per attribute, the mean over prompts of the total-variation distance ``½ Σ_k |freq_k − target_k|`` between a
    prompt's class frequencies and the target: 0 when every prompt follows the target. Unlike the bias, it reads
    right for non-uniform targets (a perfect 30/70 generator has bias 0.4 and distance 0)."""
    out = {}
    for name, target in targets.items():
        counts = np.array([c[name] for c in per_prompt_counts.values()], np.float64)
        freq = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        out[name] = float(np.mean(0.5 * np.abs(freq - np.asarray(target)).sum(1)))
    return out


def _summary(section: dict) -> dict:
    """The DESIGN.md §3 keys from the debiased split, plus the held-out split under ``held_out``."""
    main, _ = section["debiased"]
    keys = ("bias", "bias_std", "freq", "n_images", "cue_accuracy", "per_prompt_bias", "target_distance")
    out = {k: main[k] for k in (*keys, "bias_floor")}
    held, _ = section["held_out"]
    out["held_out"] = {k: held[k] for k in keys}
    return out


def base_eval_dir(cfg, world_folder: str) -> str:
    """Where the base model's evaluation is kept: ``$FAIRDIFF_CACHE/toy_base_eval/<key>`` (default cache root
    ``~/.cache/fairdiff_jax``). The base model, its classifiers and the fixed evaluation noise are the same in every
    demo run, so its images and labels are generated once; the key hashes the world's files and every sampler and
    evaluation setting, so a changed world or setting gets a fresh folder. Delete the folder to measure again."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(world_folder)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, world_folder).encode())
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    settings = {
        "sampler": cfg.sampler.to_dict(),
        "eval": cfg.eval.to_dict(),
        "model": cfg.model.to_dict(),
        "attributes": sorted(cfg.attributes.keys()),  # the labels stored beside the images
        "prompt_padding": cfg.data.prompt_padding,  # the prompt context the images were generated from
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return os.path.join(cache_root(), "toy_base_eval", digest.hexdigest()[:16])


def adapted_model(run: Run, cfg, train_dir: str):
    """(U-Net params, text-encoder params, model id) of the base model with the EMA adaptor saved in ``train_dir``.

    Refuses an unfinished run (stopped by SIGTERM before ``num_steps``): evaluating it would report a partly
    trained adaptor as the result, and its images would be reused after the run is resumed."""
    step, item = restore_adaptor_item(train_dir)
    total = int(cfg.num_steps)
    if step < total:
        raise FairdiffError(
            f"training in {train_dir} stopped at step {step} of {total}; run the same command again to resume it"
        )
    unet_params, te_params = apply_adaptor(run.spec, item["ema"], run.frozen["unet"], run.frozen["text_encoder"])
    return unet_params, te_params, adaptor_model_id(run, train_dir, step, "ema", item["ema"])


def demo_config(adaptor: str = "unet_lora", attributes: Sequence[str] = ("gender",), overrides: Sequence[str] = ()):
    """The toy config for ``adaptor`` debiasing ``attributes`` (uniform targets), with ``--config.*`` overrides."""
    return load_config(f"{DEMO_CONFIG}:{adaptor},{'+'.join(attributes)}", list(overrides))


def run_demo(
    workdir: str,
    adaptor: str = "unet_lora",
    overrides: Sequence[str] = (),
    *,
    attributes: Sequence[str] = ("gender",),
    progress: bool = True,
) -> dict:
    """Run the demo in ``workdir``; returns the report's metrics dict."""
    started = time.perf_counter()
    cfg = demo_config(adaptor, attributes, overrides)
    run = build_run(cfg)
    settings = EvalSettings.from_config(cfg)
    report_dir = os.path.join(workdir, "report")
    os.makedirs(report_dir, exist_ok=True)
    timings = {"setup_seconds": time.perf_counter() - started}

    before_dir = base_eval_dir(cfg, run.model_folder)
    log.info("base model's evaluation: %s (reused when present)", before_dir)
    frozen = run.frozen
    before = measure(
        run,
        settings,
        frozen["unet"],
        frozen["text_encoder"],
        before_dir,
        soft_tokens=False,
        model_id=original_model_id(run),
        progress=progress,
    )
    timings["before_seconds"] = time.perf_counter() - started - timings["setup_seconds"]

    mark = time.perf_counter()
    result = train(cfg, os.path.join(workdir, "train"), run=run, progress=progress)
    if not result.finished:
        raise FairdiffError(
            f"training stopped at step {result.step} of {cfg.num_steps} (signal {result.signal}); the checkpoint is "
            "written, run the same command again to resume and finish the demo"
        )
    timings["train_seconds"] = time.perf_counter() - mark

    mark = time.perf_counter()
    unet_params, te_params, model_id = adapted_model(run, cfg, os.path.join(workdir, "train"))
    after_dir = os.path.join(workdir, "eval", "after")
    after = measure(
        run, settings, unet_params, te_params, after_dir, soft_tokens=True, model_id=model_id, progress=progress
    )
    timings["after_seconds"] = time.perf_counter() - mark
    timings["total_seconds"] = time.perf_counter() - started

    metrics = {
        "before_per_prompt": {split: before[split][0]["per_prompt_freq"] for split in before},
        "after_per_prompt": {split: after[split][0]["per_prompt_freq"] for split in after},
        "before": _summary(before),
        "after": _summary(after),
        "targets": {name: [float(t) for t in cfg.attributes[name].target] for name in run.task.attributes},
        "adaptor": adaptor,
        "images_per_prompt": int(cfg.eval.images_per_prompt),
        "train_steps": int(cfg.num_steps),
        "timings": timings,
        # the paper's face regularisers need faces; the toy world's 8x8 pictures have none (toyworld/plugin.py)
        "face_terms": "off: the toy world has no faces, so L_face (lambda_face) and factor2 are not used",
    }
    with open(os.path.join(report_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    for split in ("debiased", "held_out"):
        for tag, section in (("before", before), ("after", after)):
            results = section[split][1][:4]
            images = np.concatenate([r["images"][:16] for r in results]).astype(np.float32) / 127.5 - 1.0
            images = images.repeat(GRID_ZOOM, axis=1).repeat(GRID_ZOOM, axis=2)  # 8x8 pixels are too small to see
            labels = {a: np.concatenate([r["labels"][a][:16] for r in results]) for a in run.task.attributes}
            save_image_grid(images, os.path.join(report_dir, f"grid_{split}_{tag}.png"), 16, labels)
    plots.training_curves(
        read_metrics(os.path.join(workdir, "train")),
        run.task.attributes,
        os.path.join(report_dir, "training_curves.png"),
    )
    plots.frequency_bars(metrics, run.task.attributes, os.path.join(report_dir, "frequencies.png"))
    with open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(plots.markdown_report(metrics, run.task.attributes))
    return metrics
