"""The ``fairdiff`` command: a thin dispatcher; every subcommand parses its arguments and calls one library
function. Plug-ins add subcommands through the ``fairdiff_jax.commands`` entry-point group (``name =
module:main``; the module's first docstring line is the help), as the embedded toy world adds ``demo``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fairdiff_jax.errors import FairdiffError

# subcommand -> (module, function, one-line help). The function takes the subcommand's argv.
BUILTIN_COMMANDS = {
    "train": ("fairdiff_jax.cli.train", "main", "train an adaptor from a config (resumes from the workdir)"),
    "evaluate": ("fairdiff_jax.cli.evaluate", "main", "generate test images and write metrics.json / table.md"),
    "export": ("fairdiff_jax.cli.export", "main", "export a trained adaptor in diffusers formats"),
    "import": ("fairdiff_jax.cli.import_adaptor", "main", "import the paper authors' released .pth adaptors"),
    "faces": ("fairdiff_jax.face_reference", "main", "face tools: build-reference embeds real faces for L_face"),
}
ENTRY_POINT_GROUP = "fairdiff_jax.commands"


def subcommands() -> dict[str, tuple[str, str, str]]:
    """Built-in subcommands plus those registered by installed plug-ins."""
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module, _, function = ep.value.partition(":")
        found[ep.name] = (module, function or "main", _first_doc_line(module))
    return {**found, **BUILTIN_COMMANDS}


def _first_doc_line(module: str) -> str:
    """The first line of a module's docstring, read from its source without importing it."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.splitlines()[0] if doc else ""


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
    commands = subcommands()
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(commands) + "}")
    for name, (_, _, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    commands = subcommands()
    if command not in commands:
        parser.print_usage(sys.stderr)
        print(f"fairdiff: unknown command '{command}'; choose one of {', '.join(commands)}.", file=sys.stderr)
        return 2
    module_name, function_name, _ = commands[command]
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
    except OSError as err:  # a folder that cannot be written, a full disk, a path that is a file: one line
        where = f" ({err.filename})" if err.filename else ""
        print(f"fairdiff {command}: error: {err.strerror or err}{where}; check the path and its space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fairdiff {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
