"""``fairdiff evaluate --config C [--workdir DIR [--step N] | --adaptor DIR | --method NAME] --out OUT``: arguments ->
:func:`fairdiff_jax.evaluate.evaluate`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from fairdiff_jax.config import config_from_argv
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.evaluate import evaluate
from fairdiff_jax.logs import setup_logging
from fairdiff_jax.semantic_metrics import SEMANTIC_COLUMNS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairdiff evaluate", description="Evaluate the original and debiased model.")
    from fairdiff_jax.baselines.methods import METHODS

    parser.add_argument("--workdir", help="training run folder (omit to evaluate the original model only)")
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        default=None,
        help="evaluate a baseline instead of a trained adaptor (settings: --config.baselines.NAME.*)",
    )
    parser.add_argument("--out", required=True, help="where metrics.json, table.md and grids are written")
    parser.add_argument(
        "--adaptor",
        default=None,
        metavar="DIR",
        help="an adaptor folder written by 'fairdiff export' or 'fairdiff import' (instead of --workdir)",
    )
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
    if args.adaptor is not None and (args.step is not None or args.no_ema):
        raise FairdiffError("--step and --no-ema pick a checkpoint of --workdir; an --adaptor folder holds one adaptor")
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
        adaptor=args.adaptor,
        method=args.method,
    )
    summary = {"bias": metrics["bias"], "bias_std": metrics["bias_std"], "n_images": metrics["n_images"]}
    summary.update({key: metrics[key]["mean"] for key in SEMANTIC_COLUMNS.values() if key in metrics})
    print(json.dumps(summary))
    return 0
