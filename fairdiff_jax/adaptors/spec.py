"""What an adaptor is: its spec (``adaptor.json``: kind, LoRA targets/rank/alpha, OFT targets and settings, soft
tokens) and a fingerprint of
the base model it was trained on, checked whenever it is applied to weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from fairdiff_jax.adaptors import lora as lora_lib
from fairdiff_jax.adaptors import oft as oft_lib
from fairdiff_jax.adaptors import soft_tokens as soft_lib
from fairdiff_jax.adaptors.ema import PAPER_EMA_DECAY
from fairdiff_jax.errors import FairdiffError

METADATA_FILE = "adaptor.json"
_FORMAT = "fairdiff-adaptor/1"
_COMPONENTS = ("unet", "text_encoder")
# The adaptor kinds a config may name (adaptor.kind) and the LoRA components each adapts.
ADAPTOR_KINDS = ("text_lora", "unet_lora", "both", "soft_tokens", "unet_oft")
_LORA_COMPONENTS = {"text_lora": ("text_encoder",), "unet_lora": ("unet",), "both": ("text_encoder", "unet")}
_OFT_COMPONENTS = {"unet_oft": ("unet",)}
LORA_KINDS, OFT_KINDS = tuple(_LORA_COMPONENTS), tuple(_OFT_COMPONENTS)


@dataclasses.dataclass
class AdaptorSpec:
    """What an adaptor is (static, JSON-serialisable): LoRA targets/rank/alpha, soft tokens, base model."""

    base_model: str = ""
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 0.0
    lora_targets: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # component -> regexes
    num_soft_tokens: int = 0  # 0: no soft tokens
    soft_token: str = soft_lib.DEFAULT_TOKEN
    oft_targets: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # component -> regexes; {}: no OFT
    oft: dict = dataclasses.field(default_factory=dict)  # oft.OFTSettings fields
    ema_decay: float = PAPER_EMA_DECAY
    fingerprint: dict = dataclasses.field(default_factory=dict)

    @property
    def lora_scale(self) -> float:
        return lora_lib.lora_scale(self.lora_rank, self.lora_alpha)

    @property
    def oft_settings(self) -> oft_lib.OFTSettings:
        return oft_lib.OFTSettings(**self.oft)

    def to_json(self) -> dict:
        return {"format": _FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping, source: str = "adaptor.json") -> AdaptorSpec:
        if data.get("format") != _FORMAT:
            raise FairdiffError(f"{source} is not a fairdiff adaptor description (format {data.get('format')!r}).")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _weights_of(spec: AdaptorSpec, unet_params: Mapping | None, text_encoder_params: Mapping | None) -> dict:
    """``{"component/module path": frozen array}`` of every base weight the adaptor touches."""
    trees = {"unet": unet_params, "text_encoder": text_encoder_params}
    weights = {}
    for component, patterns in (spec.lora_targets if spec.lora_rank else {}).items():
        if trees.get(component) is None:
            raise FairdiffError(f"the adaptor adapts the {component} but no {component} parameters were given.")
        flat = flatten_dict(dict(trees[component]))
        for module in lora_lib.find_lora_targets(trees[component], patterns):
            weights[component + "/" + "/".join(module)] = flat[module + ("kernel",)]
    for component, patterns in spec.oft_targets.items():
        if trees.get(component) is None:
            raise FairdiffError(f"the adaptor adapts the {component} but no {component} parameters were given.")
        flat = flatten_dict(dict(trees[component]))
        for module in oft_lib.find_oft_targets(trees[component], patterns):
            weights[component + "/" + "/".join(module)] = flat[module + ("kernel",)]
    if spec.num_soft_tokens:
        if text_encoder_params is None:
            raise FairdiffError("the adaptor has soft tokens but no text_encoder parameters were given.")
        weights["text_encoder/" + "/".join(soft_lib.TOKEN_EMBEDDING_PATH)] = soft_lib.token_embedding(
            text_encoder_params
        )
    return dict(sorted(weights.items()))


def _shapes_digest(weights: Mapping[str, Any]) -> str:
    text = ";".join(f"{name}:{tuple(np.shape(w))}" for name, w in weights.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_fingerprint(
    spec: AdaptorSpec, unet_params: Mapping | None, text_encoder_params: Mapping | None, *, num_samples: int = 32
) -> dict:
    """Shapes digest of the base weights the adaptor touches and ``num_samples`` of their values."""
    weights = _weights_of(spec, unet_params, text_encoder_params)
    names = list(weights)
    chosen = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, min(num_samples, len(names))).astype(int))]
    samples = []
    for name in chosen:
        shape = np.shape(weights[name])
        seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        index = tuple(seed % d for d in shape)
        samples.append(float(np.asarray(jax.device_get(weights[name][index]), dtype=np.float64)))
    return {"shapes_sha256": _shapes_digest(weights), "num_weights": len(names), "samples": samples}


def make_adaptor_spec(
    unet_params: Mapping | None,
    text_encoder_params: Mapping | None,
    *,
    base_model: str,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | Mapping[str, Sequence[str]] = (),
    num_soft_tokens: int = 0,
    soft_token: str = soft_lib.DEFAULT_TOKEN,
    ema_decay: float = PAPER_EMA_DECAY,
    oft_targets: Sequence[str] | Mapping[str, Sequence[str]] = (),
    oft: Mapping | None = None,
) -> AdaptorSpec:
    """An :class:`AdaptorSpec` fingerprinted against the given base weights.

    ``lora_targets`` / ``oft_targets``: component names (``["text_encoder"]``, ``["unet"]``, both) for the
    paper's default target sets, or ``{component: [regex, ...]}``. ``lora_alpha`` defaults to ``lora_rank``
    (scale 1). ``oft``: :class:`fairdiff_jax.adaptors.oft.OFTSettings` fields (PEFT's defaults when omitted).
    """
    oft_settings = dataclasses.asdict(oft_lib.OFTSettings(**dict(oft or {})))  # validated here
    if isinstance(oft_targets, Mapping):
        oft_targets = {c: list(p) for c, p in oft_targets.items()}
    else:
        oft_targets = {c: list(lora_lib.DEFAULT_TARGETS.get(c, ())) for c in oft_targets}
    if isinstance(lora_targets, Mapping):
        targets = {c: list(p) for c, p in lora_targets.items()}
    else:
        targets = {c: list(lora_lib.DEFAULT_TARGETS.get(c, ())) for c in lora_targets}
    unknown = sorted((set(targets) | set(oft_targets)) - set(_COMPONENTS))
    if unknown:
        raise FairdiffError(f"unknown LoRA/OFT component(s) {unknown}; choose from {list(_COMPONENTS)}.")
    if bool(lora_rank) != bool(targets):
        raise FairdiffError("give both a LoRA rank >= 1 and at least one LoRA component, or neither.")
    if not lora_rank and not num_soft_tokens and not oft_targets:
        raise FairdiffError(
            "the adaptor has no LoRA, OFT or soft tokens; set a LoRA rank, OFT targets or a number of soft tokens."
        )
    alpha = float(lora_rank if lora_alpha is None else lora_alpha)
    spec = AdaptorSpec(
        base_model=str(base_model),
        lora_rank=int(lora_rank),
        lora_alpha=alpha,
        lora_targets=targets,
        num_soft_tokens=int(num_soft_tokens),
        soft_token=str(soft_token),
        ema_decay=float(ema_decay),
        oft_targets=oft_targets,
        oft=oft_settings if oft_targets else {},
    )
    if lora_rank:
        lora_lib.lora_scale(spec.lora_rank, spec.lora_alpha)
    spec.fingerprint = base_fingerprint(spec, unet_params, text_encoder_params)
    return spec


def spec_for_kind(
    kind: str,
    unet_params: Mapping | None,
    text_encoder_params: Mapping | None,
    *,
    base_model: str,
    rank: int,
    alpha: float,
    num_tokens: int,
    ema_decay: float,
    oft: Mapping | None = None,
) -> AdaptorSpec:
    """The spec of one of :data:`ADAPTOR_KINDS` with the paper's target sets (``lora.DEFAULT_TARGETS``; OFT rotates
    the same U-Net attention projections as the U-Net LoRA). ``oft``: the OFT settings of an OFT kind."""
    if kind not in ADAPTOR_KINDS:
        raise FairdiffError(f"unknown adaptor kind '{kind}'; choose one of {', '.join(ADAPTOR_KINDS)}")
    components = _LORA_COMPONENTS.get(kind, ())
    targets = {c: list(lora_lib.DEFAULT_TARGETS[c]) for c in components}
    return make_adaptor_spec(
        base_model=base_model,
        unet_params=unet_params,
        text_encoder_params=text_encoder_params,
        lora_rank=int(rank) if targets else 0,
        lora_alpha=float(alpha) if targets else 0.0,
        lora_targets=targets,
        num_soft_tokens=int(num_tokens) if kind == "soft_tokens" else 0,
        ema_decay=float(ema_decay),
        oft_targets=list(_OFT_COMPONENTS.get(kind, ())),
        oft=oft if kind in _OFT_COMPONENTS else None,
    )


def _mismatch(spec: AdaptorSpec, what: str) -> FairdiffError:
    return FairdiffError(
        f"this adaptor was trained on base model '{spec.base_model}' but the given base model differs ({what}); "
        "load the same base model (same weights, any dtype) the adaptor was trained on."
    )


def check_base_model(spec: AdaptorSpec, unet_params: Mapping | None, text_encoder_params: Mapping | None) -> None:
    """Raise FairdiffError unless the base weights match the spec's fingerprint (values to ~1%, so bf16 is fine)."""
    if not spec.fingerprint:
        return
    got = base_fingerprint(spec, unet_params, text_encoder_params)
    if got["shapes_sha256"] != spec.fingerprint["shapes_sha256"]:
        raise _mismatch(spec, "different layer shapes")
    want, have = np.asarray(spec.fingerprint["samples"]), np.asarray(got["samples"])
    tol = 1e-2 * np.abs(want) + 1e-3 * max(1e-6, float(np.max(np.abs(want), initial=0.0)))
    if want.shape != have.shape or np.any(np.abs(want - have) > tol):
        raise _mismatch(spec, "different weight values")


def write_adaptor_metadata(directory: str, spec: AdaptorSpec) -> str:
    """Write ``directory/adaptor.json`` (atomically) and return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, METADATA_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec.to_json(), f, indent=2)
    os.replace(tmp, path)
    return path


def read_adaptor_metadata(directory: str) -> AdaptorSpec:
    """The :class:`AdaptorSpec` of ``directory/adaptor.json``."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise FairdiffError(
            f"{path} does not exist; pass a workdir written by 'fairdiff train' (or an exported adaptor folder)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return AdaptorSpec.from_json(json.load(f), source=path)
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise FairdiffError(f"cannot read adaptor description {path}: {err}; re-run training or re-export.") from err
