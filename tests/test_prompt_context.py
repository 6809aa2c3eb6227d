"""Prompt context as the paper's authors build it: padded to the prompt's own length with an attention mask.

References: the tokenizer called as in sail-sg/finetune-fair-diffusion's ``generate_image*`` (exp-*/1-main-debias.py:
``tokenizer(prompts, padding=True)`` and ``tokenizer([""], padding="max_length", max_length=L)``), and PyTorch
transformers' ``CLIPTextModel`` given those ids and masks.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.adaptors.soft_tokens import padded_tokens, token_length

PROMPT = "a photo of the face of a doctor, a person"


def test_prompt_padding_matches_the_authors_tokenizer_calls(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    length = token_length(tokenizer, [PROMPT] * 3)
    ids, mask = padded_tokens(tokenizer, [PROMPT] * 3, length)
    theirs = tokenizer([PROMPT] * 3, padding=True)
    np.testing.assert_array_equal(ids, theirs["input_ids"])
    np.testing.assert_array_equal(mask, theirs["attention_mask"])
    assert mask.all() and length < tokenizer.model_max_length
    uncond_ids, uncond_mask = padded_tokens(tokenizer, [""], length)
    theirs = tokenizer([""], padding="max_length", max_length=length, truncation=True)
    np.testing.assert_array_equal(uncond_ids, theirs["input_ids"])
    np.testing.assert_array_equal(uncond_mask, theirs["attention_mask"])
    assert uncond_mask.sum() == 2  # BOS and EOS


def test_masked_flax_text_encoder_matches_pytorch(tiny_sd_path, tiny_sd):
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextModel

    reference = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").eval()
    length = token_length(tiny_sd.tokenizer, [PROMPT])
    for texts in ([PROMPT], [""]):
        ids, mask = padded_tokens(tiny_sd.tokenizer, texts, length)
        ours = tiny_sd.text_encoder(
            jnp.asarray(ids), attention_mask=jnp.asarray(mask), params=tiny_sd.text_encoder_params
        ).last_hidden_state
        with torch.no_grad():
            want = reference(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))
        np.testing.assert_allclose(np.asarray(ours), want.last_hidden_state.numpy(), rtol=1e-4, atol=1e-5)
    # the mask matters for "" (its padding positions), so the choice is not cosmetic
    ids, mask = padded_tokens(tiny_sd.tokenizer, [""], length)
    unmasked = tiny_sd.text_encoder(jnp.asarray(ids), params=tiny_sd.text_encoder_params).last_hidden_state
    masked = tiny_sd.text_encoder(
        jnp.asarray(ids), attention_mask=jnp.asarray(mask), params=tiny_sd.text_encoder_params
    ).last_hidden_state
    assert np.abs(np.asarray(unmasked) - np.asarray(masked)).max() > 1e-3
