"""The ``fairdiff`` command: a thin dispatcher; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fairdiff_jax.errors import FairdiffError

# subcommand -> (module, function, one-line help). The function takes (args, extra_argv).
SUBCOMMANDS = {
    "demo": ("fairdiff_jax.toyworld.demo", "main", "build or reuse the toy world, debias it, write a report"),
    "train": ("fairdiff_jax.train", "main", "train an adaptor from a config (resumes from the workdir)"),
    "evaluate": ("fairdiff_jax.evaluate", "main", "generate test images and write metrics.json / table.md"),
    "export": ("fairdiff_jax.adaptors.export", "main", "export a trained adaptor in diffusers formats"),
}


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache (``$FAIRDIFF_JAX_CACHE`` or ``~/.cache/fairdiff_jax/xla_cache``)
    unless the caller already chose a folder: a second run skips most of the compile time."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    default = os.path.join(os.path.expanduser("~"), ".cache", "fairdiff_jax", "xla_cache")
    jax.config.update("jax_compilation_cache_dir", os.environ.get("FAIRDIFF_JAX_CACHE", default))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairdiff",
        description="Finetune text-to-image diffusion models for fairness (Shen et al., ICLR 2024), in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.print_usage(sys.stderr)
        print(f"fairdiff: unknown command '{command}'; choose one of {', '.join(SUBCOMMANDS)}.", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[command]
    enable_compilation_cache()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(
                f"fairdiff {command}: not available yet in this version (module {module_name} is not built).",
                file=sys.stderr,
            )
            return 2
        raise
    try:
        return int(getattr(module, function_name)(rest) or 0)
    except FairdiffError as err:
        print(f"fairdiff {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
