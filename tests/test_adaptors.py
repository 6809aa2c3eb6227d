"""Adaptors as parameter transforms: LoRA, soft tokens, EMA, base-model fingerprint, storage and export."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fairdiff_jax import adaptors as A
from fairdiff_jax.adaptors import export as export_lib
from fairdiff_jax.checkpoints import Checkpointer, load_flax_adaptor, save_flax_adaptor
from fairdiff_jax.cli import export as export_cli
from fairdiff_jax.cli import main as cli_main
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models import load_stable_diffusion, write_tiny_sd_folder
from fairdiff_jax.models.safetensors_io import read_safetensors

RANK, ALPHA, NUM_TOKENS = 4, 8.0, 3


@pytest.fixture(scope="module")
def spec(tiny_sd):
    return A.make_adaptor_spec(
        tiny_sd.unet_params,
        tiny_sd.text_encoder_params,
        base_model="tiny",
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets=["unet", "text_encoder"],
        num_soft_tokens=NUM_TOKENS,
    )


@pytest.fixture(scope="module")
def initial(spec, tiny_sd):
    return A.init_adaptor(jax.random.PRNGKey(0), spec, tiny_sd.unet_params, tiny_sd.text_encoder_params)


def _randomise_up(params, seed, std=0.3):
    """The initial adaptor with non-zero random up-projections (as after training)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [
        std * jax.random.normal(k, leaf.shape) if jax.tree_util.keystr(path).endswith("['up']") else leaf
        for k, (path, leaf) in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.fixture(scope="module")
def trained(initial):
    return _randomise_up(initial, seed=1)


@pytest.fixture(scope="module")
def unet_eps(tiny_sd):
    fn = jax.jit(lambda p, x, t, c: tiny_sd.unet.apply({"params": p}, x, t, c).sample)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    t = jnp.asarray([10, 700])
    c = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    return lambda params: np.asarray(fn(params, x, t, c))


@pytest.fixture(scope="module")
def text_hidden(tiny_sd):
    fn = jax.jit(lambda p, ids: tiny_sd.text_encoder(ids, params=p).last_hidden_state)
    ids = jnp.asarray(A.prompt_ids(tiny_sd.tokenizer, ["a photo of a doctor", ""]))
    return lambda params: np.asarray(fn(params, ids))


def _expected_unet_modules(unet_params):
    return sorted(
        path[:-1]
        for path in flatten_dict(unet_params)
        if len(path) >= 3
        and path[-1] == "kernel"
        and path[-3] in ("attn1", "attn2")
        and path[-2] in ("to_q", "to_k", "to_v", "to_out_0")
    )


def test_targets_match_paper_sets(tiny_sd, initial):
    unet_modules = sorted(flatten_dict(initial["lora"]["unet"]).keys())
    expected = _expected_unet_modules(tiny_sd.unet_params)
    assert len(expected) == 32  # 4 transformer blocks x 2 attentions x 4 projections
    assert sorted({p[:-1] for p in unet_modules}) == expected
    text_modules = {p[:-1] for p in flatten_dict(initial["lora"]["text_encoder"])}
    names = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert text_modules == {
        ("text_model", "encoder", "layers", str(i), b, n)
        for i in range(2)
        for b, n in [
            ("self_attn", "q_proj"),
            ("self_attn", "k_proj"),
            ("self_attn", "v_proj"),
            ("self_attn", "out_proj"),
            ("mlp", "fc1"),
            ("mlp", "fc2"),
        ]
    }
    assert {p[-1] for p in text_modules} == names
    for factors in A.lora.lora_modules(initial["lora"]["unet"]).values():
        assert factors["down"].shape[1] == RANK and factors["up"].shape[0] == RANK
        assert not np.any(np.asarray(factors["up"])) and np.std(np.asarray(factors["down"])) > 0


def test_zero_up_projection_leaves_models_unchanged(spec, tiny_sd, initial, unet_eps, text_hidden, trained):
    unet, text = A.apply_adaptor(spec, {"lora": initial["lora"]}, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    np.testing.assert_array_equal(unet_eps(unet), unet_eps(tiny_sd.unet_params))
    np.testing.assert_array_equal(text_hidden(text), text_hidden(tiny_sd.text_encoder_params))
    # and a trained (non-zero) adaptor does change them, so the comparison above can fail
    unet, text = A.apply_adaptor(spec, {"lora": trained["lora"]}, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    assert np.abs(unet_eps(unet) - unet_eps(tiny_sd.unet_params)).max() > 1e-2
    assert np.abs(text_hidden(text) - text_hidden(tiny_sd.text_encoder_params)).max() > 1e-2


def test_lora_delta_is_the_scaled_low_rank_product(spec, tiny_sd, trained):
    adapted = jax.jit(lambda f, lo: A.apply_lora(f, lo, scale=spec.lora_scale))(
        tiny_sd.unet_params, trained["lora"]["unet"]
    )
    frozen, new = flatten_dict(tiny_sd.unet_params), flatten_dict(adapted)
    modules = A.lora.lora_modules(trained["lora"]["unet"])
    for path, value in frozen.items():
        if path[:-1] in modules and path[-1] == "kernel":
            down = np.asarray(modules[path[:-1]]["down"], np.float64)
            up = np.asarray(modules[path[:-1]]["up"], np.float64)
            expected = np.asarray(value, np.float64) + (ALPHA / RANK) * down @ up
            np.testing.assert_allclose(np.asarray(new[path]), expected, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(value))


def test_gradient_flows_to_lora_only(spec, tiny_sd, initial):
    ids = jnp.asarray(A.prompt_ids(tiny_sd.tokenizer, ["a photo of a nurse"]))

    def loss(lora_tree):
        params = A.apply_lora(tiny_sd.text_encoder_params, lora_tree, scale=spec.lora_scale)
        return jnp.sum(tiny_sd.text_encoder(ids, params=params).last_hidden_state ** 2)

    lora_tree = initial["lora"]["text_encoder"]
    value, grads = jax.jit(jax.value_and_grad(loss))(lora_tree)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora_tree)
    for factors in A.lora.lora_modules(grads).values():  # at up = 0 only the up-projections move
        assert not np.any(np.asarray(factors["down"])) and np.abs(np.asarray(factors["up"])).max() > 0
    # directional derivative against a central difference
    direction = jax.tree_util.tree_map(lambda g: g / (jnp.linalg.norm(g) + 1e-12), grads)
    eps = 1e-3
    shifted = [loss(jax.tree_util.tree_map(lambda p, d, s=s: p + s * eps * d, lora_tree, direction)) for s in (1, -1)]
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    analytic = sum(
        jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction))
    )
    assert np.isfinite(value)
    np.testing.assert_allclose(float(numeric), float(analytic), rtol=2e-2)


