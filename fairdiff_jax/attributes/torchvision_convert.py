"""Load torchvision ``mobilenet_v3_large`` state dicts (the paper authors' released attribute classifiers) into
:class:`MobileNetV3Large` variables.

Names map one to one: Flax ``features_3/block_1/conv/kernel`` is torch ``features.3.block.1.0.weight``
(``conv`` -> ``.0``, ``bn`` -> ``.1``; BatchNorm ``scale``/``bias``/``mean``/``var`` -> ``weight``/``bias``/
``running_mean``/``running_var``), ``classifier_0`` is ``classifier.0``. Conv kernels go from ``[O, I, kh, kw]``
to ``[kh, kw, I, O]``, linear weights are transposed. The final linear layer feeds the heads: by default
``classifier.3`` split row-wise over the heads in order, or as given by ``head_map`` (``{attr: slice}`` into
``classifier.3``, or ``{attr: "module.name"}`` naming another linear layer of the checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fairdiff_jax.attributes.mobilenet import MobileNetV3Large
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.safetensors_io import read_safetensors

FINAL_LINEAR = "classifier.3"
_UNIT = {"conv": "0", "bn": "1"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_SKIPPED = ("num_batches_tracked",)

HeadSource = slice | tuple[int, int] | str


def torchvision_key(flax_path: Sequence[str]) -> str:
    """torchvision state-dict key of a Flax variable path, e.g. ``('features_1', 'block_0', 'conv', 'kernel')`` ->
    ``'features.1.block.0.0.weight'``. Head paths (``head_*``) have no fixed name and are not accepted."""
    parts = []
    for part in flax_path[:-1]:
        stem, _, index = part.rpartition("_")
        if stem in ("features", "block", "classifier") and index.isdigit():
            parts += [stem, index]
        elif part in _UNIT:
            parts.append(_UNIT[part])
        elif part in ("fc1", "fc2"):
            parts.append(part)
        else:
            raise ValueError(f"no torchvision name for the Flax module path {'/'.join(flax_path)}")
    return ".".join([*parts, _LEAF[flax_path[-1]]])


def _to_flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # [O, I/groups, kh, kw] -> [kh, kw, I/groups, O]
    if leaf == "kernel" and value.ndim == 2:
        return value.T  # Linear [out, in] -> Dense [in, out]
    return value


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict as float32 numpy arrays: ``.safetensors`` with numpy only, ``.pt``/``.pth``/``.bin``
    with torch (``weights_only``). A ``{"state_dict": ...}`` wrapper (Lightning) and a common key prefix such as
    ``model.`` or ``module.`` in front of ``features.0.0.weight`` are removed."""
    if not os.path.isfile(path):
        raise FairdiffError(
            f"torchvision checkpoint {path} does not exist; pass the .pt/.pth/.safetensors file of a MobileNetV3-Large"
        )
    if path.endswith(".safetensors"):
        raw = read_safetensors(path)
    else:
        try:
            import torch
        except ImportError as err:
            raise FairdiffError(
                f"reading {path} needs torch (pip install -e .[torch]); or save the state dict as .safetensors "
                "(safetensors.torch.save_file) and pass that file instead"
            ) from err
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many kinds for a bad file
            raise FairdiffError(f"cannot read {path} with torch.load ({err}); pass a saved state dict") from err
        if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
            raw = raw["state_dict"]
        if not isinstance(raw, Mapping):
            raise FairdiffError(f"{path} holds a {type(raw).__name__}, not a state dict; save model.state_dict()")
        raw = {k: v.detach().float().numpy() for k, v in raw.items() if hasattr(v, "detach")}
    anchor = "features.0.0.weight"
    prefixes = [k[: -len(anchor)] for k in raw if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise FairdiffError(
            f"{path} has no (or several) '{anchor}' key(s); it is not a torchvision mobilenet_v3_large state dict"
        )
    prefix = prefixes[0]
    return {k[len(prefix) :]: np.asarray(v, np.float32) for k, v in raw.items() if k.startswith(prefix)}


def _head_rows(heads: Mapping[str, int], head_map: Mapping[str, HeadSource] | None) -> dict[str, HeadSource]:
    if head_map is None:
        rows, start = {}, 0
        for name, k in heads.items():
            rows[name] = slice(start, start + k)
            start += k
        return rows
    missing = [n for n in heads if n not in head_map]
    if missing:
        raise FairdiffError(
            f"head_map has no entry for head(s) {missing}; map each head to a slice of {FINAL_LINEAR} or to the "
            "name of a linear layer in the checkpoint"
        )
    return {n: (slice(*head_map[n]) if isinstance(head_map[n], tuple) else head_map[n]) for n in heads}


def convert_torchvision_mobilenet(
    state_dict: Mapping[str, np.ndarray],
    heads: Mapping[str, int],
    *,
    head_map: Mapping[str, HeadSource] | None = None,
    width_multiplier: float = 1.0,
    source: str = "state dict",
) -> tuple[MobileNetV3Large, dict[str, Any]]:
    """torchvision ``mobilenet_v3_large`` weights -> ``(module, {"params", "batch_stats"})``.

    ``heads`` gives the classes per attribute (``{"gender": 2}``); every backbone key and shape is checked and
    every checkpoint key must be used (``num_batches_tracked`` aside), else a FairdiffError names the problem.
    """
    module = MobileNetV3Large(dict(heads), width_multiplier=width_multiplier)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    used, flat = set(), {}
    for path, spec in flatten_dict({k: dict(v) for k, v in expected.items()}).items():
        collection, *module_path = path
        if module_path[0].startswith("head_"):
            continue
        key = torchvision_key(module_path)
        if key not in state_dict:
            raise FairdiffError(
                f"{source} has no '{key}' needed by MobileNetV3-Large (width {width_multiplier}); pass a torchvision "
                "mobilenet_v3_large state dict and the width multiplier it was built with"
            )
        value = _to_flax_layout(np.asarray(state_dict[key], np.float32), module_path[-1])
        if value.shape != spec.shape:
            raise FairdiffError(
                f"{source}: '{key}' has shape {np.shape(state_dict[key])}, which does not fit MobileNetV3-Large at "
                f"width {width_multiplier} (Flax shape {spec.shape}); check the width multiplier of the checkpoint"
            )
        flat[(collection, *module_path)] = value
        used.add(key)
    hidden = expected["params"]["classifier_0"]["kernel"].shape[1]
    final_rows = np.shape(state_dict.get(f"{FINAL_LINEAR}.weight", ()))[:1]
    if head_map is None and final_rows and final_rows[0] != sum(heads.values()):
        raise FairdiffError(
            f"{source}: '{FINAL_LINEAR}' has {final_rows[0]} outputs but the heads {dict(heads)} take "
            f"{sum(heads.values())}; give the heads' class counts or a head_map {{attr: (start, stop)}}"
        )
    for name, rows in _head_rows(heads, head_map).items():
        layer = FINAL_LINEAR if isinstance(rows, slice) else rows
        weight_key, bias_key = f"{layer}.weight", f"{layer}.bias"
        if weight_key not in state_dict or bias_key not in state_dict:
            raise FairdiffError(f"{source} has no linear layer '{layer}' (.weight and .bias) for head '{name}'")
        weight, bias = np.asarray(state_dict[weight_key]), np.asarray(state_dict[bias_key])
        if isinstance(rows, slice):
            weight, bias = weight[rows], bias[rows]
        if weight.shape != (heads[name], hidden):
            raise FairdiffError(
                f"{source}: head '{name}' takes {weight.shape} rows of '{weight_key}', expected ({heads[name]}, "
                f"{hidden}); set the head's class count or head_map to match the checkpoint's final layer"
            )
        flat[("params", f"head_{name}", "kernel")] = weight.T
        flat[("params", f"head_{name}", "bias")] = bias
        used.update((weight_key, bias_key))
    unused = sorted(k for k in state_dict if k not in used and not k.endswith(_SKIPPED))
    if unused:
        raise FairdiffError(
            f"{source} has {len(unused)} weight(s) the heads {list(heads)} do not use ({', '.join(unused[:4])}); "
            f"map every output of '{FINAL_LINEAR}' to a head (head_map) or check the architecture"
        )
    variables = unflatten_dict(flat)
    return module, jax.tree_util.tree_map(jnp.asarray, variables)


def to_torchvision_state_dict(variables: Mapping[str, Any], head_order: Sequence[str]) -> dict[str, np.ndarray]:
    """MobileNetV3 ``{"params", "batch_stats"}`` -> a torchvision ``mobilenet_v3_large`` state dict (numpy) with the
    heads stacked row-wise into ``classifier.3`` in ``head_order``, so PyTorch code can load our classifiers."""
    state = {}
    for path, value in flatten_dict({k: dict(v) for k, v in variables.items()}).items():
        _, *module_path = path
        if module_path[0].startswith("head_"):
            continue
        value = np.asarray(value, np.float32)
        if module_path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[torchvision_key(module_path)] = value
    heads = [variables["params"][f"head_{name}"] for name in head_order]
    state[f"{FINAL_LINEAR}.weight"] = np.concatenate([np.asarray(h["kernel"], np.float32).T for h in heads])
    state[f"{FINAL_LINEAR}.bias"] = np.concatenate([np.asarray(h["bias"], np.float32) for h in heads])
    return state


def load_torchvision_mobilenet(
    path: str,
    heads: Mapping[str, int],
    *,
    head_map: Mapping[str, HeadSource] | None = None,
    width_multiplier: float = 1.0,
) -> tuple[MobileNetV3Large, dict[str, Any]]:
    """Read a torchvision ``mobilenet_v3_large`` checkpoint file -> ``(module, {"params", "batch_stats"})``."""
    return convert_torchvision_mobilenet(
        read_state_dict(path), heads, head_map=head_map, width_multiplier=width_multiplier, source=path
    )


def import_torchvision_classifier(
    checkpoint: str,
    folder: str,
    classes: Mapping[str, Sequence[str]],
    *,
    head_map: Mapping[str, HeadSource] | None = None,
    width_multiplier: float = 1.0,
    **config: Any,
) -> str:
    """Convert a torchvision checkpoint into a classifier folder (``classifier_io``) and return the folder.

    ``classes``: attribute -> class names in class order, e.g. ``{"gender": ("female", "male")}``. The defaults
    of ``save_classifier`` match the paper authors' classifiers (224 face crops, pixels in [-1, 1]); ``config``
    overrides them (``mean``, ``std``, ``face_crop``, ``crop_expand``, ``input_size``).
    """
    from fairdiff_jax.attributes.classifier_io import save_classifier

    heads = {name: len(names) for name, names in classes.items()}
    _, variables = load_torchvision_mobilenet(checkpoint, heads, head_map=head_map, width_multiplier=width_multiplier)
    config.setdefault("source", os.path.abspath(checkpoint))
    save_classifier(folder, variables, classes=classes, width_multiplier=width_multiplier, **config)
    return folder
