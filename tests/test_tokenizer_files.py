"""The code-built tokenizer files against transformers' own CLIP tokenizer (the outside reference)."""

import os

import pytest

from fairdiff_jax.models.tokenizer_files import DEFAULT_WORDS, write_tokenizer_folder
from fairdiff_jax.toyworld import world


@pytest.mark.parametrize("words", [DEFAULT_WORDS, world.tokenizer_words()], ids=["default", "toy_world"])
def test_every_word_is_one_token_of_its_own(tmp_path, words):
    from transformers import CLIPTokenizer

    write_tokenizer_folder(str(tmp_path), words)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = {}
    for word in sorted(set(w.lower() for w in words)):
        pieces = tokenizer.tokenize(word)
        assert pieces == [word + "</w>"], (word, pieces)
        ids[word] = tokenizer.convert_tokens_to_ids(pieces)[0]
    assert len(set(ids.values())) == len(ids)
    assert "female" not in words or ids["female"] != ids["male"]
    # a caption keeps every word whole, with CLIP's start and end tokens around it
    caption = " ".join(sorted(ids)[:6])
    encoded = tokenizer(caption)["input_ids"]
    assert encoded[1:-1] == [ids[w] for w in caption.split()]
    assert encoded[0] == tokenizer.bos_token_id and encoded[-1] == tokenizer.eos_token_id


def test_the_shipped_toy_world_reads_every_word_whole():
    """Its prompts and the baselines' class words: the soft tokens of the longest prompt still fit in 16 tokens."""
    from transformers import CLIPTokenizer

    from fairdiff_jax.toyworld import build

    if not build.is_complete(build.SHIPPED_DIR):
        pytest.skip("no toy world shipped")
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(build.SHIPPED_DIR, "tokenizer"))
    split = {w: tokenizer.tokenize(w) for w in world.tokenizer_words()}
    assert {w: p for w, p in split.items() if len(p) != 1} == {}
    longest = max(len(tokenizer(world.PROMPT_TEMPLATE.format(occupation=o.name)).input_ids) for o in world.OCCUPATIONS)
    assert longest + 5 <= tokenizer.model_max_length


def test_a_prompt_cut_by_the_token_limit_is_reported(tmp_path, caplog):
    from transformers import CLIPTokenizer

    from fairdiff_jax.adaptors import soft_tokens

    write_tokenizer_folder(str(tmp_path), DEFAULT_WORDS, max_length=8)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    with caplog.at_level("WARNING", logger=soft_tokens.__name__):
        prompts = ["a photo of a doctor", "a photo of a young old doctor nurse"]
        ids = soft_tokens.prompt_ids(tokenizer, prompts)
    assert ids.shape == (2, 8)
    assert "1 text(s) are longer than the text encoder's 8 tokens" in caplog.text and "nurse" in caplog.text
    caplog.clear()
    # once per distinct set of cut texts: the same prompts again log nothing, and the cut ones are returned
    with caplog.at_level("WARNING", logger=soft_tokens.__name__):
        assert soft_tokens.warn_if_cut(tokenizer, prompts, 8) == [prompts[1]]
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger=soft_tokens.__name__):
        soft_tokens.prompt_ids(tokenizer, ["a photo of a young doctor"])  # 6 words + BOS + EOS: exactly 8
    assert caplog.text == ""
