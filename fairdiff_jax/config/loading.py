"""Loading configs: ``configs/NAME.py[:ARG]`` files, strict ``--config.KEY=VALUE`` overrides, the resolved config.

Overrides follow ml_collections' ``config_flags``: the value is parsed by the type of the key's current value, and
an unknown key is an error naming the nearest valid ones. The resolved config is written into the workdir as
``config.json`` and ``config.py`` (loadable again with ``--config``).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Sequence

from ml_collections import ConfigDict

from fairdiff_jax.config.validate import validate_config
from fairdiff_jax.errors import FairdiffError

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _import_config_file(path: str):
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO_CONFIGS, os.path.basename(path))):
        path = os.path.join(REPO_CONFIGS, os.path.basename(path))  # configs/NAME.py from outside the checkout
    if not os.path.isfile(path):
        raise FairdiffError(f"config file '{path}' not found; pass --config configs/NAME.py[:ARG] (see configs/)")
    spec = importlib.util.spec_from_file_location(f"fairdiff_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FairdiffError:
        raise
    except Exception as err:  # a syntax error or a failing import in the user's file: one line, not a traceback
        where = f" (line {err.lineno})" if isinstance(err, SyntaxError) and err.lineno else ""
        raise FairdiffError(
            f"config file '{path}' could not be loaded{where}: {type(err).__name__}: {str(err).splitlines()[0]}; "
            "fix the file"
        ) from None
    if not hasattr(module, "get_config"):
        raise FairdiffError(f"config file '{path}' has no get_config(arg) function; define one returning a ConfigDict")
    return module


def leaf_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf value, e.g. ``['adaptor.kind', ..., 'attributes.gender.target', ...]``."""
    keys = []
    for name, value in cfg.items():
        dotted = f"{prefix}{name}"
        keys.extend(leaf_keys(value, dotted + ".") if isinstance(value, ConfigDict) else [dotted])
    return keys


def _unknown_key_error(key: str, cfg: ConfigDict) -> FairdiffError:
    valid = leaf_keys(cfg)
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}?" if near else f"valid keys include {', '.join(valid[:8])}, ..."
    return FairdiffError(f"unknown config key '{key}'; {hint} (config keys are fixed by the config file)")


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise FairdiffError(f"--config.{key}={text}: expected a bool (true or false)")


def parse_value(key: str, text: str, current):
    """Parse a command-line string for ``key`` using the type of its current value (like config_flags)."""
    if isinstance(current, bool):
        return _parse_bool(key, text)
    if isinstance(current, str):
        try:
            value = ast.literal_eval(text)
            return value if isinstance(value, str) else text
        except (ValueError, SyntaxError):
            return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        if isinstance(current, (tuple, list)):  # a bare string for a tuple field, e.g. prompts=my.json
            return type(current)((text,))
        raise FairdiffError(
            f"--config.{key}={text}: cannot parse the value; expected {type(current).__name__} like {current!r}"
        ) from None
    if isinstance(current, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FairdiffError(f"--config.{key}={text}: expected an integer like {current!r}")
    elif isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FairdiffError(f"--config.{key}={text}: expected a number like {current!r}")
        value = float(value)
    elif isinstance(current, (tuple, list)):
        if isinstance(value, (int, float, str)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise FairdiffError(f"--config.{key}={text}: expected a tuple like {current!r}")
        value = type(current)(value)
    return value


def apply_override(cfg: ConfigDict, key: str, text: str) -> None:
    """Set the existing leaf ``key`` (dotted) of ``cfg`` from its command-line string ``text``."""
    node = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            raise _unknown_key_error(key, cfg)
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ConfigDict):
        example = f"--config.{key}.{leaf_keys(current)[0]}=..."
        raise FairdiffError(f"--config.{key} is a group, not a value; set one of its keys, e.g. {example}")
    with node.unlocked():
        node[parts[-1]] = parse_value(key, text, current)


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pull ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` pairs out of ``argv``; returns (pairs, rest)."""
    pairs, rest, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise FairdiffError(f"{arg} has no value; write --config.{body}=VALUE")
            pairs.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return pairs, rest


def load_config(path: str, overrides: Sequence[str] = (), *, validate: bool = True) -> ConfigDict:
    """Load ``configs/NAME.py[:ARG]``, apply ``--config.key=value`` overrides, validate and lock it.

    ``overrides`` are command-line strings (``["--config.train.lr=1e-4", "--config.seed", "3"]``); unknown
    keys raise ``FairdiffError`` naming the key and the nearest valid ones.
    """
    file_path, _, arg = path.partition(":")
    module = _import_config_file(file_path)
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, ConfigDict):
        raise FairdiffError(f"get_config in '{file_path}' returned {type(cfg).__name__}; it must return a ConfigDict")
    pairs, rest = split_overrides(overrides)
    if rest:
        raise FairdiffError(f"unexpected arguments {' '.join(rest)}; overrides look like --config.train.lr=1e-4")
    for key, value in pairs:
        apply_override(cfg, key, value)
    if validate:
        validate_config(cfg)
    cfg.lock()
    return cfg


def config_from_argv(argv: Sequence[str], *, validate: bool = True) -> tuple[ConfigDict, list[str]]:
    """For CLIs: take ``--config PATH[:ARG]`` and every ``--config.*`` override out of ``argv``."""
    pairs, rest = split_overrides(argv)
    path, remaining, i = None, [], 0
    while i < len(rest):
        if rest[i] == "--config" and i + 1 < len(rest):
            path, i = rest[i + 1], i + 2
            continue
        if rest[i].startswith("--config="):
            path = rest[i].split("=", 1)[1]
        else:
            remaining.append(rest[i])
        i += 1
    if path is None:
        raise FairdiffError("no config given; pass --config configs/NAME.py[:ARG] (e.g. configs/gender.py)")
    cfg = load_config(path, [f"--config.{k}={v}" for k, v in pairs], validate=validate)
    return cfg, remaining


def plain_config(value):
    """A ConfigDict as plain dicts, tuples and values (what ``config.json`` holds)."""
    return _plain(value)


def _plain(value):
    if isinstance(value, ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def write_resolved_config(cfg: ConfigDict, workdir: str) -> tuple[str, str]:
    """Write ``workdir/config.json`` and ``workdir/config.py`` (loadable by ``load_config``); returns both paths.

    Call it from process 0 only.
    """
    os.makedirs(workdir, exist_ok=True)
    plain = _plain(cfg)
    json_path = os.path.join(workdir, "config.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(plain, f, indent=2, sort_keys=True)
        f.write("\n")
    py_path = os.path.join(workdir, "config.py")
    with open(py_path, "w", encoding="utf-8") as f:
        f.write('"""The resolved config of this run (written by fairdiff; load with --config THIS_FILE)."""\n\n')
        f.write("import ml_collections\n\n\ndef get_config(arg=None):\n")
        f.write(f"    return ml_collections.ConfigDict({plain!r})\n")
    return json_path, py_path
