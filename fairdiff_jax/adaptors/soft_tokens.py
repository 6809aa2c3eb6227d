"""Soft tokens: n learned embeddings prepended to the conditional prompt (paper: 5).

They are registered in the tokenizer the way diffusers' textual inversion names a multi-vector token
(``<fair>``, ``<fair>_1``, ..., ``<fair>_{n-1}``), get ids ``V .. V+n-1`` after the base vocabulary of size
V, and their embeddings are written into those rows of a token-embedding table grown by n rows. Because
Flax checks parameter shapes, the text encoder must be rebuilt for the grown vocabulary
(:func:`grow_text_encoder`). Only the conditional prompt carries the tokens; the unconditional "" does not.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.errors import FairdiffError

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "<fair>"
TOKEN_EMBEDDING_PATH = ("text_model", "embeddings", "token_embedding", "embedding")


def soft_token_names(token: str, num_tokens: int) -> list[str]:
    """diffusers' multi-vector names: ``[token, token_1, ..., token_{n-1}]``."""
    if int(num_tokens) < 1:
        raise FairdiffError(f"the number of soft tokens must be >= 1 (got {num_tokens}); the paper uses 5.")
    return [token] + [f"{token}_{i}" for i in range(1, int(num_tokens))]


def token_embedding(text_encoder_params: Mapping) -> jax.Array:
    """The token-embedding table ``[V, d]`` of a FlaxCLIPTextModel parameter tree."""
    node = text_encoder_params
    for name in TOKEN_EMBEDDING_PATH:
        if not isinstance(node, Mapping) or name not in node:
            raise FairdiffError(
                "the text-encoder parameters have no text_model/embeddings/token_embedding/embedding; soft tokens "
                "need a CLIP text encoder (FlaxCLIPTextModel)."
            )
        node = node[name]
    return node


def add_soft_tokens(tokenizer, num_tokens: int, token: str = DEFAULT_TOKEN, *, vocab_size: int | None = None):
    """A copy of ``tokenizer`` with the soft tokens added, and their ids ``[n]`` (``V .. V+n-1``).

    ``vocab_size`` (rows of the base embedding table) is checked against the tokenizer so the new ids land
    exactly in the rows that :func:`apply_soft_tokens` appends. The input tokenizer is not modified.
    """
    names = soft_token_names(token, num_tokens)
    base = len(tokenizer)
    if vocab_size is not None and base != int(vocab_size):
        raise FairdiffError(
            f"the tokenizer has {base} tokens but the token-embedding table has {vocab_size} rows; soft tokens need "
            "a tokenizer and text encoder from the same model folder."
        )
    taken = [n for n in names if n in tokenizer.get_vocab()]
    if taken:
        raise FairdiffError(f"soft token(s) {taken} already exist in the tokenizer; choose another token name.")
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(names)
    ids = np.asarray(grown.convert_tokens_to_ids(names), dtype=np.int32)
    if not np.array_equal(ids, np.arange(base, base + len(names))):
        raise FairdiffError(
            f"the tokenizer gave soft tokens {names} ids {ids.tolist()}, expected {base}..; cannot use it."
        )
    return grown, ids


def init_soft_tokens(
    key: jax.Array, text_encoder_params: Mapping, num_tokens: int, *, exclude_ids: Sequence[int] = ()
) -> jax.Array:
    """``[n, d]`` initial soft-token embeddings: distinct random rows of the existing vocabulary.

    ``exclude_ids`` (e.g. the bos/eos/pad ids) are never drawn.
    """
    table = token_embedding(text_encoder_params)
    allowed = np.setdiff1d(np.arange(table.shape[0]), np.asarray(exclude_ids, dtype=np.int64))
    if len(allowed) < int(num_tokens):
        raise FairdiffError(f"cannot draw {num_tokens} distinct vocabulary rows from {len(allowed)} allowed ones.")
    rows = jax.random.choice(key, jnp.asarray(allowed), (int(num_tokens),), replace=False)
    return jnp.asarray(table)[rows].astype(jnp.float32)


