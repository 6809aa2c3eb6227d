"""``fairdiff train --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value ...]``: arguments ->
:func:`fairdiff_jax.train.train` (which resumes from the newest readable checkpoint in DIR)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fairdiff_jax.config import config_from_argv
from fairdiff_jax.logs import setup_logging
from fairdiff_jax.train import train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairdiff train", description="Train an adaptor (resumes from --workdir).")
    parser.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics, resolved config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    cfg, rest = config_from_argv(list(argv or []))
    args = build_parser().parse_args(rest)
    setup_logging()
    train(cfg, args.workdir, progress=not args.no_progress)
    return 0
