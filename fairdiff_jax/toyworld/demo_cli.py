"""build or reuse the toy world, debias it, write a report (``fairdiff demo --workdir DIR``)

Arguments -> :func:`fairdiff_jax.toyworld.demo.run_demo`; every ``--config.*`` override goes to the debiasing run.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from fairdiff_jax.adaptors.spec import ADAPTOR_KINDS
from fairdiff_jax.config import split_overrides
from fairdiff_jax.logs import setup_logging
from fairdiff_jax.toyworld.demo import demo_config, run_demo

HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def spread_over_cpu_cores(images_per_prompt: Sequence[int], cores: int | None = None) -> int:
    """Split the host into as many JAX CPU devices as there are cores (at most), before JAX starts its CPU client.

    XLA:CPU runs the demo's small convolutions and matmuls on one core at a time, so one device leaves the
    other cores idle; the trainer and the evaluator shard images over every device (data parallel, same
    numbers up to float32 reduction order). The count is the largest ``d <= cores`` dividing every entry of
    ``images_per_prompt`` (each run's images must split evenly). Returns the count set, or 0 when nothing
    was changed (``XLA_FLAGS`` already sets one, or one core). Has no effect once JAX has made its CPU client.
    """
    if HOST_DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return 0
    cores = cores or len(os.sched_getaffinity(0))
    common = math.gcd(*[int(n) for n in images_per_prompt])
    count = max(d for d in range(1, max(cores, 1) + 1) if common % d == 0)
    if count < 2:
        return 0
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICE_FLAG}={count}".strip()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    pairs, rest = split_overrides(list(argv or []))
    parser = argparse.ArgumentParser(
        prog="fairdiff demo", description="Debias the embedded toy world and write a report."
    )
    parser.add_argument("--workdir", required=True, help="where the run and its report/ are written")
    parser.add_argument(
        "--adaptor",
        default="unet_lora",
        choices=ADAPTOR_KINDS,
        help="what to finetune (default unet_lora: on the toy world it reaches the target where the text-encoder "
        "LoRA stalls; text_lora is the paper's default)",
    )
    parser.add_argument(
        "--attributes",
        default="gender",
        help="attributes to debias, joined by '+': gender, race, age (e.g. gender+race); targets are uniform "
        "unless set with --config.attributes.NAME.target='(0.3, 0.7)'",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(rest)
    setup_logging()
    attributes = [a for a in args.attributes.split("+") if a]
    overrides = [f"--config.{k}={v}" for k, v in pairs]
    cfg = demo_config(args.adaptor, attributes, overrides)
    spread_over_cpu_cores([cfg.train.images_per_prompt, cfg.eval.images_per_prompt, cfg.eval.batch_size])
    metrics = run_demo(args.workdir, args.adaptor, overrides, attributes=attributes, progress=not args.no_progress)
    before, after = metrics["before"], metrics["after"]
    for name in metrics["targets"]:
        print(
            f"{name}: bias {before['bias'][name]:.3f} -> {after['bias'][name]:.3f} "
            f"(floor {after['bias_floor'][name]:.3f}); held-out {before['held_out']['bias'][name]:.3f} -> "
            f"{after['held_out']['bias'][name]:.3f}; distance to target {before['target_distance'][name]:.3f} -> "
            f"{after['target_distance'][name]:.3f}"
        )
    print(
        f"cue accuracy {before['cue_accuracy']:.3f} -> {after['cue_accuracy']:.3f}; report: "
        f"{os.path.join(args.workdir, 'report', 'report.md')}"
    )
    return 0
