"""Attention through ``jax.nn.dot_product_attention``: the patched U-Net, VAE and CLIP attention modules equal
the modules' own (stock) code (float64 inputs; jax's softmax runs in float32), forward and gradient, including
CLIP's causal and padding masks and query chunks that straddle them; and the patched models route through it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers.models import attention_flax, vae_flax
from transformers import CLIPTextConfig
from transformers.models.clip import modeling_flax_clip

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models import attention
from fairdiff_jax.models.attention import attention_implementation

IMPLEMENTATIONS = ["xla", "chunked", "matmul", "auto"]


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _value_and_grads(module, params, inputs, implementation, query_chunk=None, **kwargs):
    """Module output and the gradient of ``sum(weights * output)`` w.r.t. params and the first input."""

    def objective(params, first):
        out = module.apply(params, first, *inputs[1:], **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(_random(out.shape, 99) * out), out

    with attention_implementation(implementation, query_chunk):
        (_, out), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(params, inputs[0])
    return out, grads


def _assert_same(got, expected, rtol=2e-6):
    """Each tree (output, gradients) equal as one vector up to float32 rounding: jax.nn.dot_product_attention
    always takes the softmax in float32, and some leaves (the key bias) have a zero true gradient."""
    for got_tree, expected_tree in zip(
        jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, dict)),
        jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, dict)),
    ):
        a = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(got_tree)])
        b = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(expected_tree)])
        assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_unet_attention_equals_stock_float64(implementation, cross):
    with jax.enable_x64(True):
        module = attention_flax.FlaxAttention(query_dim=32, heads=4, dim_head=8, dtype=jnp.float64)
        assert isinstance(module, attention.FusedFlaxAttention)  # the patch is installed
        hidden = _random((2, 24, 32), 0)
        inputs = (hidden, _random((2, 7, 16), 1)) if cross else (hidden,)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), jax.jit(module.init)(jax.random.PRNGKey(0), *inputs))
        expected = _value_and_grads(module, params, inputs, "stock")
        got = _value_and_grads(module, params, inputs, implementation, query_chunk=8)
        _assert_same(got, expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vae_attention_block_equals_stock_float64(implementation):
    with jax.enable_x64(True):
        module = vae_flax.FlaxAttentionBlock(channels=32, num_head_channels=16, dtype=jnp.float64)
        assert isinstance(module, attention.FusedVAEAttentionBlock)
        inputs = (_random((2, 4, 6, 32), 2),)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), jax.jit(module.init)(jax.random.PRNGKey(1), *inputs))
        _assert_same(
            _value_and_grads(module, params, inputs, implementation, 6),
            _value_and_grads(module, params, inputs, "stock"),
        )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_clip_text_encoder_with_causal_and_padding_masks_equals_stock_float64(implementation):
    """The whole CLIP text transformer (causal self-attention) with right-padded prompts; chunks of 5 query
    rows over 16 tokens fall back to one chunk, chunks of 4 split the causal mask across chunks."""
    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        eos_token_id=49,
    )
    with jax.enable_x64(True):
        module = modeling_flax_clip.FlaxCLIPTextTransformer(config, dtype=jnp.float64)
        ids = jnp.asarray(np.random.default_rng(3).integers(0, 49, (2, 16)))
        mask = jnp.ones((2, 16), jnp.int32).at[1, 11:].set(0)
        positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
        params = jax.jit(module.init)(jax.random.PRNGKey(2), ids, mask, positions)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)

        def run(implementation, chunk):
            def objective(params):
                hidden = module.apply(params, ids, mask, positions, deterministic=True).last_hidden_state
                return jnp.sum(_random(hidden.shape, 98) * hidden), hidden

            with attention_implementation(implementation, chunk):
                return jax.jit(jax.value_and_grad(objective, has_aux=True))(params)

        expected = run("stock", None)
        for chunk in (5, 4):
            _assert_same(run(implementation, chunk), expected)


def test_chunked_causal_attention_equals_masked_reference_float64():
    """Chunked attention with ``is_causal`` and a key mask against attention written out in numpy."""
    with jax.enable_x64(True):
        q, k, v = _random((2, 12, 3, 4), 4), _random((2, 12, 3, 4), 5), _random((2, 12, 3, 4), 6)
        key_mask = np.ones((2, 1, 1, 12), bool)
        key_mask[0, ..., 9:] = False
        with attention_implementation("chunked", query_chunk=4):
            got = attention.attend(q, k, v, mask=jnp.asarray(key_mask), is_causal=True, scale=0.3)
        logits = 0.3 * np.einsum("btnh,bsnh->bnts", q, k)
        allowed = key_mask & np.tril(np.ones((12, 12), bool))[None, None]
        logits = np.where(allowed, logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        # float32 softmax inside jax.nn.dot_product_attention
        np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", probs, v), rtol=1e-5, atol=1e-6)


def test_matmul_attention_gradient_matches_finite_differences_float64():
    """The hand-written backward of the ``matmul`` implementation against central finite differences (float64),
    with a causal and a padding mask, and its output against ``jax.nn.dot_product_attention``'s XLA path."""
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        query, key, value = _random((2, 5, 3, 4), 10), _random((2, 5, 3, 4), 11), _random((2, 5, 3, 4), 12)
        mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)[:, None, None, :]

        def matmul(q, k, v):
            return attention.attend(q, k, v, mask=mask, is_causal=True, implementation="matmul")

        reference = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=True, implementation="xla")
        np.testing.assert_allclose(matmul(query, key, value), reference, rtol=1e-6, atol=1e-7)
        check_grads(matmul, (query, key, value), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_splash_attention_equals_stock(cross):
    """The TPU splash kernel (run by Pallas' interpreter here) in the U-Net's attention module against the module's
    own code, forward and gradient: 24 queries padded to a block of 128, cross-attention's 7 keys padded and
    masked."""
    module = attention_flax.FlaxAttention(query_dim=32, heads=4, dim_head=8)
    hidden = _random((2, 24, 32), 0).astype(jnp.float32)
    inputs = (hidden, _random((2, 7, 16), 1).astype(jnp.float32)) if cross else (hidden,)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), *inputs)
    expected = _value_and_grads(module, params, inputs, "stock")
    _assert_same(_value_and_grads(module, params, inputs, "splash"), expected, rtol=2e-5)


