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

``--official DIR`` adds the paper authors' released adaptors, one folder per row imported with ``fairdiff import``
(``DIR/gender`` from their exp-1, ``DIR/race`` exp-6, ``DIR/gender_race`` exp-3, ``DIR/gender_race_age`` exp-4,
``DIR/multi_concept`` exp-5), evaluated with the same config, prompts and noise as ours into
``ROOT/<row>/eval_authors``; ``--official-only`` evaluates the original model and those adaptors without training.
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


def row_configs(
    config: str,
    overrides: Sequence[str],
    classifiers: dict[str, str],
    *,
    train_steps,
    prompt_set,
    eval_classifiers: dict[str, str] | None = None,
):
    """``(train config, evaluation config)`` of one row (the evaluation's prompts are ``prompt_set`` when given;
    ``eval_classifiers`` score the evaluation)."""
    from fairdiff_jax.config import attribute_names, load_config

    path = os.path.join(ROOT, "configs", config)
    names = attribute_names(load_config(path, validate=False))
    extra = list(overrides) + [
        f"--config.attributes.{a}.classifier={classifiers[a]}" for a in names if a in classifiers
    ]
    eval_classifiers = eval_classifiers or {}
    extra += [f"--config.attributes.{a}.eval_classifier={eval_classifiers[a]}" for a in names if a in eval_classifiers]
    extra += [f"--config.num_steps={train_steps}"] if train_steps else []
    train_cfg = load_config(path, extra)
    eval_cfg = load_config(path, extra + [f"--config.data.prompts={prompt_set}"]) if prompt_set else train_cfg
    return train_cfg, eval_cfg


def run_row(train_cfg, eval_cfg, workdir: str, out: str):
    """Train (resume) the run in ``workdir`` and evaluate the original and the debiased model into ``out``."""
    from fairdiff_jax.evaluate import evaluate
    from fairdiff_jax.train import train

    train(train_cfg, workdir)
    return evaluate(eval_cfg, workdir, out)


def authors_row(eval_cfg, adaptor_dir: str, out: str, ours: dict | None):
    """Evaluate the authors' imported adaptor ``adaptor_dir`` into ``out``; CLIP-I / DINO against the original
    model's images of our evaluation ``ours`` when given, else the original model is evaluated here too."""
    from fairdiff_jax.evaluate import evaluate

    originals = None if ours is None else os.path.join(ours["out"], "original", ours["metrics"]["split"])
    return evaluate(eval_cfg, None, out, adaptor=adaptor_dir, include_original=ours is None, original_images=originals)


def _line(label: str, metrics: dict, columns: Sequence[str]) -> str:
    return f"| {label} | " + " | ".join(_cell(metrics, c) for c in columns) + " |"


def reproduce(
    table: str,
    root: str,
    overrides: Sequence[str],
    classifiers: dict[str, str],
    *,
    train_steps: int | None = None,
    rows: Sequence[str] | None = None,
    official: str | None = None,
    official_only: bool = False,
    eval_classifiers: dict[str, str] | None = None,
) -> str:
    """Run one table and return it as markdown: ours, the authors' adaptors (``official``), the paper's numbers."""
    from fairdiff_jax.scoring import scored_by_note

    with open(PAPER, encoding="utf-8") as f:
        paper = json.load(f)[f"table{table}"]
    if official_only and not official:
        raise SystemExit("--official-only needs --official DIR (the authors' imported adaptors)")
    columns = COLUMNS[table]
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    notes, original_done, scored_by = [], set(), {}
    for name, config, prompt_sets in TABLES[table]:
        if rows and name not in rows:
            continue
        authors_dir = os.path.join(official, name) if official else None
        if authors_dir and not os.path.isfile(os.path.join(authors_dir, "adaptor.json")):
            notes.append(f"no authors' adaptor for '{name}' (import it into {authors_dir} with 'fairdiff import')")
            authors_dir = None
        if official_only and authors_dir is None:
            continue
        for prompt_set in prompt_sets or (None,):
            train_cfg, eval_cfg = row_configs(
                config,
                overrides,
                classifiers,
                train_steps=train_steps,
                prompt_set=prompt_set,
                eval_classifiers=eval_classifiers,
            )
            suffix = f"_{prompt_set}" if prompt_set else ""
            label = f"{prompt_set}: " if prompt_set else ""
            ours = theirs = None
            if not official_only:
                out = os.path.join(root, name, "eval" + suffix)
                ours = {"out": out, "metrics": run_row(train_cfg, eval_cfg, os.path.join(root, name), out)}
            if authors_dir:
                theirs = authors_row(eval_cfg, authors_dir, os.path.join(root, name, "eval_authors" + suffix), ours)
            scored_by.update((ours["metrics"] if ours else theirs)["models"]["original"].get("scored_by", {}))
            if label not in original_done:
                original = (ours["metrics"] if ours else theirs)["models"]["original"]
                lines.append(_line(f"{label}original (ours)", original, columns))
                original_done.add(label)
            for who, metrics in (("ours", ours and ours["metrics"]), ("authors", theirs)):
                if metrics:
                    adapted = [m for m in metrics["models"] if m != "original"][0]
                    lines.append(_line(f"{label}{name} ({who})", metrics["models"][adapted], columns))
    lines += ["", scored_by_note(scored_by)]
    lines += ["", "Paper (" + ", ".join(paper["columns"]) + "):", ""]
    lines += [f"| {row} | " + " | ".join(values) + " |" for row, values in paper["rows"].items()]
    lines += ([""] + [f"Note: {note}." for note in notes]) if notes else []
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
    parser.add_argument(
        "--face-reference",
        default="",
        help="reference set of real faces for L_face ('fairdiff faces build-reference'); the paper's rows need it",
    )
    parser.add_argument("--eval-clip", default="", help="local CLIPModel folder for the CLIP-T / CLIP-I columns")
    parser.add_argument("--eval-dino", default="", help="local DINOv2 folder for the DINO column")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the paper's)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (e.g. gender)")
    parser.add_argument(
        "--official",
        default=None,
        metavar="DIR",
        help="folder of the authors' adaptors imported with 'fairdiff import', one per row (DIR/gender, ...)",
    )
    parser.add_argument(
        "--official-only", action="store_true", help="evaluate only the original model and the authors' adaptors"
    )
    args = parser.parse_args(rest)
    enable_compilation_cache()
    overrides = [
        f"--config.model.path={args.sd}",
        f"--config.loss.clip_path={args.clip}",
        f"--config.loss.dino_path={args.dino}",
        f"--config.loss.face_reference_path={args.face_reference}",
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
        official=args.official,
        official_only=args.official_only,
        eval_classifiers=eval_classifiers,
    )
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, f"table{args.table}.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
