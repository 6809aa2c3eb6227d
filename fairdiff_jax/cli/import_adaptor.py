"""``fairdiff import --kind K --source FILE.pth [--kind K --source FILE.pth] --base SD --out DIR``: arguments ->
:func:`fairdiff_jax.adaptors.authors.import_authors` (the paper authors' released adaptors)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fairdiff_jax.adaptors import authors
from fairdiff_jax.adaptors.soft_tokens import DEFAULT_TOKEN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairdiff import",
        description="Import the paper authors' released adaptors (.pth, read without torch) as an adaptor folder "
        "like 'fairdiff export' writes.",
    )
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=list(authors.KINDS),
        help="what the next --source holds (repeat both to combine, e.g. text_lora and unet_lora)",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="FILE.pth",
        help="one of the authors' files, e.g. " + ", ".join(authors.AUTHORS_FILES.values()),
    )
    parser.add_argument("--base", required=True, help="the Stable Diffusion folder (diffusers layout) of the adaptor")
    parser.add_argument("--out", required=True, help="output folder (written like 'fairdiff export')")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="name of imported soft tokens in prompts")
    parser.add_argument("--overwrite", action="store_true", help="replace an adaptor folder already in --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fairdiff import ...``; returns the exit code."""
    args = build_parser().parse_args(list(argv or []))
    written = authors.import_authors(
        args.kind, args.source, args.base, args.out, token=args.token, overwrite=args.overwrite
    )
    print(f"imported {', '.join(args.kind)} from {', '.join(args.source)} into {args.out}:")
    for path in written:
        print(f"  {path}")
    return 0
