"""Toy-world Table 1 and the gradient ablation: the paper's experiments where the truth is known, on a CPU.

    python experiments/toy_tables.py --root runs/toy_tables [--kinds text_lora unet_lora soft_tokens unet_oft] \\
        [--methods ethical_intervention debiasvl uce fair_diffusion] [--targets gender race gender+race] \\
        [--modes exact adjusted detached] [--seeds 0 1 2] [--config.num_steps=200 ...]

Table 1 (toy): the original toy model, the baselines (``fairdiff_jax.baselines``, settings from
``--config.baselines.NAME.*``), then one run per (debiased attribute set, adaptor kind), each evaluated for gender,
race and their intersection on the debiased and on the held-out occupations, with the occupation-cue accuracy as
the semantics column (the toy stand-in for CLIP-T). The toy text encoder was trained on captions that name
each attribute half of the time ("a photo of a young black female doctor"), so the language-based baselines'
words (female/male, white/black/indian/asian) mean to it what they mean to them. The ablation trains the
text-encoder LoRA for gender with the exact, the adjusted and the detached gradient (DESIGN.md §1.1) and plots
their loss and gradient-norm curves beside the final bias, as the paper's project page does for Stable Diffusion.

Trained rows (adaptors and the ablation) run once per ``--seeds`` entry (``config.seed``: the adaptor's
initialisation, the training noise and the prompt order; the evaluation noise stays fixed). A row with several
seeds reports the mean of their biases ± its standard deviation over seeds; a row with one seed (and the
untrained rows: original, baselines) the mean over occupations ± its standard deviation over occupations.

Every run lives in ``ROOT/<name>`` (``<name>_seed<S>`` for seeds other than 0); a finished run is reused
(``row.json``), an interrupted one resumes from its checkpoint. Extra ``--config.*`` overrides apply to every
run. Output: ``ROOT/toy_tables.md``, ``ROOT/ablation_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KINDS = ("text_lora", "unet_lora", "soft_tokens", "unet_oft")
METHODS = ("ethical_intervention", "debiasvl", "uce", "fair_diffusion")
TARGETS = ("gender", "race", "gender+race")
MODES = ("exact", "adjusted", "detached")
EVALUATED = ("gender", "race")  # every row is measured on these and their intersection
COLUMNS = ("gender", "race", "gender_x_race")


def _summary(section: dict) -> dict:
    """The numbers a table cell needs from :func:`fairdiff_jax.toyworld.demo.measure` output."""
    out = {}
    for split, (metrics, _) in section.items():
        out[split] = {
            "bias": {c: metrics["bias"][c] for c in COLUMNS},
            "bias_std": {c: metrics["bias_std"][c] for c in COLUMNS},
            "bias_floor": {c: metrics["bias_floor"][c] for c in COLUMNS},
            "freq": {c: metrics["freq"][c] for c in EVALUATED},
            "cue_accuracy": metrics["cue_accuracy"],
        }
    return out


def _load(path: str) -> dict | None:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def _save(path: str, row: dict) -> dict:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(row, f, indent=2)
    os.replace(path + ".tmp", path)
    return row


def original_row(root: str, overrides: Sequence[str], progress: bool) -> dict:
    """The base toy model, measured once."""
    from fairdiff_jax.evaluate import EvalSettings, original_model_id
    from fairdiff_jax.run import build_run
    from fairdiff_jax.toyworld.demo import demo_config, measure

    path = os.path.join(root, "original", "row.json")
    row = _load(path)
    if row is None:
        cfg = demo_config("text_lora", EVALUATED, overrides)
        run = build_run(cfg)
        out_dir = os.path.join(root, "original", "eval")
        frozen = run.frozen
        section = measure(
            run,
            EvalSettings.from_config(cfg),
            frozen["unet"],
            frozen["text_encoder"],
            out_dir,
            soft_tokens=False,
            model_id=original_model_id(run),
            progress=progress,
        )
        row = _save(path, {"name": "original", **_summary(section)})
    return row


def run_name(kind: str, target: str, mode: str, seed: int = 0) -> str:
    return f"{target}_{kind}_{mode}" + (f"_seed{seed}" if seed else "")


def run_row(
    root: str, kind: str, target: str, mode: str, overrides: Sequence[str], progress: bool, seed: int = 0
) -> tuple[dict, str]:
    """Train ``kind`` debiasing ``target`` (``+``-joined attributes) with gradient ``mode`` and training ``seed``,
    then measure it."""
    from fairdiff_jax.evaluate import EvalSettings
    from fairdiff_jax.run import build_run
    from fairdiff_jax.toyworld.demo import adapted_model, demo_config, measure
    from fairdiff_jax.train import train

    name = run_name(kind, target, mode, seed)
    run_dir = os.path.join(root, name)
    train_dir = os.path.join(run_dir, "train")
    overrides = [*overrides, f"--config.seed={int(seed)}"]
    path = os.path.join(run_dir, "row.json")
    row = _load(path)
    if row is None:
        started = time.perf_counter()
        cfg = demo_config(kind, target.split("+"), [*overrides, f"--config.sampler.gradient_mode={mode}"])
        run = build_run(cfg)
        train(cfg, train_dir, run=run, progress=progress)
        eval_cfg = demo_config(kind, EVALUATED, overrides)
        eval_run = build_run(eval_cfg)
        unet_params, te_params, model_id = adapted_model(run, cfg, train_dir)
        section = measure(
            eval_run,
            EvalSettings.from_config(eval_cfg),
            unet_params,
            te_params,
            os.path.join(run_dir, "eval"),
            soft_tokens=True,
            model_id=model_id,
            progress=progress,
        )
        row = {"name": name, "kind": kind, "target": target, "mode": mode, "steps": int(cfg.num_steps), "seed": seed}
        row.update(_summary(section))
        row["seconds"] = time.perf_counter() - started
        _save(path, row)
    return row, train_dir


def method_row(root: str, method: str, target: str, overrides: Sequence[str], progress: bool) -> dict:
    """Apply baseline ``method`` debiasing ``target`` to the toy model, then measure it like the adaptor rows."""
    from fairdiff_jax.baselines.harness import baseline_setup
    from fairdiff_jax.evaluate import EvalSettings, original_model_id
    from fairdiff_jax.run import build_run
    from fairdiff_jax.toyworld.demo import demo_config, measure

    name = f"{target}_{method}"
    run_dir = os.path.join(root, name)
    path = os.path.join(run_dir, "row.json")
    row = _load(path)
    if row is None:
        started = time.perf_counter()
        cfg = demo_config("unet_lora", target.split("+"), overrides)  # the adaptor kind is unused by a baseline
        setup = baseline_setup(build_run(cfg), cfg, method, os.path.join(run_dir, "setup"), progress=progress)
        eval_cfg = demo_config("unet_lora", EVALUATED, overrides)
        eval_run = build_run(eval_cfg)
        section = measure(
            eval_run,
            EvalSettings.from_config(eval_cfg),
            eval_run.frozen["unet"] if setup.unet_params is None else setup.unet_params,
            eval_run.frozen["text_encoder"],
            os.path.join(run_dir, "eval"),
            soft_tokens=False,
            model_id=f"baseline:{method}:{target}|{original_model_id(eval_run)}",
            progress=progress,
            baseline=setup,
        )
        row = {"name": name, "kind": method, "target": target, "baseline": True}
        row.update(_summary(section))
        row["seconds"] = time.perf_counter() - started
        _save(path, row)
    return row


def over_seeds(rows: Sequence[dict]) -> dict:
    """One row from the same run at several seeds: each bias is the mean over seeds, ``bias_std`` their standard
    deviation (population, ``ddof=0``), the cue accuracy the mean; ``seeds`` lists them. One row is returned as is."""
    import numpy as np

    if len(rows) == 1:
        return rows[0]
    merged = {key: rows[0][key] for key in ("name", "kind", "target", "mode", "steps") if key in rows[0]}
    merged["seeds"] = [row.get("seed", 0) for row in rows]
    for split in ("debiased", "held_out"):
        biases = {c: np.asarray([row[split]["bias"][c] for row in rows], np.float64) for c in COLUMNS}
        merged[split] = {
            "bias": {c: float(v.mean()) for c, v in biases.items()},
            "bias_std": {c: float(v.std()) for c, v in biases.items()},
            "bias_floor": rows[0][split]["bias_floor"],
            "cue_accuracy": float(np.mean([row[split]["cue_accuracy"] for row in rows])),
        }
    return merged


def _cells(row: dict, split: str) -> list[str]:
    section = row[split]
    cells = [f"{section['bias'][c]:.3f}±{section['bias_std'][c]:.3f}" for c in COLUMNS]
    return cells + [f"{section['cue_accuracy']:.3f}", str(len(row.get("seeds", [0]))) if "mode" in row else "—"]


def table_markdown(original: dict, rows: Sequence[dict], split: str) -> str:
    """Table 1 in the paper's layout for one occupation split."""
    header = (
        "| debiased for | method | gender | race | gender×race | cue accuracy | seeds |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = ["| — (original) | — | " + " | ".join(_cells(original, split)) + " |"]
    for row in rows:
        lines.append(
            f"| {row['target'].replace('+', '×')} | `{row['kind']}` | " + " | ".join(_cells(row, split)) + " |"
        )
    floor = original[split]["bias_floor"]
    note = ", ".join(f"{c} {floor[c]:.3f}" for c in COLUMNS)
    spread = (
        "Rows with several seeds: mean of the seeds' biases ± its standard deviation over seeds; rows with one "
        "seed and untrained rows: mean over occupations ± its standard deviation over occupations."
    )
    return (
        header
        + "\n".join(lines)
        + f"\n\n{spread} Bias of a perfectly fair generator with these sample sizes: {note}.\n"
    )


def ablation_markdown(rows: Sequence[dict], curves: dict) -> str:
    header = (
        "| gradient | gender bias (debiased occ.) | gender bias (held out) | cue accuracy | final loss | "
        "median grad norm |\n|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        steps, loss, grad = curves[row["mode"]]
        tail = max(1, len(loss) // 10)
        final_loss = sum(loss[-tail:]) / tail if loss else float("nan")
        median_grad = sorted(grad)[len(grad) // 2] if grad else float("nan")
        lines.append(
            f"| {row['mode']} | {row['debiased']['bias']['gender']:.3f}±{row['debiased']['bias_std']['gender']:.3f} "
            f"| {row['held_out']['bias']['gender']:.3f}±{row['held_out']['bias_std']['gender']:.3f} "
            f"| {row['debiased']['cue_accuracy']:.3f} | {final_loss:.3f} | {median_grad:.3g} |"
        )
    return (
        header
        + "\n".join(lines)
        + "\n\nfinal loss: mean of the last tenth of the logged training losses (first seed); biases as in Table 1.\n"
    )


def training_curve(train_dir: str) -> tuple[list[int], list[float], list[float]]:
    from fairdiff_jax.reporting import read_metrics

    rows = [r for r in read_metrics(train_dir) if "loss" in r]
    return [int(r["step"]) for r in rows], [r["loss"] for r in rows], [r.get("grad_norm", float("nan")) for r in rows]


def plot_ablation(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for mode, (steps, loss, grad) in curves.items():
        axes[0].plot(steps, loss, label=mode)
        axes[1].plot(steps, grad, label=mode)
    axes[0].set_title("training loss")
    axes[1].set_title("gradient norm")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finished_seeds(root: str, kind: str, target: str, mode: str, seeds: Sequence[int]) -> list[int]:
    """The entries of ``seeds`` whose run of (``kind``, ``target``, ``mode``) has finished."""
    return [s for s in seeds if os.path.exists(os.path.join(root, run_name(kind, target, mode, s), "row.json"))]


def toy_tables(
    root: str,
    overrides: Sequence[str] = (),
    *,
    kinds: Sequence[str] = KINDS,
    methods: Sequence[str] = METHODS,
    targets: Sequence[str] = TARGETS,
    modes: Sequence[str] = MODES,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    finished_only: bool = False,
) -> str:
    """Run (or reuse) every run, write ``ROOT/toy_tables.md`` and the ablation plot; returns the markdown.
    ``finished_only`` tabulates the runs already finished in ``root`` and trains nothing new: a row whose seeds
    have only partly finished is shown over those that have."""
    original = original_row(root, overrides, progress)
    combos = {(kind, target): list(seeds) for target in targets for kind in kinds}
    ablation_seeds = {mode: list(seeds) for mode in modes}
    if finished_only:  # each row over the seeds that have finished (the seeds column says how many)
        combos = {key: _finished_seeds(root, *key, "adjusted", seeds) for key in combos}
        combos = {key: done for key, done in combos.items() if done}
        ablation_seeds = {m: _finished_seeds(root, "text_lora", "gender", m, seeds) for m in modes}
        ablation_seeds = {mode: done for mode, done in ablation_seeds.items() if done}
    baselines = [(method, target) for target in targets for method in methods]
    if finished_only:
        baselines = [(m, t) for m, t in baselines if os.path.exists(os.path.join(root, f"{t}_{m}", "row.json"))]
    rows = [method_row(root, method, target, overrides, progress) for method, target in baselines]
    for (kind, target), row_seeds in combos.items():
        rows.append(over_seeds([run_row(root, kind, target, "adjusted", overrides, progress, s)[0] for s in row_seeds]))
    text = ["# Toy world: Table 1 and the gradient ablation", ""]
    for split, title in (("held_out", "held-out occupations (never trained on)"), ("debiased", "trained occupations")):
        text += [f"## Table 1 (toy), {title}", "", table_markdown(original, rows, split)]
    if ablation_seeds:
        ablation = {
            mode: [run_row(root, "text_lora", "gender", mode, overrides, progress, s) for s in mode_seeds]
            for mode, mode_seeds in ablation_seeds.items()
        }
        curves = {mode: training_curve(runs[0][1]) for mode, runs in ablation.items()}  # the first seed's curves
        plot_ablation(curves, os.path.join(root, "ablation_curves.png"))
        text += [
            "## Gradient ablation (text-encoder LoRA, gender)",
            "",
            ablation_markdown([over_seeds([row for row, _ in runs]) for runs in ablation.values()], curves),
            "![loss and gradient norm](ablation_curves.png)",
            "",
        ]
    markdown = "\n".join(text)
    with open(os.path.join(root, "toy_tables.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, ROOT)
    from fairdiff_jax.cli import enable_compilation_cache
    from fairdiff_jax.config import split_overrides
    from fairdiff_jax.logs import setup_logging

    pairs, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding one run per row")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS, help="adaptor kinds (Table 1)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="baselines (Table 1)")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=TARGETS, help="what to debias")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES, help="ablation gradients")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds of every trained row")
    parser.add_argument("--finished-only", action="store_true", help="tabulate finished runs, train nothing")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(rest)
    enable_compilation_cache()
    setup_logging()
    os.makedirs(args.root, exist_ok=True)
    markdown = toy_tables(
        args.root,
        [f"--config.{k}={v}" for k, v in pairs],
        kinds=args.kinds,
        methods=args.methods,
        targets=args.targets,
        modes=args.modes,
        seeds=args.seeds,
        progress=not args.no_progress,
        finished_only=args.finished_only,
    )
    print(markdown, end="")
    return 0


def spread_devices(argv: Sequence[str]) -> int:
    """As ``fairdiff demo`` does: one JAX CPU device per core, dividing every run's image counts (call it before JAX
    starts; the command line only, so a test process's JAX is left alone)."""
    sys.path.insert(0, ROOT)
    from fairdiff_jax.config import split_overrides
    from fairdiff_jax.toyworld.demo import demo_config
    from fairdiff_jax.toyworld.demo_cli import spread_over_cpu_cores

    pairs, _ = split_overrides(list(argv))
    overrides = [f"--config.{k}={v}" for k, v in pairs]
    counts = []
    for kind in (*KINDS, "unet_lora"):
        cfg = demo_config(kind, ["gender"], overrides)
        counts += [cfg.train.images_per_prompt, cfg.eval.images_per_prompt, cfg.eval.batch_size]
    return spread_over_cpu_cores(counts)


if __name__ == "__main__":
    spread_devices(sys.argv[1:])
    sys.exit(main())
