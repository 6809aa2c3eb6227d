"""The adaptor as a unit: its spec (``adaptor.json``), a fingerprint of its base model, and orbax storage.

An adaptor's trainable parameters are one pytree ``{"lora": {"unet": ..., "text_encoder": ...},
"soft_tokens": [n, d]}`` (only the parts the spec uses). Workdir contract with the train loop:

    DIR/adaptor.json                      write_adaptor_metadata(DIR, spec)
    DIR/checkpoints/<step>/adaptor        CheckpointManager item ``adaptor`` saved with
                                          args.StandardSave(adaptor_checkpoint_item(state)) = {"params", "ema"}

Other items in the same checkpoint (optimizer state, ...) are ignored when the adaptor is restored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from fairdiff_jax.adaptors import lora as lora_lib
from fairdiff_jax.adaptors import soft_tokens as soft_lib
from fairdiff_jax.adaptors.ema import PAPER_EMA_DECAY, AdaptorState
from fairdiff_jax.errors import FairdiffError

METADATA_FILE = "adaptor.json"
CHECKPOINT_DIR = "checkpoints"
ITEM = "adaptor"
FLAX_ADAPTOR_DIR = "flax_adaptor"
_FORMAT = "fairdiff-adaptor/1"
_COMPONENTS = ("unet", "text_encoder")


@dataclasses.dataclass
class AdaptorSpec:
    """What an adaptor is (static, JSON-serialisable): LoRA targets/rank/alpha, soft tokens, base model."""

    base_model: str = ""
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 0.0
    lora_targets: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # component -> regexes
    num_soft_tokens: int = 0  # 0: no soft tokens
    soft_token: str = soft_lib.DEFAULT_TOKEN
    ema_decay: float = PAPER_EMA_DECAY
    fingerprint: dict = dataclasses.field(default_factory=dict)

    @property
    def lora_scale(self) -> float:
        return lora_lib.lora_scale(self.lora_rank, self.lora_alpha)

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
) -> AdaptorSpec:
    """An :class:`AdaptorSpec` fingerprinted against the given base weights.

    ``lora_targets``: component names (``["text_encoder"]``, ``["unet"]``, both) for the paper's default
    target sets, or ``{component: [regex, ...]}``. ``lora_alpha`` defaults to ``lora_rank`` (scale 1).
    """
    if isinstance(lora_targets, Mapping):
        targets = {c: list(p) for c, p in lora_targets.items()}
    else:
        targets = {c: list(lora_lib.DEFAULT_TARGETS.get(c, ())) for c in lora_targets}
    unknown = sorted(set(targets) - set(_COMPONENTS))
    if unknown:
        raise FairdiffError(f"unknown LoRA component(s) {unknown}; choose from {list(_COMPONENTS)}.")
    if bool(lora_rank) != bool(targets):
        raise FairdiffError("give both a LoRA rank >= 1 and at least one LoRA component, or neither.")
    if not lora_rank and not num_soft_tokens:
        raise FairdiffError("the adaptor has neither LoRA nor soft tokens; set a LoRA rank or a number of soft tokens.")
    alpha = float(lora_rank if lora_alpha is None else lora_alpha)
    spec = AdaptorSpec(
        base_model=str(base_model),
        lora_rank=int(lora_rank),
        lora_alpha=alpha,
        lora_targets=targets,
        num_soft_tokens=int(num_soft_tokens),
        soft_token=str(soft_token),
        ema_decay=float(ema_decay),
    )
    if lora_rank:
        lora_lib.lora_scale(spec.lora_rank, spec.lora_alpha)
    spec.fingerprint = base_fingerprint(spec, unet_params, text_encoder_params)
    return spec


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


def init_adaptor(
    key: jax.Array, spec: AdaptorSpec, unet_params: Mapping | None, text_encoder_params: Mapping | None
) -> dict:
    """Initial trainable parameters ``{"lora": {component: tree}, "soft_tokens": [n, d]}`` for ``spec``."""
    trees = {"unet": unet_params, "text_encoder": text_encoder_params}
    lora_key, soft_key = jax.random.split(key)
    params: dict = {}
    if spec.lora_rank:
        keys = jax.random.split(lora_key, len(spec.lora_targets))
        params["lora"] = {
            component: lora_lib.init_lora(k, trees[component], patterns, spec.lora_rank)
            for k, (component, patterns) in zip(keys, sorted(spec.lora_targets.items()))
        }
    if spec.num_soft_tokens:
        table_rows = soft_lib.token_embedding(text_encoder_params).shape[0]
        params["soft_tokens"] = soft_lib.init_soft_tokens(
            soft_key, text_encoder_params, spec.num_soft_tokens, exclude_ids=[table_rows - 2, table_rows - 1]
        )
    return params


def apply_adaptor(
    spec: AdaptorSpec, adaptor_params: Mapping, unet_params: Mapping | None, text_encoder_params: Mapping | None
) -> tuple[Any, Any]:
    """``(unet_params, text_encoder_params)`` with LoRA deltas added and soft-token rows appended.

    Pure (jit/grad over ``adaptor_params``). Checks the base model's layer shapes against the spec's
    fingerprint (values are checked by :func:`check_base_model`, which needs concrete arrays). With soft
    tokens, run the text encoder returned by ``soft_tokens.grow_text_encoder(text_encoder, n)``.
    """
    if (
        spec.fingerprint
        and _shapes_digest(_weights_of(spec, unet_params, text_encoder_params)) != (spec.fingerprint["shapes_sha256"])
    ):
        raise _mismatch(spec, "different layer shapes")
    trees = {"unet": unet_params, "text_encoder": text_encoder_params}
    for component, lora_tree in adaptor_params.get("lora", {}).items():
        trees[component] = lora_lib.apply_lora(trees[component], lora_tree, scale=spec.lora_scale)
    if "soft_tokens" in adaptor_params:
        trees["text_encoder"] = soft_lib.apply_soft_tokens(trees["text_encoder"], adaptor_params["soft_tokens"])
    return trees["unet"], trees["text_encoder"]


def adaptor_checkpoint_item(state: AdaptorState) -> dict:
    """The pytree the train loop saves as the ``adaptor`` item: ``{"params": ..., "ema": ...}``."""
    return {"params": state.params, "ema": state.ema}


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


def _single_device_target(metadata_tree: Any) -> Any:
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), metadata_tree
    )


def _restore_item(manager, steps: list[int], step: int | None, directory: str) -> tuple[int, Any]:
    import orbax.checkpoint as ocp

    if not steps:
        raise FairdiffError(f"{directory} holds no finished checkpoint; train longer or check the workdir.")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise FairdiffError(f"no checkpoint for step {step} in {directory}; available steps: {sorted(steps)}.")
    try:
        metadata = manager.item_metadata(step)[ITEM]
        tree = getattr(metadata, "tree", metadata)
        restored = manager.restore(
            step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(_single_device_target(tree))})
        )[ITEM]
    except Exception as err:
        raise FairdiffError(
            f"cannot restore the '{ITEM}' item of checkpoint step {step} in {directory} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); the checkpoint is corrupt or was not written by "
            "fairdiff train — pick another --step."
        ) from err
    return step, restored


class _SkipUnrestoredItemWarnings(logging.Filter):
    """Drop orbax's warning that the run's other items (optimizer state, meta) were left unread: by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "could not be restored" not in record.getMessage()


