"""The paper authors' released adaptors (``sail-sg/finetune-fair-diffusion``) as our adaptor spec + parameters.

Their ``*/2-export-checkpoint.py`` writes ``torch.save`` state dicts (diffusers 0.19.3 names) and their
``gen-images.py`` applies them; we follow both:

- ``text_lora`` (``text_encoder_lora[_EMA].pth``): ``LoraLoaderMixin._modify_text_encoder(..., patch_mlp=True)``
  keys ``text_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj|mlp.fc{1,2}}.lora_linear_layer.{down,up}.weight``,
  ``down [r, in]``, ``up [out, r]``; the layer computes ``W x + up(down(x))`` (no alpha, scale 1).
- ``unet_lora`` (``unet_lora[_EMA].pth``): ``LoRAAttnProcessor`` on every attention, keys
  ``<attention module>.processor.to_{q,k,v,out}_lora.{down,up}.weight``, the same update on ``to_q``, ``to_k``,
  ``to_v`` and ``to_out.0``.
- ``soft_tokens`` (``prefix_embedding[_EMA].pth``): their ``FairEmbeddings`` state dict; ``token_embedding.weight``
  ``[n + 1, d]`` whose rows 1..n are ``<common-token1..n>`` (row 0 stands for every other token and is never
  used), prepended to the prompt with no space; ``position_embedding.weight`` / ``position_ids`` are copies of
  the text encoder's, which their ``load_state_dict`` writes back into it, so they must equal the base model's.

Their loader uses ``load_state_dict(strict=False)``, which drops a mismatched key silently; here every key and
shape is checked against the base model and any unknown, missing or mis-shaped key is one error line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
from flax.traverse_util import unflatten_dict

from fairdiff_jax.adaptors import lora as lora_lib
from fairdiff_jax.adaptors import soft_tokens as soft_lib
from fairdiff_jax.adaptors.export import export_adaptor
from fairdiff_jax.adaptors.spec import METADATA_FILE, AdaptorSpec, make_adaptor_spec
from fairdiff_jax.adaptors.torch_pickle import load_torch_state_dict
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.convert import pt_module_name

# --kind -> the model component it adapts
KINDS = {"text_lora": "text_encoder", "unet_lora": "unet", "soft_tokens": "text_encoder"}
# the file names of the authors' exports, for messages: --kind -> EMA file
AUTHORS_FILES = {
    "text_lora": "text_encoder_lora_EMA.pth",
    "unet_lora": "unet_lora_EMA.pth",
    "soft_tokens": "prefix_embedding_EMA.pth",
}
# our Flax projection name -> the LoRAAttnProcessor attribute that holds its factors
_PROCESSOR_NAMES = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out_0": "to_out_lora"}
_SOFT_TOKEN_KEYS = ("token_embedding.weight", "position_embedding.weight", "position_ids")
PROVENANCE_FILE = "imported.json"
# how the authors' training and gen-images.py build the text context (the prompt-context item of issue #13)
AUTHORS_PROMPT_CONTEXT = {
    "padding": "prompt_length",  # tokenizer(..., padding=True): padded to the prompt's own length, not 77
    "attention_mask": True,  # the mask is passed to the text encoder
    "soft_tokens_prefix": "no_space",  # "<common-token1>...<common-token5>" + prompt
}


def authors_token_names(num_tokens: int) -> list[str]:
    """The authors' soft-token strings ``<common-token1> .. <common-token{n}>`` (gen-images.py)."""
    return [f"<common-token{i + 1}>" for i in range(int(num_tokens))]


def check_kind(kind: str) -> str:
    """``kind`` itself if it is one of :data:`KINDS`, else a one-line FairdiffError."""
    if kind not in KINDS:
        raise FairdiffError(f"unknown adaptor kind '{kind}'; choose one of {', '.join(KINDS)} (--kind).")
    return kind


def _authors_lora_key(component: str, module: tuple[str, ...], factor: str) -> str:
    """The authors' state-dict key of the ``down``/``up`` factor of one of our LoRA target modules."""
    if component == "text_encoder":
        return f"{pt_module_name(module)}.lora_linear_layer.{factor}.weight"
    return f"{pt_module_name(module[:-1])}.processor.{_PROCESSOR_NAMES[module[-1]]}.{factor}.weight"


