"""Experiment configs: the schema, ``configs/NAME.py[:ARG]`` loading, strict ``--config.*`` overrides, checks.

Config files follow big_vision: a Python file with ``get_config(arg=None) -> ConfigDict``; ``arg`` is only
for switches that change several fields (``configs/gender.py:unet_lora``). Files build on
``base_config()`` and ``attribute()`` below so every experiment has the same keys.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Sequence

from ml_collections import ConfigDict

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.prompts import resolve_prompt_source

TOY_MODEL_PATH = "toy"  # placeholder the toy world replaces with the folder of its built model
TOY_PROMPTS = "toy"  # placeholder the toy world replaces with its prompt list
ADAPTOR_KINDS = ("text_lora", "unet_lora", "both", "soft_tokens")
DTYPES = ("float32", "bfloat16")
GRADIENT_MODES = ("adjusted", "exact", "detached")
SOLVERS = ("dpmpp_2m",)
REMAT_POLICIES = ("full", "none", "dots_saveable", "nothing_saveable")
PARALLEL_MODES = ("shard_map", "pmap")
FACE_DETECTORS = ("none", "haar", "yunet")
LR_SCHEDULES = ("constant", "cosine")

# Class names in class order (PAPER.md encodings).
CLASSES = {
    "gender": ("female", "male"),
    "race": ("WMELH", "Black", "Indian", "Asian"),
    "age": ("young", "old"),
}


def attribute(
    name: str,
    target: Sequence[float] | None = None,
    *,
    factor1: float = 0.2,
    factor2: float = 0.2,
    classifier: str = "",
    eval_classifier: str = "",
    facial: bool = True,
    classes: Sequence[str] | None = None,
) -> ConfigDict:
    """One ``attributes.<name>`` entry; ``target`` defaults to uniform over the classes."""
    classes = tuple(classes if classes is not None else CLASSES[name])
    target = tuple(float(t) for t in target) if target is not None else tuple(1.0 / len(classes) for _ in classes)
    return ConfigDict(
        {
            "classes": classes,
            "target": target,
            "factor1": float(factor1),
            "factor2": float(factor2),
            "classifier": classifier,
            "eval_classifier": eval_classifier,
            "facial": bool(facial),
        }
    )


def adaptor_from_arg(arg: str | None, config_name: str) -> str:
    """The adaptor kind chosen by a config's ``:ARG`` (default ``text_lora``)."""
    kind = arg or "text_lora"
    if kind not in ADAPTOR_KINDS:
        raise FairdiffError(
            f"configs/{config_name}:{kind} names an unknown adaptor; choose one of {', '.join(ADAPTOR_KINDS)}"
        )
    return kind


def base_config() -> ConfigDict:
    """Every key a config may set, with the paper's common settings (PAPER.md, "Common") as defaults."""
    c = ConfigDict()
    # path: a diffusers-format SD folder; variant: diffusers weight-file variant ("" or e.g. "fp16").
    c.model = ConfigDict({"path": "models/stable-diffusion-v1-5", "dtype": "bfloat16", "variant": ""})
    c.adaptor = ConfigDict({"kind": "text_lora", "rank": 50, "alpha": 50.0, "num_tokens": 5, "ema_decay": 0.996})
    c.sampler = ConfigDict(
        {
            "solver": "dpmpp_2m",
            "guidance_scale": 7.5,
            "train_steps": (19, 23),  # inclusive range; one count is drawn per iteration
            "eval_steps": 25,
            "gradient_mode": "adjusted",
            "remat_policy": "full",
            "unroll": 1,  # sampling steps per lax.scan iteration; >= the step count unrolls fully (faster, more memory)
        }
    )
    c.attributes = ConfigDict()
    c.loss = ConfigDict(
        {
            "lambda_img": 8.0,
            "lambda_face": 1.0,
            "confidence": 0.8,
            "face_keep_confidence": 0.9,
            "num_ot_samples": 100,
            "clip_path": "",
            "dino_path": "",
            "face_embedder_path": "",
            "face_reference_path": "",
        }
    )
    c.data = ConfigDict({"prompts": ("occupations",), "template": ""})  # prompt sources, see prompts.py
    c.train = ConfigDict(
        {
            "images_per_prompt": 24,
            "prompts_per_step": 1,
            "lr": 5e-5,
            "weight_decay": 1e-2,
            "betas": (0.9, 0.999),
            "microbatch": 0,  # images per gradient micro-batch; 0 = all at once
            # "constant" (the paper) or "cosine": decay from lr to lr * final_lr_fraction over num_steps
            "lr_schedule": "constant",
            "final_lr_fraction": 0.1,
        }
    )
    # clip_path / dino_path: evaluation encoders for CLIP-T / CLIP-I / DINO (separate from loss.*; "" = not computed)
    c.eval = ConfigDict({"images_per_prompt": 60, "seed": 2022, "batch_size": 32, "clip_path": "", "dino_path": ""})
    c.num_steps = 10_000
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.log_every = 10
    c.sample_every = 200
    c.seed = 0
    c.parallel = ConfigDict({"mode": "shard_map", "distributed": False})
    # Largest-face detection for facial attributes (fairdiff_jax/attributes/detectors.py): "none" = the whole image
    # is the face; "haar" = OpenCV's bundled cascade; "yunet" = OpenCV YuNet from the ONNX file model_path.
    c.faces = ConfigDict(
        {"detector": "none", "model_path": "", "min_face_size": 32, "score_threshold": 0.6, "min_neighbors": 5}
    )
    return c


