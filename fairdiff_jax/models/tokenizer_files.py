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


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's byte-pair encoder makes of one lower-case word: start from its characters (the last
    carrying ``</w>``) and, while any adjacent pair has a merge, join every occurrence of the lowest-ranked one."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), pair) for pair in zip(pieces, pieces[1:]) if pair in ranks]
        if not pairs:
            break
        left, right = min(pairs)[1]
        joined, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and pieces[i] == left and pieces[i + 1] == right:
                joined.append(left + right)
                i += 2
            else:
                joined.append(pieces[i])
                i += 1
        pieces = joined
    return pieces


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary and BPE merges in which each given word becomes exactly one token.

    Each word's merges are appended after all earlier ones: while the encoder still splits the word, the first two
    of its pieces are joined by a new, lowest-priority merge. A merge ranked after every other one only fires when
    nothing else applies, so it never changes a word that is already one token (an earlier layout, merging every
    word's prefixes by length, let "male"'s merges take "female" apart into "fe" + "male")."""
    vocab_list = _byte_symbols()
    vocab_list = vocab_list + [s + "</w>" for s in vocab_list]
    seen = set(vocab_list)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if re.fullmatch(r"[a-z]+", w.lower())}):
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                vocab_list.append(pair[0] + pair[1])
                seen.add(pair[0] + pair[1])
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
