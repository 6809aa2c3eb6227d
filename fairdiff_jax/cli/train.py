"""``fairdiff train --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value ...]``: arguments ->
:func:`fairdiff_jax.train.train` (which resumes from the newest readable checkpoint in DIR)."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Sequence

from fairdiff_jax.config import config_from_argv
from fairdiff_jax.logs import setup_logging
from fairdiff_jax.train import train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairdiff train", description="Train an adaptor (resumes from --workdir).")
    parser.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics, resolved config")
    parser.add_argument(
        "--resume-step",
        type=int,
        default=None,
        help="resume from exactly this checkpoint (e.g. the last good one after a divergence); later ones are deleted",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resume_command(argv: Sequence[str], lr: float):
    """``step -> "fairdiff train ..."``: this command line resuming from ``step`` with a tenth of the learning rate."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume-step" or arg == "--config.train.lr":
            skip = True
            continue
        if arg.startswith(("--resume-step=", "--config.train.lr=")):
            continue
        kept.append(arg)

    def command(step: int) -> str:
        return shlex.join(["fairdiff", "train", *kept, "--resume-step", str(step), f"--config.train.lr={lr / 10:g}"])

    return command


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    cfg, rest = config_from_argv(argv)
    args = build_parser().parse_args(rest)
    setup_logging()
    result = train(
        cfg,
        args.workdir,
        progress=not args.no_progress,
        resume_step=args.resume_step,
        resume_hint=resume_command(argv, float(cfg.train.lr)),
    )
    if not result.finished:
        name = signal.Signals(result.signal).name if result.signal else "a signal"
        print(
            f"fairdiff train: stopped at step {result.step} of {cfg.num_steps} on {name}; the checkpoint is written, "
            "run the same command to resume",
            file=sys.stderr,
        )
        return 128 + (result.signal or 15)
    return 0
