"""``fairdiff export --workdir DIR --out OUT [--step N] [--no-ema]``: arguments ->
:func:`fairdiff_jax.adaptors.export.export_run`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from fairdiff_jax.adaptors.export import export_run
from fairdiff_jax.adaptors.spec import METADATA_FILE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairdiff export",
        description="Export a trained adaptor (EMA weights by default) for PyTorch diffusers and Flax.",
    )
    parser.add_argument("--workdir", required=True, help="training workdir (holds adaptor.json and checkpoints/)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw parameters instead of their EMA")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fairdiff export --workdir DIR --out OUT [--step N] [--no-ema]``; returns the exit code."""
    args = build_parser().parse_args(list(argv or []))
    replacing = os.path.isfile(os.path.join(args.out, METADATA_FILE))
    spec, step, written = export_run(args.workdir, args.out, step=args.step, use_ema=not args.no_ema)
    if replacing:
        print(f"replaced the earlier export in {args.out}")
    which = "raw parameters" if args.no_ema else f"EMA (decay {spec.ema_decay})"
    print(f"exported step {step} ({which}) of {args.workdir} to {args.out}:")
    for path in written:
        print(f"  {path}")
    return 0
