"""``fairdiff import``: the paper authors' released ``.pth`` adaptors -> an exported adaptor folder.

    fairdiff import --kind text_lora --source text_encoder_lora_EMA.pth --base /data/sd15 --out DIR
    fairdiff import --kind text_lora --source te.pth --kind unet_lora --source unet.pth --base ... --out DIR

``DIR`` is written exactly as ``fairdiff export`` writes it (``adaptor.json`` fingerprinted against the base
model, ``flax_adaptor/``, and ``pytorch_lora_weights.safetensors`` (PEFT) or ``learned_embeds.safetensors``
(textual inversion)), plus ``imported.json`` naming the source files and the prompt context the authors used.
The ``.pth`` files are read without torch and without executing anything from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Sequence

from fairdiff_jax.adaptors import authors
from fairdiff_jax.adaptors import soft_tokens as soft_lib
from fairdiff_jax.adaptors.checkpoint import METADATA_FILE
from fairdiff_jax.adaptors.export import export_adaptor
from fairdiff_jax.adaptors.torch_pickle import load_torch_state_dict
from fairdiff_jax.errors import FairdiffError

PROVENANCE_FILE = "imported.json"
# how the authors' gen-images.py / training builds the text context (see the faithfulness issue on prompt context)
AUTHORS_PROMPT_CONTEXT = {
    "padding": "prompt_length",  # tokenizer(..., padding=True): padded to the prompt's own length, not 77
    "attention_mask": True,  # the mask is passed to the text encoder
    "soft_tokens_prefix": "no_space",  # "<common-token1>...<common-token5>" + prompt
}


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
    """Turn the authors' files (``kinds[i]`` read from ``sources[i]``) into the adaptor folder ``out``.

    Returns the written paths. Every file is checked against the base model in ``base`` (a diffusers folder).
    """
    from fairdiff_jax.models import load_stable_diffusion

    if len(kinds) != len(sources) or not kinds:
        raise FairdiffError(
            f"got {len(kinds)} --kind and {len(sources)} --source; give one --kind before each --source."
        )
    kinds = [authors.check_kind(kind) for kind in kinds]
    states = [(kind, load_torch_state_dict(source), os.path.basename(source)) for kind, source in zip(kinds, sources)]
    components = sorted({authors.KINDS[kind] for kind in kinds}) + (["tokenizer"] if "soft_tokens" in kinds else [])
    sd = load_stable_diffusion(base, components=components, cache_dir=cache_dir)
    spec, params = authors.authors_adaptor(
        states, sd.unet_params, sd.text_encoder_params, base_model=base, soft_token=token
    )
    if spec.num_soft_tokens:
        taken = [n for n in soft_lib.soft_token_names(token, spec.num_soft_tokens) if n in sd.tokenizer.get_vocab()]
        if taken:
            raise FairdiffError(f"soft-token name(s) {taken} are already tokens of {base}; pick another --token.")
    _prepare_out(out, overwrite)
    written = export_adaptor(spec, params, out)
    provenance = {
        "format": "fairdiff-import/1",
        "origin": "sail-sg/finetune-fair-diffusion",
        "sources": [
            {"kind": kind, "file": os.path.basename(source), "sha256": _sha256(source)}
            for kind, source in zip(kinds, sources)
        ],
        "prompt_context": AUTHORS_PROMPT_CONTEXT,
    }
    if "soft_tokens" in params:
        provenance["authors_tokens"] = authors.authors_token_names(spec.num_soft_tokens)
        provenance["token"] = spec.soft_token
    path = os.path.join(out, PROVENANCE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=2)
    return [*written, path]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairdiff import",
        description="Import the paper authors' released adaptors (.pth) as an exported adaptor folder.",
    )
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=list(authors.KINDS),
        help="what the next --source holds (repeat with --source to combine, e.g. text_lora and unet_lora)",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="FILE.pth",
        help="an authors' file, e.g. " + ", ".join(authors.AUTHORS_FILES.values()),
    )
    parser.add_argument("--base", required=True, help="the Stable Diffusion folder (diffusers layout) of the adaptor")
    parser.add_argument("--out", required=True, help="output folder (written like 'fairdiff export')")
    parser.add_argument("--token", default=soft_lib.DEFAULT_TOKEN, help="name of the imported soft tokens in prompts")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fairdiff import --kind K --source FILE [--kind K --source FILE] --base SD --out DIR``; exit code."""
    args = build_parser().parse_args(list(argv or []))
    written = import_authors(args.kind, args.source, args.base, args.out, token=args.token, overwrite=args.overwrite)
    print(f"imported {', '.join(args.kind)} from {', '.join(args.source)} into {args.out}:")
    for path in written:
        print(f"  {path}")
    return 0