def apply_soft_tokens(text_encoder_params: Mapping, soft_embeddings: jax.Array) -> dict:
    """Text-encoder params with the token-embedding table grown to ``[V + n, d]`` (rows V.. = soft tokens).

    Pure; gradients flow into ``soft_embeddings`` ``[n, d]``. Use with :func:`grow_text_encoder`.
    """
    table = token_embedding(text_encoder_params)
    if soft_embeddings.ndim != 2 or soft_embeddings.shape[1] != table.shape[1]:
        raise FairdiffError(
            f"soft-token embeddings have shape {tuple(soft_embeddings.shape)} but the text encoder's embedding width "
            f"is {table.shape[1]}; the adaptor was made for a different base model."
        )
    grown = jnp.concatenate([table, soft_embeddings.astype(table.dtype)], axis=0)
    params = dict(text_encoder_params)
    node = params
    for name in TOKEN_EMBEDDING_PATH[:-1]:
        node[name] = dict(node[name])
        node = node[name]
    node[TOKEN_EMBEDDING_PATH[-1]] = grown
    return params


def grow_text_encoder(text_encoder, num_tokens: int):
    """A FlaxCLIPTextModel like ``text_encoder`` whose vocabulary has ``num_tokens`` more rows.

    Flax checks parameter shapes against the config, so the grown table needs a model built with
    ``vocab_size = V + n``. The module is otherwise identical (same weights tree, same dtype).
    """
    config = copy.deepcopy(text_encoder.config)
    config.vocab_size = int(config.vocab_size) + int(num_tokens)
    return type(text_encoder)(config, dtype=text_encoder.dtype, _do_init=False)


def conditional_texts(prompts: Sequence[str], token: str, num_tokens: int) -> list[str]:
    """``"<fair> <fair>_1 ... prompt"`` for each prompt: the text the soft tokens are read from."""
    return [" ".join(soft_token_names(token, num_tokens)) + " " + prompt for prompt in prompts]


def conditional_prompt_ids(
    tokenizer, prompts: Sequence[str], token: str, num_tokens: int, *, max_length: int | None = None
) -> np.ndarray:
    """``[B, L]`` int32 ids of ``"<fair> <fair>_1 ... prompt"`` padded to ``max_length``.

    ``tokenizer`` must come from :func:`add_soft_tokens`. This is the text diffusers builds when a user
    writes ``"<fair> prompt"`` after ``load_textual_inversion`` (``maybe_convert_prompt`` expands it).
    """
    names = soft_token_names(token, num_tokens)
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        raise FairdiffError(f"soft tokens {missing} are not in the tokenizer; build it with add_soft_tokens first.")
    texts = conditional_texts(prompts, token, num_tokens)
    length = int(max_length or tokenizer.model_max_length)
    warn_if_cut(tokenizer, texts, length)
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32)


_WARNED_CUTS: set[tuple[tuple[str, ...], int]] = set()


def warn_if_cut(tokenizer, texts: Sequence[str], length: int) -> list[str]:
    """Log the texts longer than ``length`` tokens (with BOS and EOS): the encoder reads them cut, as diffusers'
    pipelines do (they warn too). Once per distinct set of cut texts; returns the cut texts."""
    over = tokenizer(list(texts), truncation=True, max_length=length + 1).input_ids  # one more: cut or not
    cut = [t for t, ids in zip(texts, over) if len(ids) > length]
    if cut and (tuple(cut), length) not in _WARNED_CUTS:
        _WARNED_CUTS.add((tuple(cut), length))
        log.warning(
            "%d text(s) are longer than the text encoder's %d tokens and are cut at the end, e.g. %r; shorten the "
            "prompts or use fewer soft tokens (adaptor.num_tokens)",
            len(cut),
            length,
            cut[0],
        )
    return cut


# "max_length": every text padded to the tokenizer's length (77 for SD; what diffusers' pipelines encode);
# "prompt": padded to the prompt's own length with an attention mask, and "" padded to that length — the
# paper authors' ``tokenizer(prompts, padding=True)`` (sail-sg/finetune-fair-diffusion, exp-*/1-main-debias.py
# and gen-images.py, ``generate_image*``)
PROMPT_PADDINGS = ("max_length", "prompt")


def token_length(tokenizer, texts: Sequence[str]) -> int:
    """The longest tokenised length of ``texts`` (with BOS and EOS), at most the tokenizer's max length."""
    ids = tokenizer(list(texts), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return max(len(row) for row in ids)


def padded_tokens(tokenizer, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, attention_mask)``, each ``[B, length]`` int32: ``texts`` padded (or truncated) to ``length``."""
    out = tokenizer(list(texts), padding="max_length", max_length=int(length), truncation=True)
    return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)


def prompt_ids(tokenizer, prompts: Sequence[str], *, max_length: int | None = None) -> np.ndarray:
    """``[B, L]`` int32 ids of plain prompts (the unconditional "" and base-model prompts)."""
    length = int(max_length or tokenizer.model_max_length)
    warn_if_cut(tokenizer, prompts, length)
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32)
