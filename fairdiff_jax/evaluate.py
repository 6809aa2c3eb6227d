"""Evaluation: fixed-noise generation per test prompt, attribute frequencies and bias, tables and grids.

``fairdiff evaluate --config C --workdir DIR [--step N] --out OUT`` generates ``eval.images_per_prompt``
images per test prompt from reproducible noise with the original model and with the trained adaptor (EMA
weights by default), classifies them, and writes ``OUT/metrics.json`` (DESIGN.md §3), ``OUT/table.md``
(the layout of the paper's Table 1) and image grids with a colour bar per attribute under every image.
Generation is resumable: each prompt's images are stored as they are made and are not generated again.
With evaluation encoders (``eval.clip_path`` / ``--clip``, ``eval.dino_path`` / ``--dino``) it also reports
CLIP-T, and CLIP-I / DINO against the original model's images from the same noise (see ``semantic_metrics``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax import adaptors, parallel
from fairdiff_jax.components import Components, build_components, embed, generate_images, latent_shape, tokenize
from fairdiff_jax.config import config_from_argv
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.logs import setup_logging
from fairdiff_jax.metrics import (
    bias_from_freq,
    class_frequencies,
    fair_bias_floor,
    intersection_labels,
    is_main_process,
    progress_bar,
    save_image_grid,
    to_uint8,
)
from fairdiff_jax.semantic_metrics import SEMANTIC_COLUMNS, embed_results, load_semantic_scorer, semantic_metrics

log = logging.getLogger(__name__)


def prompt_noise(comp: Components, prompt_index: int, num_images: int, seed: int) -> jax.Array:
    """The fixed noise ``[M, C, h, w]`` of one test prompt: the same for every model, so images pair up."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), prompt_index)
    return jax.random.normal(key, (num_images,) + latent_shape(comp), jnp.float32)


def make_generator(comp: Components, num_steps: int):
    """``generate(unet_params, te_params, cond_ids [1,L], uncond_ids [1,L], noise [B,...]) -> images, logits``."""

    def generate(unet_params, te_params, cond_ids, uncond_ids, noise, classifier_params):
        cond = embed(comp, te_params, cond_ids)
        uncond = embed(comp, te_params, uncond_ids)
        cond = jnp.broadcast_to(cond, (noise.shape[0],) + cond.shape[1:])
        images = generate_images(
            comp, unet_params, cond, uncond, noise, num_steps, max_steps=num_steps, gradient_mode="detached"
        )
        logits, valid = comp.classifier(classifier_params, images)
        return images, {name: jnp.argmax(value, -1) for name, value in logits.items()}, valid

    return jax.jit(generate)


def generate_prompt_set(
    comp: Components,
    unet_params,
    te_params,
    prompts: Sequence[str],
    out_dir: str,
    *,
    soft_tokens: bool,
    progress: bool = True,
) -> list[dict]:
    """Generate and classify ``eval.images_per_prompt`` images for each prompt; resumable via ``out_dir``.

    Returns, per prompt, ``{"prompt", "images" uint8 [M,H,W,3], "labels" {attr: [M]}, "valid" [M]}``.
    """
    cfg = comp.cfg
    num_images, seed = int(cfg.eval.images_per_prompt), int(cfg.eval.seed)
    mesh = parallel.make_mesh()
    batch = max(mesh.size, int(cfg.eval.batch_size) // mesh.size * mesh.size)
    generate = make_generator(comp, int(cfg.sampler.eval_steps))
    frozen = parallel.replicate((unet_params, te_params, comp.classifier_params), mesh)
    uncond_ids = parallel.replicate(jnp.asarray(tokenize(comp, [""], soft_tokens=False)), mesh)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    bar = progress_bar(len(prompts) * num_images, desc=os.path.basename(out_dir), enabled=progress)
    for index, prompt in enumerate(prompts):
        path = prompt_file(out_dir, index)
        stored = read_stored_prompt(path, prompt, num_images)
        if stored is not None and set(comp.attributes) <= set(stored["labels"]):  # else classified for fewer
            results.append(stored)
            bar.update(num_images)
            continue
        cond_ids = parallel.replicate(jnp.asarray(tokenize(comp, [prompt], soft_tokens=soft_tokens)), mesh)
        noise = prompt_noise(comp, index, num_images, seed)
        chunks = []
        for start in range(0, num_images, batch):
            chunk = noise[start : start + batch]
            real = chunk.shape[0]
            chunk = jnp.concatenate([chunk, jnp.zeros((batch - real,) + chunk.shape[1:])])  # one compiled shape
            out = generate(*frozen[:2], cond_ids, uncond_ids, parallel.shard_batch(chunk, mesh), frozen[2])
            chunks.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], out))
            bar.update(real)
        images = np.concatenate([to_uint8(c[0]) for c in chunks])[:num_images]
        labels = {a: np.concatenate([c[1][a] for c in chunks])[:num_images] for a in comp.attributes}
        valid = np.concatenate([c[2] for c in chunks])[:num_images]
        record = {"prompt": prompt, "images": images, "labels": labels, "valid": valid}
        if is_main_process():
            _store(path, record)
        results.append(record)
    bar.close()
    return results