def attribute_names(cfg: ConfigDict) -> list[str]:
    """Attribute names in the canonical order every module uses (sorted; ConfigDict's own order)."""
    return sorted(cfg.attributes.keys())


# ----------------------------------------------------------------------------------------------- loading


REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _import_config_file(path: str):
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO_CONFIGS, os.path.basename(path))):
        path = os.path.join(REPO_CONFIGS, os.path.basename(path))  # configs/NAME.py from outside the checkout
    if not os.path.isfile(path):
        raise FairdiffError(f"config file '{path}' not found; pass --config configs/NAME.py[:ARG] (see configs/)")
    spec = importlib.util.spec_from_file_location(f"fairdiff_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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


# -------------------------------------------------------------------------------------------- validation


def _choice(cfg: ConfigDict, key: str, allowed: Sequence[str]) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if value not in allowed:
        raise FairdiffError(f"config {key}='{value}' is not allowed; choose one of {', '.join(allowed)}")


def _check_path(key: str, path: str, what: str) -> None:
    if path and not os.path.exists(os.path.expanduser(path)):
        raise FairdiffError(f"config {key}: {what} '{path}' does not exist; set --config.{key}=/path/to/it")


def validate_target(name: str, target: Sequence[float], classes: Sequence[str]) -> None:
    """One attribute's target distribution: non-negative, sums to 1 (+-1e-6), one entry per class."""
    target = tuple(target)
    where = f"attributes.{name}.target={target}"
    if len(target) != len(classes):
        raise FairdiffError(
            f"{where} has {len(target)} entries but {name} has {len(classes)} classes {tuple(classes)}; "
            f"give one probability per class"
        )
    if any(not math.isfinite(t) or t < 0 for t in target):
        raise FairdiffError(f"{where} has a negative or non-finite entry; probabilities must be >= 0")
    if abs(sum(target) - 1.0) > 1e-6:
        raise FairdiffError(f"{where} sums to {sum(target):.6g}, not 1; give class probabilities that sum to 1")


def validate_config(cfg: ConfigDict) -> None:
    """Raise ``FairdiffError`` with one line for the first bad value; the toy placeholders are allowed."""
    _choice(cfg, "adaptor.kind", ADAPTOR_KINDS)
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "sampler.solver", SOLVERS)
    _choice(cfg, "sampler.gradient_mode", GRADIENT_MODES)
    _choice(cfg, "sampler.remat_policy", REMAT_POLICIES)
    _choice(cfg, "parallel.mode", PARALLEL_MODES)
    _choice(cfg, "train.lr_schedule", LR_SCHEDULES)
    if "faces" in cfg:  # configs resolved before the faces group existed mean faces.detector="none"
        _choice(cfg, "faces.detector", FACE_DETECTORS)
        faces = cfg.faces
        if faces.detector == "yunet" and not faces.model_path:
            raise FairdiffError("faces.detector=yunet needs --config.faces.model_path=/path/to/face_yunet.onnx")
        _check_path("faces.model_path", faces.model_path, "face detector model")
        if faces.min_face_size < 1 or faces.min_neighbors < 0 or not 0.0 <= faces.score_threshold <= 1.0:
            raise FairdiffError(
                f"faces.min_face_size={faces.min_face_size} must be >= 1, faces.min_neighbors={faces.min_neighbors} "
                f">= 0 and faces.score_threshold={faces.score_threshold} in [0, 1]"
            )
    if not 0.0 <= cfg.train.final_lr_fraction <= 1.0:
        raise FairdiffError(f"train.final_lr_fraction={cfg.train.final_lr_fraction} must lie in [0, 1]")
    if int(cfg.sampler.unroll) < 1:
        raise FairdiffError(f"sampler.unroll={cfg.sampler.unroll} must be >= 1 (1 = rolled loop; >= steps = unrolled)")
    if not cfg.attributes:
        raise FairdiffError("config has no attributes; add attributes.<name> with classes and target")
    for name, spec in cfg.attributes.items():
        if len(spec.classes) < 2:
            raise FairdiffError(f"attributes.{name}.classes={tuple(spec.classes)} needs at least 2 classes")
        validate_target(name, spec.target, spec.classes)
        for factor in ("factor1", "factor2"):
            if not 0.0 <= spec[factor] <= 1.0:
                raise FairdiffError(f"attributes.{name}.{factor}={spec[factor]} must lie in [0, 1]")
        _check_path(f"attributes.{name}.classifier", spec.classifier, "classifier")
        _check_path(f"attributes.{name}.eval_classifier", spec.eval_classifier, "classifier")
    lo_hi = tuple(cfg.sampler.train_steps)
    if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
        raise FairdiffError(f"sampler.train_steps={lo_hi} must be (min, max) with 1 <= min <= max, e.g. (19, 23)")
    for group, key in (("loss", "confidence"), ("loss", "face_keep_confidence"), ("adaptor", "ema_decay")):
        if not 0.0 <= cfg[group][key] <= 1.0:
            raise FairdiffError(f"config {group}.{key}={cfg[group][key]} must lie in [0, 1]")
    positive = ("num_steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every")
    for key in positive:
        if int(cfg[key]) < 1:
            raise FairdiffError(f"config {key}={cfg[key]} must be a positive integer")
    for key in ("images_per_prompt", "prompts_per_step"):
        if int(cfg.train[key]) < 1:
            raise FairdiffError(f"config train.{key}={cfg.train[key]} must be a positive integer")
    if cfg.train.microbatch < 0 or (cfg.train.microbatch and cfg.train.images_per_prompt % cfg.train.microbatch):
        raise FairdiffError(
            f"train.microbatch={cfg.train.microbatch} must be 0 (all images at once) or divide "
            f"train.images_per_prompt={cfg.train.images_per_prompt}"
        )
    if cfg.adaptor.kind != "soft_tokens" and cfg.adaptor.rank < 1:
        raise FairdiffError(f"adaptor.rank={cfg.adaptor.rank} must be >= 1 for LoRA adaptors")
    if cfg.model.path != TOY_MODEL_PATH:
        if not os.path.isdir(os.path.expanduser(cfg.model.path)):
            raise FairdiffError(
                f"model folder '{cfg.model.path}' not found; set --config.model.path=/path/to/stable-diffusion-v1-5 "
                "(a diffusers-format folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
    for key in ("clip_path", "dino_path", "face_embedder_path", "face_reference_path"):
        _check_path(f"loss.{key}", cfg.loss[key], "file or folder")
    for source in [cfg.data.prompts] if isinstance(cfg.data.prompts, str) else cfg.data.prompts:
        if source != TOY_PROMPTS:
            resolve_prompt_source(source)


# ------------------------------------------------------------------------------------------------ output


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