def test_splash_causal_attention_over_two_blocks_equals_xla():
    """Causal splash attention over 130 tokens (two blocks, the second nearly all padding) against XLA's."""
    query, key, value = (_random((1, 130, 2, 8), seed).astype(jnp.float32) for seed in (20, 21, 22))

    def loss(implementation, q, k, v):
        out = attention.attend(q, k, v, is_causal=True, implementation=implementation)
        return jnp.sum(jnp.sin(out)), out

    (_, got), got_grads = jax.value_and_grad(lambda *x: loss("splash", *x), (0, 1, 2), has_aux=True)(query, key, value)
    (_, ref), ref_grads = jax.value_and_grad(lambda *x: loss("xla", *x), (0, 1, 2), has_aux=True)(query, key, value)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    _assert_same(got_grads, ref_grads, rtol=2e-5)


def test_patched_unet_routes_through_attend(tiny_sd, monkeypatch):
    """Every attention layer of the loaded tiny U-Net calls ``attend`` (unless 'stock'), with the same output."""
    calls = []
    original = attention.attend
    monkeypatch.setattr(attention, "attend", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    rng = np.random.default_rng(7)
    latents = jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 16, 32)), jnp.float32)

    def run(implementation):
        with attention_implementation(implementation):
            unet = jax.jit(lambda params: tiny_sd.unet.apply({"params": params}, latents, jnp.array([500]), context))
            return unet(tiny_sd.unet_params).sample

    stock = run("stock")
    assert not calls
    fused = run("auto")
    assert len(calls) == 8  # 4 transformer blocks (1 down, 1 mid, 2 up) x (self, cross)
    np.testing.assert_allclose(fused, stock, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(FairdiffError, match="attention implementation 'flash'"):
        with attention_implementation("flash"):
            pass
    with pytest.raises(FairdiffError, match="query_chunk must be >= 1"):
        with attention_implementation("chunked", query_chunk=0):
            pass


def test_runs_trace_under_their_configured_attention(tiny_sd_path, tmp_path, monkeypatch):
    """``model.attention`` is what the training step and the image generation are traced with; a kernel this
    backend cannot run is refused in one line; an unknown name is refused by the config."""
    import dataclasses
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_world import tiny_config, tiny_run

    from fairdiff_jax import evaluate, train
    from fairdiff_jax.config import load_config

    seen = []

    class Traced(Exception):
        pass

    def record(*args, **kwargs):  # the first thing generation (make_mesh) and training (the loop) call
        seen.append(attention._settings["implementation"])
        raise Traced

    monkeypatch.setattr(evaluate.parallel, "make_mesh", record)
    cfg = tiny_config(tiny_sd_path, "--config.model.attention=xla")
    run = tiny_run(tiny_sd_path, cfg)
    assert run.attention == "xla"
    settings = evaluate.EvalSettings.from_config(cfg)
    with pytest.raises(Traced):
        evaluate.generate_prompt_set(
            run, settings, None, None, [], str(tmp_path / "eval"), soft_tokens=False, model_id="m"
        )
    monkeypatch.undo()
    monkeypatch.setattr(train._TrainLoop, "run", lambda self, *args: record())
    with pytest.raises(Traced):
        train.train(cfg, str(tmp_path / "train"), run=run, progress=False)
    assert seen == ["xla", "xla"] and attention._settings["implementation"] == "auto"

    with pytest.raises(FairdiffError, match=r"model.attention='splash' runs on a TPU only .* use --config.model"):
        evaluate.generate_prompt_set(
            dataclasses.replace(run, attention="splash"), None, None, None, [], str(tmp_path), soft_tokens=False,
            model_id="m",
        )  # fmt: skip
    with pytest.raises(FairdiffError, match="model.attention"):
        load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy.py"),
                    ["--config.model.attention=flash"])  # fmt: skip