def _store(path: str, record: dict) -> None:
    tmp = path + ".tmp.npz"
    arrays = {f"label_{k}": v for k, v in record["labels"].items()}
    np.savez_compressed(tmp, prompt=record["prompt"], images=record["images"], valid=record["valid"], **arrays)
    os.replace(tmp, path)


def prompt_file(folder: str, index: int) -> str:
    """The file of the ``index``-th prompt's images and labels in an evaluation folder."""
    return os.path.join(folder, f"prompt_{index:04d}.npz")


def read_stored_prompt(path: str, prompt: str, num_images: int) -> dict | None:
    """The record stored at ``path`` by :func:`generate_prompt_set` if it holds ``num_images`` of ``prompt``."""
    if not os.path.isfile(path):
        return None
    with np.load(path) as stored:
        if str(stored["prompt"]) != prompt or stored["images"].shape[0] != num_images:
            return None
        labels = {k[len("label_") :]: stored[k] for k in stored.files if k.startswith("label_")}
        return {"prompt": str(stored["prompt"]), "images": stored["images"], "labels": labels, "valid": stored["valid"]}


def load_prompt_set(folder: str, prompts: Sequence[str], num_images: int) -> list[dict] | None:
    """The stored records of every prompt in ``folder`` (as written by :func:`generate_prompt_set`), or None
    if any prompt is missing or was stored with another prompt text or image count."""
    results = []
    for index, prompt in enumerate(prompts):
        record = read_stored_prompt(prompt_file(folder, index), prompt, num_images)
        if record is None:
            return None
        results.append(record)
    return results


def bias_metrics(results: Sequence[Mapping], num_classes: Mapping[str, int]) -> dict:
    """Per-attribute (and intersection) bias mean ± std over prompts, mean frequencies and the fair floor.

    ``results`` as from :func:`generate_prompt_set`. Images whose largest face was not classified
    (``valid`` False) are left out, as in the paper.
    """
    names = list(num_classes)
    columns = {n: (np.stack([r["labels"][n] for r in results]), num_classes[n]) for n in names}
    if len(names) > 1:
        for size in range(2, len(names) + 1):
            for combo in itertools.combinations(names, size):
                joint = intersection_labels([columns[n][0] for n in combo], [num_classes[n] for n in combo])
                columns["_x_".join(combo)] = (np.asarray(joint), int(np.prod([num_classes[n] for n in combo])))
    valid = np.stack([r["valid"] for r in results])
    out = {"bias": {}, "bias_std": {}, "freq": {}, "freq_std": {}, "bias_floor": {}, "per_prompt_bias": {}}
    for name, (labels, k) in columns.items():
        freq = np.asarray(class_frequencies(jnp.asarray(labels), k, jnp.asarray(valid)))  # [prompts, K]
        bias = np.asarray(bias_from_freq(freq))
        out["bias"][name] = float(np.nanmean(bias))
        out["bias_std"][name] = float(np.nanstd(bias))
        out["freq"][name] = [float(f) for f in np.nanmean(freq, 0)]
        out["freq_std"][name] = [float(f) for f in np.nanstd(freq, 0)]
        out["per_prompt_bias"][name] = [float(b) for b in bias]
        per_prompt = max(1, int(np.round(valid.sum(1).mean())))
        out["bias_floor"][name] = fair_bias_floor(k, per_prompt)
    out["n_images"] = int(valid.size)
    out["n_valid"] = int(valid.sum())
    out["prompts"] = [r["prompt"] for r in results]
    return out


def save_grids(results: Sequence[Mapping], out_dir: str, *, max_images: int = 32, ncols: int = 8) -> None:
    """One PNG per prompt: the first ``max_images`` images with a colour bar per attribute underneath."""
    for index, record in enumerate(results):
        shown = record["images"][:max_images].astype(np.float32) / 127.5 - 1.0
        labels = {k: np.where(record["valid"][:max_images], v[:max_images], -1) for k, v in record["labels"].items()}
        save_image_grid(shown, os.path.join(out_dir, f"grid_{index:04d}.png"), ncols, labels)