def restore_adaptor_item(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """``(step, {"params", "ema"})`` from ``workdir/checkpoints`` (latest step unless given), on one device."""
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FairdiffError(f"{directory} does not exist; train first ('fairdiff train --workdir {workdir}').")
    try:
        manager = ocp.CheckpointManager(directory, item_handlers={ITEM: ocp.StandardCheckpointHandler()})
        steps = list(manager.all_steps())
    except Exception as err:  # orbax raises many types for unreadable folders
        raise FairdiffError(f"cannot read checkpoints in {directory}: {err}") from err
    quiet = _SkipUnrestoredItemWarnings()
    logging.getLogger("absl").addFilter(quiet)
    try:
        step, restored = _restore_item(manager, steps, step, directory)
    finally:
        manager.close()
        logging.getLogger("absl").removeFilter(quiet)
    if not isinstance(restored, Mapping) or not {"params", "ema"} <= set(restored):
        raise FairdiffError(f"checkpoint step {step} in {directory} has no adaptor params/ema; not a fairdiff run.")
    return step, dict(restored)


def save_flax_adaptor(directory: str, spec: AdaptorSpec, params: Mapping) -> str:
    """Write ``directory/adaptor.json`` and the parameters as an orbax checkpoint ``directory/flax_adaptor``."""
    import orbax.checkpoint as ocp

    write_adaptor_metadata(directory, spec)
    path = os.path.join(os.path.abspath(directory), FLAX_ADAPTOR_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, jax.device_get(dict(params)), force=True)
    return path


def load_flax_adaptor(
    directory: str, unet_params: Mapping | None = None, text_encoder_params: Mapping | None = None
) -> tuple[AdaptorSpec, dict]:
    """``(spec, params)`` saved by :func:`save_flax_adaptor`; checked against the base weights when given."""
    import orbax.checkpoint as ocp

    spec = read_adaptor_metadata(directory)
    if unet_params is not None or text_encoder_params is not None:
        check_base_model(spec, unet_params, text_encoder_params)
    path = os.path.join(os.path.abspath(directory), FLAX_ADAPTOR_DIR)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            target = _single_device_target(checkpointer.metadata(path).item_metadata.tree)
            params = checkpointer.restore(path, target)
    except Exception as err:
        raise FairdiffError(f"cannot read the Flax adaptor {path}: {err}; re-export it.") from err
    return spec, dict(params)
