"""Write small CLIP-format BPE tokenizer files (vocab.json, merges.txt) built in code.

Real Stable Diffusion tokenizers have 49,408 entries; tests and the toy world need a few hundred. The
files follow the CLIP layout exactly (256 byte symbols, the same with ``</w>``, merge results, then
``<|startoftext|>`` and ``<|endoftext|>``), so transformers' ``CLIPTokenizer`` and PyTorch diffusers load
them unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

DEFAULT_WORDS = (
    "a photo of the face person doctor nurse teacher pilot chef farmer engineer artist lawyer judge "
    "firefighter librarian dancer writer scientist cleaner worker man woman young old"
).split()


def _byte_symbols() -> list[str]:
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    return list(bytes_to_unicode().values())


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary and BPE merges in which each given word becomes (usually) one token."""
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen = set(vocab_list)
    chains = []
    for word in sorted({w.lower() for w in words if re.fullmatch(r"[a-z]+", w.lower())}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        chains.append(pieces)
    # merge left to right, shorter prefixes first, so each word's chain fires in order
    max_len = max((len(c) for c in chains), default=0)
    for step in range(1, max_len):
        for pieces in chains:
            if step < len(pieces):
                left = "".join(pieces[:step])
                right = pieces[step]
                merged = left + right
                if merged not in seen:
                    merges.append((left, right))
                    vocab_list.append(merged)
                    seen.add(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def write_tokenizer_folder(folder: str, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16) -> int:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``; returns the vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)
    return len(vocab)