def test_soft_token_ids_and_embedding_rows(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    table = np.asarray(A.soft_tokens.token_embedding(tiny_sd.text_encoder_params))
    vocab = table.shape[0]
    grown_tok, ids = A.add_soft_tokens(tokenizer, 5, vocab_size=vocab)
    assert A.soft_token_names("<fair>", 5) == ["<fair>", "<fair>_1", "<fair>_2", "<fair>_3", "<fair>_4"]
    np.testing.assert_array_equal(ids, np.arange(vocab, vocab + 5))
    assert len(tokenizer) == vocab  # the input tokenizer is untouched
    cond = A.conditional_prompt_ids(grown_tok, ["a photo of a doctor"], "<fair>", 5)
    plain = A.prompt_ids(tokenizer, ["a photo of a doctor"])
    n_words = int(np.sum(plain[0] != plain[0, -1])) - 1  # tokens between bos and the first eos/pad
    np.testing.assert_array_equal(cond[0, :1], plain[0, :1])
    np.testing.assert_array_equal(cond[0, 1:6], ids)
    np.testing.assert_array_equal(cond[0, 6 : 6 + n_words], plain[0, 1 : 1 + n_words])
    assert cond.shape == plain.shape and cond[0, 6 + n_words] == tokenizer.eos_token_id
    long = A.conditional_prompt_ids(grown_tok, [" ".join(["doctor"] * 20)], "<fair>", 5)
    assert long[0, -1] == tokenizer.eos_token_id and np.all(long[0, 1:6] == ids)

    key = jax.random.PRNGKey(3)
    init = np.asarray(A.init_soft_tokens(key, tiny_sd.text_encoder_params, 5, exclude_ids=[vocab - 2, vocab - 1]))
    rows = [int(np.flatnonzero(np.all(table == row, axis=1))[0]) for row in init]
    assert len(set(rows)) == 5 and max(rows) < vocab - 2
    grown = A.apply_soft_tokens(tiny_sd.text_encoder_params, jnp.asarray(init))
    new_table = np.asarray(A.soft_tokens.token_embedding(grown))
    assert new_table.shape == (vocab + 5, table.shape[1])
    np.testing.assert_array_equal(new_table[:vocab], table)
    np.testing.assert_array_equal(new_table[vocab:], init)


def test_grown_text_encoder_reads_soft_rows(tiny_sd, text_hidden):
    """Soft tokens set to the embeddings of 'doctor nurse' must encode like the words themselves."""
    tokenizer = tiny_sd.tokenizer
    table = A.soft_tokens.token_embedding(tiny_sd.text_encoder_params)
    grown_tok, _ = A.add_soft_tokens(tokenizer, 2, vocab_size=table.shape[0])
    word_ids = tokenizer.convert_tokens_to_ids(["doctor</w>", "nurse</w>"])
    params = A.apply_soft_tokens(tiny_sd.text_encoder_params, table[jnp.asarray(word_ids)])
    encoder = A.grow_text_encoder(tiny_sd.text_encoder, 2)
    cond = A.conditional_prompt_ids(grown_tok, ["a photo"], "<fair>", 2)
    ours = np.asarray(encoder(cond, params=params).last_hidden_state)
    reference = tiny_sd.text_encoder(
        A.prompt_ids(tokenizer, ["doctor nurse a photo"]), params=tiny_sd.text_encoder_params
    )
    np.testing.assert_allclose(ours, np.asarray(reference.last_hidden_state), rtol=1e-5, atol=1e-5)
    grad = jax.grad(
        lambda s: jnp.sum(
            encoder(cond, params=A.apply_soft_tokens(tiny_sd.text_encoder_params, s)).last_hidden_state ** 2
        )
    )(table[jnp.asarray(word_ids)])
    assert grad.shape == (2, table.shape[1]) and np.abs(np.asarray(grad)).min(axis=1).max() > 0


def test_ema_math():
    params = {"a": jnp.full((3,), 2.0), "b": {"c": jnp.zeros((2, 2))}}
    ema = params
    target = {"a": jnp.full((3,), 5.0), "b": {"c": jnp.ones((2, 2))}}
    step = jax.jit(lambda e, p: A.ema_update(e, p, 0.996))
    for _ in range(10):
        ema = step(ema, target)
    closed_form_a = 5.0 + 0.996**10 * (2.0 - 5.0)
    np.testing.assert_allclose(np.asarray(ema["a"]), closed_form_a, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ema["b"]["c"]), 1.0 - 0.996**10, rtol=1e-5)
    one = A.ema_update({"x": jnp.asarray(1.0)}, {"x": jnp.asarray(3.0)}, 0.75)
    assert float(one["x"]) == pytest.approx(0.75 * 1.0 + 0.25 * 3.0)