def format_table(rows: Mapping[str, Mapping], columns: Sequence[str]) -> str:
    """A markdown table in the layout of the paper's Table 1: one row per model, ``mean±std`` bias cells.

    ``CLIP-T`` / ``CLIP-I`` / ``DINO`` columns read ``metrics["clip_t"|"clip_i"|"dino"]``; "—" where not computed.
    Their ± is the std over all images (the paper's spread is too large to be one over per-prompt means); the
    bias ± is the std over prompts.
    """
    header = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    lines = []
    for model, metrics in rows.items():
        cells = []
        for column in columns:
            if column in metrics.get("bias", {}):
                cells.append(f"{metrics['bias'][column]:.2f}±{metrics['bias_std'][column]:.2f}")
            elif column in SEMANTIC_COLUMNS:
                entry = metrics.get(SEMANTIC_COLUMNS[column])
                cells.append("—" if entry is None else f"{entry['mean']:.2f}±{entry['std_images']:.2f}")
            else:
                value = metrics.get(column)
                cells.append("—" if value is None else f"{value:.2f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    floor = next(iter(rows.values())).get("bias_floor", {})
    note = ", ".join(f"{k} {v:.3f}" for k, v in floor.items())
    return (
        header
        + "\n".join(lines)
        + f"\n\nBias ± is the std over prompts; CLIP/DINO ± is the std over images. Bias of a perfectly fair "
        f"generator with these sample sizes: {note}.\n"
    )


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
    components: Components | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate the original model and/or the adaptor trained in ``workdir``; returns the metrics dict.

    With ``eval.clip_path`` / ``eval.dino_path`` set, every model also gets CLIP-T, and each adapted model CLIP-I /
    DINO against the original model's images: those generated here, else the per-prompt files in
    ``original_images`` (default ``OUT/original/SPLIT`` when it holds every prompt).
    """
    comp = components or build_components(cfg)
    split = split or next(iter(comp.eval_prompts))
    if split not in comp.eval_prompts:
        raise FairdiffError(f"unknown prompt split '{split}'; choose one of {sorted(comp.eval_prompts)}")
    prompts = comp.eval_prompts[split]
    models = {}
    if include_original:
        models["original"] = (comp.unet_params, comp.text_encoder_params, False)
    if workdir is not None:
        spec = adaptors.read_adaptor_metadata(workdir)
        adaptors.check_base_model(spec, comp.unet_params, comp.text_encoder_params)
        found_step, item = adaptors.restore_adaptor_item(workdir, step)
        unet_params, te_params = adaptors.apply_adaptor(
            spec, item["ema" if use_ema else "params"], comp.unet_params, comp.text_encoder_params
        )
        models[f"debiased (step {found_step})"] = (unet_params, te_params, True)
    if not models:
        raise FairdiffError("nothing to evaluate: give --workdir with a trained adaptor, or include the original model")
    eval_cfg = comp.cfg.eval
    scorer = load_semantic_scorer(
        eval_cfg.get("clip_path", ""), eval_cfg.get("dino_path", ""), batch_size=int(eval_cfg.batch_size)
    )
    report, embeddings = {}, {}
    for name, (unet_params, te_params, soft) in models.items():
        folder = os.path.join(out, "original" if name == "original" else "debiased", split)
        results = generate_prompt_set(
            comp, unet_params, te_params, prompts, folder, soft_tokens=soft, progress=progress
        )
        report[name] = bias_metrics(results, comp.num_classes)
        if scorer is not None:
            embeddings[name] = embed_results(scorer, results)
        if is_main_process():
            save_grids(results, folder)
    if scorer is not None:
        text_embeds = scorer.embed_prompts(prompts)
        original = embeddings.get("original")
        if original is None and len(report) > (1 if "original" in report else 0):
            original = _stored_original_embeddings(scorer, out, split, prompts, comp, original_images)
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
    return metrics


def _stored_original_embeddings(scorer, out, split, prompts, comp, original_images):
    """Embeddings of the original model's stored images for CLIP-I / DINO, or None (with a log line)."""
    num_images = int(comp.cfg.eval.images_per_prompt)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairdiff evaluate", description="Evaluate the original and debiased model.")
    parser.add_argument("--workdir", help="training run folder (omit to evaluate the original model only)")
    parser.add_argument("--out", required=True, help="where metrics.json, table.md and grids are written")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw adaptor weights instead of the EMA")
    parser.add_argument("--no-original", action="store_true", help="skip the original model")
    parser.add_argument("--split", default=None, help="prompt split to evaluate (default: test)")
    parser.add_argument(
        "--clip", default=None, help="evaluation CLIPModel folder for CLIP-T / CLIP-I (sets eval.clip_path)"
    )
    parser.add_argument("--dino", default=None, help="evaluation DINOv2 folder for DINO (sets eval.dino_path)")
    parser.add_argument(
        "--original-images",
        default=None,
        help="folder of the original model's stored images (OUT/original/SPLIT of an earlier evaluation) for "
        "CLIP-I / DINO with --no-original",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    cfg, rest = config_from_argv(list(argv or []))
    args = build_parser().parse_args(rest)
    setup_logging()
    if args.clip is not None:
        cfg.eval.clip_path = args.clip
    if args.dino is not None:
        cfg.eval.dino_path = args.dino
    metrics = evaluate(
        cfg,
        args.workdir,
        args.out,
        step=args.step,
        use_ema=not args.no_ema,
        include_original=not args.no_original,
        split=args.split,
        original_images=args.original_images,
    )
    summary = {"bias": metrics["bias"], "bias_std": metrics["bias_std"], "n_images": metrics["n_images"]}
    summary.update({key: metrics[key]["mean"] for key in SEMANTIC_COLUMNS.values() if key in metrics})
    print(json.dumps(summary))
    return 0
