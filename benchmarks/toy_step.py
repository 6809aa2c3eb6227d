"""The toy demo's training step with its chain rolled + rematerialised or unrolled, timed in turn in one process.

Builds the demo's run (the shipped toy world, ``configs/toy.py``, U-Net LoRA by default) once, compiles the
single-device train step for each chain setting and times them alternately, one repeat of each per round.
Prints compile time, compiled temporary memory and the median step time of each.

    python benchmarks/toy_step.py [--adaptor unet_lora] [--repeats 7] [--threads 1] [--attention matmul xla]
        [--chains "unrolled, no remat"]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

CHAINS = {
    "unrolled, no remat": ("--config.sampler.unroll=8", "--config.sampler.remat_policy=none"),
    "rolled, remat per step": ("--config.sampler.unroll=1", "--config.sampler.remat_policy=full"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adaptor", default="unet_lora", help="the demo config's ARG (unet_lora, text_lora, ...)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="1: single-threaded XLA (steadier when shared)")
    parser.add_argument(
        "--attention", nargs="+", default=["auto"], help="attention implementations to time with each chain"
    )
    parser.add_argument("--chains", nargs="+", default=list(CHAINS), choices=list(CHAINS), help="chains to time")
    args = parser.parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    import jax

    from fairdiff_jax.config import load_config
    from fairdiff_jax.models.attention import attention_implementation
    from fairdiff_jax.optim import make_optimizer
    from fairdiff_jax.reporting import memory_stats
    from fairdiff_jax.run import build_run
    from fairdiff_jax.train import make_batch
    from fairdiff_jax.train_step import init_state, make_train_step, step_model

    config_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy.py")
    configs = {
        (chain, attention): load_config(f"{config_file}:{args.adaptor}", list(CHAINS[chain]))
        for chain in args.chains
        for attention in args.attention
    }
    first = next(iter(configs.values()))
    run = build_run(first)
    batch = make_batch(run, first, run.train_prompts[: int(first.train.prompts_per_step)], step=1)
    compiled, states = {}, {}
    for (chain, attention), cfg in configs.items():
        name = f"{chain}, attention '{attention}'"
        optimizer = make_optimizer(cfg)
        state = init_state(run.spec, run.frozen, optimizer, jax.random.PRNGKey(1))
        step = jax.jit(make_train_step(step_model(run, cfg), optimizer, axis_name=None))
        start = time.perf_counter()
        with attention_implementation(attention):
            compiled[name] = step.lower(state, run.frozen, batch).compile()
        temp = memory_stats(compiled[name]).get("temp_mib", float("nan"))
        print(f"{name}: compile {time.perf_counter() - start:.1f} s, temp {temp:.0f} MiB", flush=True)
        jax.block_until_ready(compiled[name](state, run.frozen, batch))  # warm-up
        states[name] = state
    times = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(states[name], run.frozen, batch))
            times[name].append(time.perf_counter() - start)
    images = int(first.train.images_per_prompt) * int(first.train.prompts_per_step)
    print(f"toy demo step ({args.adaptor}, {images} images, up to {first.sampler.train_steps[1]} steps), "
          f"jax {jax.devices()[0].platform} x1")  # fmt: skip
    for name, values in times.items():
        print(f"{name}: {1e3 * statistics.median(values):.0f} ms (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