def test_different_base_model_is_rejected(spec, tiny_sd, trained, tmp_path):
    A.check_base_model(spec, tiny_sd.unet_params, tiny_sd.text_encoder_params)  # same base: fine
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), (tiny_sd.unet_params, tiny_sd.text_encoder_params))
    A.check_base_model(spec, *bf16)  # same weights in another dtype: fine
    other = load_stable_diffusion(
        write_tiny_sd_folder(str(tmp_path / "other"), seed=5), components=("unet", "text_encoder"), cache_dir=None
    )
    with pytest.raises(FairdiffError, match="trained on base model 'tiny'.*different weight values"):
        A.check_base_model(spec, other.unet_params, other.text_encoder_params)
    save_flax_adaptor(str(tmp_path / "adaptor"), spec, trained)
    with pytest.raises(FairdiffError, match="different weight values"):
        load_flax_adaptor(str(tmp_path / "adaptor"), other.unet_params, other.text_encoder_params)
    loaded_spec, loaded = load_flax_adaptor(str(tmp_path / "adaptor"), tiny_sd.unet_params, tiny_sd.text_encoder_params)
    assert loaded_spec == spec
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, trained)
    layers = dict(tiny_sd.text_encoder_params["text_model"]["encoder"]["layers"])
    del layers["1"]
    fewer = {"text_model": {**tiny_sd.text_encoder_params["text_model"], "encoder": {"layers": layers}}}
    with pytest.raises(FairdiffError, match="different layer shapes"):
        A.apply_adaptor(spec, trained, tiny_sd.unet_params, fewer)
    with pytest.raises(FairdiffError, match="does not exist in the base model"):
        A.apply_lora(fewer, trained["lora"]["text_encoder"], scale=1.0)