def _examples(keys: Sequence[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in list(keys)[:2])
    return shown + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")


def _check_keys(state: Mapping, expected: Sequence[str], where: str, what: str) -> None:
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown:
        raise FairdiffError(
            f"{where} has {len(unknown)} key(s) that {what} does not have ({_examples(unknown)}); it is not this kind "
            "of adaptor or was made for another base model — check --kind and --base."
        )
    if missing:
        raise FairdiffError(
            f"{where} lacks {len(missing)} key(s) that {what} needs ({_examples(missing)}); the file is incomplete or "
            "was made for another base model — check --kind and --base."
        )


def _float32(value: np.ndarray, key: str, where: str) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise FairdiffError(f"{where}: '{key}' holds {array.dtype} values, not floats; the file is not an adaptor.")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise FairdiffError(f"{where}: '{key}' holds NaN or infinite values; the adaptor is broken.")
    return array


def lora_from_authors(state: Mapping[str, np.ndarray], component: str, frozen_params: Mapping, *, where: str):
    """``(LoRA tree, rank)`` for ``component`` (``unet``/``text_encoder``) from the authors' state dict.

    Factors become our Flax layout: ``down [in, r] = their_down.T``, ``up [r, out] = their_up.T``, so that
    ``kernel + down @ up`` is their ``W x + up(down(x))`` (scale 1).
    """
    modules = lora_lib.find_lora_targets(frozen_params, lora_lib.DEFAULT_TARGETS[component])
    keys = {(m, f): _authors_lora_key(component, m, f) for m in modules for f in ("down", "up")}
    _check_keys(state, list(keys.values()), where, f"the {component} LoRA of the base model")
    kernels = {module: np.shape(_kernel(frozen_params, module)) for module in modules}
    ranks = set()
    tree = {}
    for module in modules:
        fan_in, fan_out = kernels[module]
        down_key, up_key = keys[(module, "down")], keys[(module, "up")]
        down, up = state[down_key], state[up_key]
        rank = np.shape(down)[0] if np.ndim(down) == 2 else -1
        if np.shape(down) != (rank, fan_in) or np.shape(up) != (fan_out, rank) or rank < 1:
            raise FairdiffError(
                f"{where}: '{down_key}' is {list(np.shape(down))} and '{up_key}' is {list(np.shape(up))}, but the "
                f"base layer is {fan_out}x{fan_in} (expected [r, {fan_in}] and [{fan_out}, r]); the file was made for "
                "another base model — check --base."
            )
        ranks.add(rank)
        tree[module] = {"down": _float32(down, down_key, where).T.copy(), "up": _float32(up, up_key, where).T.copy()}
    if len(ranks) != 1:
        raise FairdiffError(f"{where} mixes LoRA ranks {sorted(ranks)}; one adaptor needs one rank for every layer.")
    return unflatten_dict(tree), ranks.pop()


def _kernel(frozen_params: Mapping, module: tuple[str, ...]):
    node = frozen_params
    for name in (*module, "kernel"):
        node = node[name]
    return node


def soft_tokens_from_authors(state: Mapping[str, np.ndarray], text_encoder_params: Mapping, *, where: str):
    """``[n, d]`` float32 soft-token embeddings (rows 1..n of their ``token_embedding.weight``).

    Their copies of the position embedding (and ``position_ids``), when present, must equal the base model's.
    """
    unknown = sorted(set(state) - set(_SOFT_TOKEN_KEYS))
    if unknown:
        raise FairdiffError(
            f"{where} has {len(unknown)} key(s) that a soft-token (prefix_embedding) file does not have "
            f"({_examples(unknown)}); allowed are {', '.join(_SOFT_TOKEN_KEYS)} — check --kind."
        )
    if "token_embedding.weight" not in state:
        raise FairdiffError(
            f"{where} lacks 'token_embedding.weight'; it is not a soft-token (prefix_embedding) file — check --kind."
        )
    base_table = np.asarray(soft_lib.token_embedding(text_encoder_params))
    width = base_table.shape[1]
    table = state["token_embedding.weight"]
    if np.ndim(table) != 2 or np.shape(table)[1] != width or np.shape(table)[0] < 2:
        raise FairdiffError(
            f"{where}: 'token_embedding.weight' is {list(np.shape(table))}, expected [n + 1, {width}] (row 0 unused, "
            "rows 1..n the soft tokens) for this base model — check --base."
        )
    base_positions = np.asarray(text_encoder_params["text_model"]["embeddings"]["position_embedding"]["embedding"])
    if "position_embedding.weight" in state:
        positions = _float32(state["position_embedding.weight"], "position_embedding.weight", where)
        scale = float(np.max(np.abs(base_positions)))
        close = positions.shape == base_positions.shape and np.allclose(
            positions, base_positions, rtol=1e-2, atol=1e-3 * scale
        )
        if not close:
            raise FairdiffError(
                f"{where}: its copy of the position embedding ({list(positions.shape)}) differs from the base "
                f"model's {list(base_positions.shape)}; the authors' loader would overwrite the base model's with it — "
                "pass the base model the adaptor was trained on (--base)."
            )
    if "position_ids" in state:
        ids = np.asarray(state["position_ids"])
        if ids.size != base_positions.shape[0] or not np.array_equal(ids.reshape(-1), np.arange(ids.size)):
            raise FairdiffError(
                f"{where}: 'position_ids' is not 0..{base_positions.shape[0] - 1}; the file is not a prefix embedding "
                "for this base model — check --base."
            )
    return _float32(table, "token_embedding.weight", where)[1:].copy()


def authors_adaptor(
    sources: Sequence[tuple[str, Mapping[str, np.ndarray], str]],
    unet_params: Mapping | None,
    text_encoder_params: Mapping | None,
    *,
    base_model: str,
    soft_token: str = soft_lib.DEFAULT_TOKEN,
) -> tuple[AdaptorSpec, dict]:
    """``(spec, params)`` of one adaptor made of the authors' files ``[(kind, state dict, name for messages)]``.

    E.g. their "text encoder and U-Net" runs are ``[("text_lora", ...), ("unet_lora", ...)]``. The spec is
    fingerprinted against the given base weights; LoRA scale is 1 (alpha = rank), as in their loader.
    """
    kinds = [check_kind(kind) for kind, _, _ in sources]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if not sources or repeated:
        raise FairdiffError(f"give each adaptor kind at most once and at least one (repeated: {repeated}).")
    trees = {"unet": unet_params, "text_encoder": text_encoder_params}
    params: dict = {}
    ranks = {}
    for kind, state, where in sources:
        component = KINDS[kind]
        if trees[component] is None:
            raise FairdiffError(f"importing {kind} needs the base model's {component}; load it from --base.")
        if kind == "soft_tokens":
            params["soft_tokens"] = soft_tokens_from_authors(state, text_encoder_params, where=where)
        else:
            tree, ranks[where] = lora_from_authors(state, component, trees[component], where=where)
            params.setdefault("lora", {})[component] = tree
    if len(set(ranks.values())) > 1:
        raise FairdiffError(f"the LoRA files have different ranks {ranks}; one adaptor needs one rank.")
    rank = next(iter(ranks.values()), 0)
    spec = make_adaptor_spec(
        unet_params,
        text_encoder_params,
        base_model=base_model,
        lora_rank=rank,
        lora_alpha=float(rank) if rank else None,
        lora_targets=sorted(params.get("lora", {})),
        num_soft_tokens=int(params["soft_tokens"].shape[0]) if "soft_tokens" in params else 0,
        soft_token=soft_token,
    )
    return spec, params


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise FairdiffError(f"--out {out} is a file; pass a folder for the imported adaptor.")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise FairdiffError(f"--out {out} is not empty; choose an empty folder or pass --overwrite to replace it.")
        if not os.path.isfile(os.path.join(out, METADATA_FILE)):
            raise FairdiffError(f"--out {out} holds files but no {METADATA_FILE}; --overwrite only replaces adaptors.")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def import_authors(
    kinds: Sequence[str],
    sources: Sequence[str],
    base: str,
    out: str,
    *,
    token: str = soft_lib.DEFAULT_TOKEN,
    overwrite: bool = False,
    cache_dir: str | None = "",
) -> list[str]:
    """Turn the authors' files (``kinds[i]`` read from ``sources[i]``) into the adaptor folder ``out``, written as
    ``fairdiff export`` writes one, plus ``imported.json`` (sources, their sha256, the authors' prompt context).

    Every file is checked against the base model in ``base`` (a diffusers folder); returns the written paths.
    """
    from fairdiff_jax.models import load_stable_diffusion

    if len(kinds) != len(sources) or not kinds:
        raise FairdiffError(f"got {len(kinds)} --kind and {len(sources)} --source; pass one --kind per --source.")
    kinds = [check_kind(kind) for kind in kinds]
    states = [(kind, load_torch_state_dict(source), os.path.basename(source)) for kind, source in zip(kinds, sources)]
    components = sorted({KINDS[kind] for kind in kinds}) + (["tokenizer"] if "soft_tokens" in kinds else [])
    sd = load_stable_diffusion(base, components=components, cache_dir=cache_dir)
    spec, params = authors_adaptor(states, sd.unet_params, sd.text_encoder_params, base_model=base, soft_token=token)
    if spec.num_soft_tokens:
        taken = [n for n in soft_lib.soft_token_names(token, spec.num_soft_tokens) if n in sd.tokenizer.get_vocab()]
        if taken:
            raise FairdiffError(f"soft-token name(s) {taken} are already tokens of {base}; pick another --token.")
    _prepare_out(out, overwrite)
    written = export_adaptor(spec, params, out)
    provenance = {
        "format": "fairdiff-import/1",
        "origin": "sail-sg/finetune-fair-diffusion",
        "sources": [{"kind": k, "file": os.path.basename(s), "sha256": _sha256(s)} for k, s in zip(kinds, sources)],
        "prompt_context": AUTHORS_PROMPT_CONTEXT,
    }
    if spec.num_soft_tokens:
        provenance.update(authors_tokens=authors_token_names(spec.num_soft_tokens), token=spec.soft_token)
    path = os.path.join(out, PROVENANCE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=2)
    return [*written, path]


def read_provenance(directory: str) -> dict | None:
    """``directory/imported.json`` of an imported adaptor folder, or None for our own exports."""
    path = os.path.join(directory, PROVENANCE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise FairdiffError(f"cannot read {path}: {err}; re-import the adaptor with 'fairdiff import'.") from err
