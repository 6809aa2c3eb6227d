"""Reproduce the paper's Tables 1, 5 and 6: train (or reuse) each run, evaluate it, print ours beside theirs.

    python experiments/reproduce.py --table 1 --sd /data/sd15 --root runs/table1 \\
        --classifier gender=/data/cls/gender --classifier race=/data/cls/race \\
        [--eval-classifier gender=/data/eval_cls/gender --eval-classifier race=/data/eval_cls/race] \\
        [--clip /data/clip --dino /data/dinov2] [--eval-clip /data/eval_clip --eval-dino /data/eval_dino] \\
        [--config.num_steps=10000 ...]

Each row's run lives in ``ROOT/<config>``; a finished run is reused (training resumes from its newest
checkpoint, evaluation reuses stored images). Extra ``--config.*`` overrides apply to every run. ``--clip`` /
``--dino`` are the training loss's encoders; ``--eval-clip`` / ``--eval-dino`` the evaluation's (CLIP-T, CLIP-I,
DINO). Those columns are filled only when evaluation encoders are given; otherwise they show "—".
``--eval-classifier`` names the classifiers that score the tables (the paper's are trained separately from the
training ones); without them the training classifier scores, which overstates debiasing, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAPER = os.path.join(HERE, "paper_tables.json")

# table -> [(row name, config file[:arg], prompt sets to evaluate separately or None)]
TABLES = {
    "1": [
        ("gender", "gender.py:text_lora", None),
        ("race", "race.py:text_lora", None),
        ("gender_race", "gender_race.py:text_lora", None),
    ],
    "5": [("gender_race", "gender_race.py:text_lora", None), ("gender_race_age", "gender_race_age.py:text_lora", None)],
    "6": [
        (
            "multi_concept",
            "multi_concept.py:text_lora",
            ("occupations", "sports", "occupations_style", "personal_descriptors"),
        )
    ],
}
COLUMNS = {
    "1": ("gender", "race", "gender_x_race", "CLIP-T", "CLIP-I", "DINO"),
    "5": ("gender", "race", "gender_x_race", "age", "CLIP-T", "CLIP-I", "DINO"),
    "6": ("gender", "race", "gender_x_race", "CLIP-T"),
}


def _cell(metrics: dict, column: str) -> str:
    if column == "age":  # Table 5 reports the frequency of "old", not a bias
        freq = metrics["freq"].get("age")
        return "—" if freq is None else f"{freq[1]:.3f}"
    from fairdiff_jax.semantic_metrics import SEMANTIC_COLUMNS  # column -> metrics.json key

    if column in SEMANTIC_COLUMNS:
        entry = metrics.get(SEMANTIC_COLUMNS[column])
        return "—" if entry is None else f"{entry['mean']:.2f}±{entry['std_images']:.2f}"
    if column not in metrics["bias"]:
        return "—"
    return f"{metrics['bias'][column]:.2f}±{metrics['bias_std'][column]:.2f}"


def run_row(
    config: str,
    workdir: str,
    overrides: Sequence[str],
    classifiers: dict[str, str],
    *,
    train_steps: int | None,
    prompt_set: str | None,
    eval_classifiers: dict[str, str] | None = None,
):
    """Train (resume) the run in ``workdir`` and evaluate the original and the debiased model."""
    from fairdiff_jax.config import attribute_names, load_config
    from fairdiff_jax.evaluate import evaluate
    from fairdiff_jax.train import train

    names = attribute_names(load_config(os.path.join(ROOT, "configs", config), validate=False))
    eval_classifiers = eval_classifiers or {}
    extra = list(overrides) + [
        f"--config.attributes.{a}.classifier={classifiers[a]}" for a in names if a in classifiers
    ]
    extra += [f"--config.attributes.{a}.eval_classifier={eval_classifiers[a]}" for a in names if a in eval_classifiers]
    extra += [f"--config.num_steps={train_steps}"] if train_steps else []
    cfg = load_config(os.path.join(ROOT, "configs", config), extra)
    train(cfg, workdir)
    if prompt_set:
        cfg = load_config(os.path.join(ROOT, "configs", config), extra + [f"--config.data.prompts={prompt_set}"])
    out = os.path.join(workdir, "eval" if not prompt_set else f"eval_{prompt_set}")
    return evaluate(cfg, workdir, out)


def reproduce(
    table: str,
    root: str,
    overrides: Sequence[str],
    classifiers: dict[str, str],
    *,
    train_steps: int | None = None,
    rows: Sequence[str] | None = None,
    eval_classifiers: dict[str, str] | None = None,
) -> str:
    """Run one table and return it as markdown (ours, with the paper's numbers beside it)."""
    from fairdiff_jax.scoring import scored_by_note

    with open(PAPER, encoding="utf-8") as f:
        paper = json.load(f)[f"table{table}"]
    columns = COLUMNS[table]
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    original_done, scored_by = set(), {}
    for name, config, prompt_sets in TABLES[table]:
        if rows and name not in rows:
            continue
        for prompt_set in prompt_sets or (None,):
            metrics = run_row(
                config,
                os.path.join(root, name),
                overrides,
                classifiers,
                train_steps=train_steps,
                prompt_set=prompt_set,
                eval_classifiers=eval_classifiers,
            )
            scored_by.update(metrics["models"]["original"].get("scored_by", {}))
            label = f"{prompt_set}: " if prompt_set else ""
            models = metrics["models"]
            if label not in original_done:
                lines.append(
                    f"| {label}original (ours) | " + " | ".join(_cell(models["original"], c) for c in columns) + " |"
                )
                original_done.add(label)
            debiased = [m for m in models if m != "original"][0]
            lines.append(f"| {label}{name} (ours) | " + " | ".join(_cell(models[debiased], c) for c in columns) + " |")
    lines += ["", scored_by_note(scored_by)]
    lines += ["", "Paper (" + ", ".join(paper["columns"]) + "):", ""]
    lines += [f"| {row} | " + " | ".join(values) + " |" for row, values in paper["rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, ROOT)
    from fairdiff_jax.cli import enable_compilation_cache
    from fairdiff_jax.config import split_overrides

    pairs, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, choices=sorted(TABLES))
    parser.add_argument("--root", required=True, help="folder holding one run per row")
    parser.add_argument("--sd", required=True, help="local Stable Diffusion 1.5 folder (diffusers layout)")
    parser.add_argument(
        "--classifier",
        action="append",
        default=[],
        metavar="ATTR=FOLDER",
        help="attribute classifier folder, e.g. gender=/data/cls/gender (repeat per attribute)",
    )
    parser.add_argument(
        "--eval-classifier",
        action="append",
        default=[],
        metavar="ATTR=FOLDER",
        help="classifier folder that scores the tables, e.g. gender=/data/eval_cls/gender (repeat per attribute)",
    )
    parser.add_argument("--clip", default="", help="local CLIP folder for the semantic loss")
    parser.add_argument("--dino", default="", help="local DINOv2 folder for the semantic loss")
    parser.add_argument("--eval-clip", default="", help="local CLIPModel folder for the CLIP-T / CLIP-I columns")
    parser.add_argument("--eval-dino", default="", help="local DINOv2 folder for the DINO column")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the paper's)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (e.g. gender)")
    args = parser.parse_args(rest)
    enable_compilation_cache()
    overrides = [
        f"--config.model.path={args.sd}",
        f"--config.loss.clip_path={args.clip}",
        f"--config.loss.dino_path={args.dino}",
        f"--config.eval.clip_path={args.eval_clip}",
        f"--config.eval.dino_path={args.eval_dino}",
    ]
    classifiers = dict(item.partition("=")[::2] for item in args.classifier)
    eval_classifiers = dict(item.partition("=")[::2] for item in args.eval_classifier)
    overrides += [f"--config.{k}={v}" for k, v in pairs]
    table = reproduce(
        args.table,
        args.root,
        overrides,
        classifiers,
        train_steps=args.steps,
        rows=args.rows,
        eval_classifiers=eval_classifiers,
    )
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, f"table{args.table}.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