def test_peft_export_names_and_shapes(spec, trained, tmp_path):
    path = export_lib.export_peft_lora(trained["lora"], str(tmp_path), scale=spec.lora_scale)
    state = read_safetensors(path)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors" and len(state) == 2 * (32 + 12)
    a = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    b = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    assert a.shape == (RANK, 32) and b.shape == (32, RANK)
    assert "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in state
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in state
    fc1 = state["text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight"]
    assert fc1.shape == (64, RANK)
    assert state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"].shape == (RANK, 32)
    factors = trained["lora"]["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
    flax_delta = (ALPHA / RANK) * np.asarray(factors["down"], np.float64) @ np.asarray(factors["up"], np.float64)
    np.testing.assert_allclose(b.astype(np.float64) @ a.astype(np.float64), flax_delta.T, rtol=1e-5, atol=1e-7)
    embeds = read_safetensors(export_lib.export_textual_inversion(trained["soft_tokens"], "<fair>", str(tmp_path)))
    assert list(embeds) == ["<fair>"] and embeds["<fair>"].shape == (NUM_TOKENS, 32)


def _write_workdir(workdir, spec, trained, initial):
    """A workdir as the train loop leaves it: adaptor.json + checkpoints with adaptor and optimizer items."""
    A.write_adaptor_metadata(workdir, spec)
    with Checkpointer(workdir, save_every=5) as checkpointer:
        for step in (5, 10):
            checkpointer.save(step, {"params": initial, "ema": trained}, {"mu": jnp.ones(3) * step}, {"prompts": {}})


def test_export_command_from_workdir(spec, trained, initial, tmp_path, capsys):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    _write_workdir(workdir, spec, trained, initial)
    assert cli_main(["export", "--workdir", workdir, "--out", out]) == 0
    assert "exported step 10" in capsys.readouterr().out
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "adaptor.json", "flax_adaptor"):
        assert os.path.exists(os.path.join(out, name))
    np.testing.assert_array_equal(
        read_safetensors(os.path.join(out, "learned_embeds.safetensors"))["<fair>"], np.asarray(trained["soft_tokens"])
    )  # the EMA is exported by default
    assert export_cli.main(["--workdir", workdir, "--out", out + "_raw", "--step", "5", "--no-ema"]) == 0
    raw = read_safetensors(os.path.join(out + "_raw", "pytorch_lora_weights.safetensors"))
    assert not np.any(raw["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v.lora_B.weight"])

    with pytest.raises(FairdiffError, match="does not exist"):
        export_cli.main(["--workdir", str(tmp_path / "missing"), "--out", out])
    with pytest.raises(FairdiffError, match="no checkpoint for step 7.*available steps: \\[5, 10\\]"):
        export_cli.main(["--workdir", workdir, "--out", out, "--step", "7"])
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "10", "adaptor")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(FairdiffError, match="cannot restore the 'adaptor' item of checkpoint step 10"):
        export_cli.main(["--workdir", workdir, "--out", out])
    assert cli_main(["export", "--workdir", workdir, "--out", out]) == 2
    assert "fairdiff export: error: cannot restore" in capsys.readouterr().err
