"""The authors' released adaptors: imported without torch, they reproduce the authors' loader, and load in diffusers.

The test writes ``.pth`` files in the authors' format with torch (their key names and shapes, as
``*/2-export-checkpoint.py`` of sail-sg/finetune-fair-diffusion produces them with diffusers 0.19.3; random
values, rank 3, on the tiny SD folder). The PyTorch reference applies them as their ``gen-images.py`` does:
each adapted Linear computes ``W x + up(down(x))``; the prefix embedding replaces the embeddings of the
``<common-token1..5>`` positions by ``token_embedding[k] + position_embedding[pos]``, with the tokens joined
to the prompt without a space. Our imported Flax adaptor and the exported diffusers files must match it.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="writing the authors' .pth files needs the torch extra")
pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft: pip install -e '.[torch]'")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from fairdiff_jax import adaptors as A  # noqa: E402
from fairdiff_jax.adaptors import authors  # noqa: E402
from fairdiff_jax.adaptors.torch_pickle import load_torch_state_dict  # noqa: E402
from fairdiff_jax.checkpoints import load_flax_adaptor  # noqa: E402
from fairdiff_jax.cli import import_adaptor  # noqa: E402
from fairdiff_jax.cli import main as cli_main  # noqa: E402
from fairdiff_jax.errors import FairdiffError  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-4
RANK, NUM_TOKENS = 3, 5
PROMPTS = ["a photo of a doctor", "a photo of the face of a nurse"]


def _rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _factors(gen, fan_in, fan_out):
    down = 0.3 * torch.randn(RANK, fan_in, generator=gen)
    return down, 0.3 * torch.randn(fan_out, RANK, generator=gen)


def _authors_text_lora(text_encoder, gen):
    """``_modify_text_encoder(..., patch_mlp=True)``'s state dict: q/k/v/out_proj and fc1/fc2 of every layer."""
    state = {}
    for i, layer in enumerate(text_encoder.text_model.encoder.layers):
        for prefix, block, names in [("self_attn", layer.self_attn, ("q", "k", "v", "out")), ("mlp", layer.mlp, ())]:
            linears = [f"{n}_proj" for n in names] if names else ["fc1", "fc2"]
            for linear in linears:
                module = getattr(block, linear)
                down, up = _factors(gen, module.in_features, module.out_features)
                key = f"text_model.encoder.layers.{i}.{prefix}.{linear}.lora_linear_layer"
                state[f"{key}.down.weight"], state[f"{key}.up.weight"] = down, up
    return state


def _authors_unet_lora(unet, gen):
    """``AttnProcsLayers({name: LoRAAttnProcessor(hidden_size, cross_attention_dim, rank)})``'s state dict."""
    state = {}
    for name in unet.attn_processors:
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        shapes = {"to_q": (hidden, hidden), "to_k": (cross or hidden, hidden), "to_v": (cross or hidden, hidden)}
        shapes["to_out"] = (hidden, hidden)
        for proj, (fan_in, fan_out) in shapes.items():
            down, up = _factors(gen, fan_in, fan_out)
            state[f"{name}.{proj}_lora.down.weight"], state[f"{name}.{proj}_lora.up.weight"] = down, up
    return state


class _FairEmbeddings(torch.nn.Module):
    """The parameter layout of the authors' FairEmbeddings (gen-images.py): its state dict is their file."""

    def __init__(self, text_encoder, gen):
        super().__init__()
        embeddings = text_encoder.text_model.embeddings
        self.position_embedding = torch.nn.Embedding.from_pretrained(embeddings.position_embedding.weight.clone())
        positions = text_encoder.config.max_position_embeddings
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)))
        self.token_embedding = torch.nn.Embedding(NUM_TOKENS + 1, embeddings.token_embedding.embedding_dim)
        with torch.no_grad():
            self.token_embedding.weight.copy_(
                0.5 * torch.randn(NUM_TOKENS + 1, self.token_embedding.embedding_dim, generator=gen)
            )
            self.token_embedding.weight[0] = 0.0


@pytest.fixture(scope="module")
def torch_base(tiny_sd_path):
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()
    return text_encoder, unet


@pytest.fixture(scope="module")
def authors_files(torch_base, tmp_path_factory):
    """``{kind: (path, state dict of torch tensors)}`` written with torch.save as their export script does."""
    text_encoder, unet = torch_base
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("authors")
    states = {
        "text_lora": _authors_text_lora(text_encoder, gen),
        "unet_lora": _authors_unet_lora(unet, gen),
        "soft_tokens": _FairEmbeddings(text_encoder, gen).state_dict(),
    }
    files = {}
    for kind, state in states.items():
        path = str(folder / authors.AUTHORS_FILES[kind])
        torch.save(state, path)
        files[kind] = (path, state)
    return files


@pytest.fixture(scope="module")
def imported(tiny_sd_path, authors_files, tmp_path_factory):
    """``fairdiff import`` into two folders: text+U-Net LoRA together, and the soft tokens."""
    lora_out, soft_out = str(tmp_path_factory.mktemp("lora")), str(tmp_path_factory.mktemp("soft"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAIRDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        args = ["--base", tiny_sd_path, "--kind", "text_lora", "--source", authors_files["text_lora"][0]]
        args += ["--kind", "unet_lora", "--source", authors_files["unet_lora"][0], "--out", lora_out]
        assert cli_main(["import", *args]) == 0
        args = ["--base", tiny_sd_path, "--kind", "soft_tokens", "--source", authors_files["soft_tokens"][0]]
        assert cli_main(["import", *args, "--out", soft_out]) == 0
    return lora_out, soft_out


def _add_lora_hooks(modules_and_factors):
    """The authors' LoRA layer on each Linear: its output plus ``up(down(x))``."""

    def hook(down, up):
        return lambda module, inputs, output: output + inputs[0] @ down.T @ up.T

    return [m.register_forward_hook(hook(d, u)) for m, d, u in modules_and_factors]


def _module(root, dotted):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


@pytest.fixture(scope="module")
def reference_text_hidden(torch_base, authors_files):
    """``ids -> last hidden state`` of the authors' text-encoder LoRA applied in PyTorch."""
    text_encoder, _ = torch_base
    state = authors_files["text_lora"][1]
    modules = sorted({k.rsplit(".lora_linear_layer.", 1)[0] for k in state})
    hooks = [
        (
            _module(text_encoder, m),
            state[f"{m}.lora_linear_layer.down.weight"],
            state[f"{m}.lora_linear_layer.up.weight"],
        )
        for m in modules
    ]

    def run(ids):
        handles = _add_lora_hooks(hooks)
        try:
            with torch.no_grad():
                return text_encoder(torch.from_numpy(np.asarray(ids)).long())[0].numpy()
        finally:
            for handle in handles:
                handle.remove()

    return run


@pytest.fixture(scope="module")
def unet_inputs():
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 16, 32)).astype(np.float32)
    return sample, np.asarray([25, 800]), context


def _torch_unet(unet, inputs):
    with torch.no_grad():
        return unet(*(torch.from_numpy(x) for x in inputs)).sample.numpy()


@pytest.fixture(scope="module")
def reference_unet_eps(torch_base, authors_files, unet_inputs):
    """The authors' U-Net LoRA (LoRAAttnProcessor: to_q/k/v/out.0 each plus up(down(x))) in PyTorch."""
    _, unet = torch_base
    state = authors_files["unet_lora"][1]
    hooks = []
    for name in unet.attn_processors:
        attention = _module(unet, name[: -len(".processor")])
        for proj, linear in [("to_q", attention.to_q), ("to_k", attention.to_k), ("to_v", attention.to_v)]:
            hooks.append((linear, state[f"{name}.{proj}_lora.down.weight"], state[f"{name}.{proj}_lora.up.weight"]))
        hooks.append(
            (attention.to_out[0], state[f"{name}.to_out_lora.down.weight"], state[f"{name}.to_out_lora.up.weight"])
        )
    handles = _add_lora_hooks(hooks)
    try:
        return _torch_unet(unet, unet_inputs)
    finally:
        for handle in handles:
            handle.remove()


def _authors_soft_token_reference(tiny_sd_path, text_encoder, state, prompt):
    """(ids, last hidden state) as gen-images.py builds them: tokens added, joined without a space, replaced rows."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    names = authors.authors_token_names(NUM_TOKENS)
    tokenizer.add_tokens(names)
    token_ids = tokenizer.convert_tokens_to_ids(names)
    ids = tokenizer(["".join(names) + prompt], padding=True, return_tensors="pt").input_ids
    fair = torch.zeros_like(ids)
    for k, token_id in enumerate(token_ids):
        fair[ids == token_id] = k + 1
    positions = torch.arange(ids.shape[1])[None]
    fair_embeds = state["token_embedding.weight"][fair] + state["position_embedding.weight"][positions]

    def replace(module, inputs, output):
        return torch.where((fair != 0)[..., None], fair_embeds, output)

    base_ids = torch.where(fair != 0, torch.zeros_like(ids), ids)  # rows the base table has; replaced anyway
    handle = text_encoder.text_model.embeddings.register_forward_hook(replace)
    try:
        with torch.no_grad():
            hidden = text_encoder(base_ids)[0].numpy()
    finally:
        handle.remove()
    return ids.numpy(), hidden


def test_import_writes_the_export_layout(imported, tiny_sd_path):
    lora_out, soft_out = imported
    assert sorted(os.listdir(lora_out)) == [
        "adaptor.json",
        "flax_adaptor",
        "imported.json",
        "pytorch_lora_weights.safetensors",
    ]
    assert sorted(os.listdir(soft_out)) == [
        "adaptor.json",
        "flax_adaptor",
        "imported.json",
        "learned_embeds.safetensors",
    ]
    spec = A.read_adaptor_metadata(lora_out)
    assert (spec.lora_rank, spec.lora_alpha, sorted(spec.lora_targets)) == (RANK, float(RANK), ["text_encoder", "unet"])
    soft_spec = A.read_adaptor_metadata(soft_out)
    assert (soft_spec.num_soft_tokens, soft_spec.lora_rank) == (NUM_TOKENS, 0)
    with open(os.path.join(soft_out, "imported.json"), encoding="utf-8") as f:
        provenance = json.load(f)
    assert provenance["authors_tokens"] == [f"<common-token{i}>" for i in range(1, 6)]
    assert provenance["prompt_context"]["padding"] == "prompt_length"


def test_text_lora_matches_the_authors_loader_and_diffusers(tiny_sd, tiny_sd_path, imported, reference_text_hidden):
    lora_out, _ = imported
    spec, params = load_flax_adaptor(lora_out, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    _, text_params = A.apply_adaptor(spec, params, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    ids = A.prompt_ids(tiny_sd.tokenizer, PROMPTS + [""])
    reference = reference_text_hidden(ids)
    ours = np.asarray(tiny_sd.text_encoder(jnp.asarray(ids), params=text_params).last_hidden_state)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    with torch.no_grad():
        base = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
        pipe.load_lora_weights(lora_out)
        diffusers_hidden = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    errors = _rel_err(ours, reference), _rel_err(diffusers_hidden, reference)
    print(f"text-encoder LoRA vs the authors' loader: ours {errors[0]:.2e}, exported file in diffusers {errors[1]:.2e}")
    assert max(errors) < TOL
    assert _rel_err(base, reference) > 1e-2  # the LoRA changes the output, so the checks above can fail


def test_unet_lora_matches_the_authors_loader_and_diffusers(
    tiny_sd, tiny_sd_path, imported, reference_unet_eps, unet_inputs
):
    lora_out, _ = imported
    spec, params = load_flax_adaptor(lora_out, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    unet_params, _ = A.apply_adaptor(spec, params, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    sample, timesteps, context = (jnp.asarray(x) for x in unet_inputs)
    ours = np.asarray(tiny_sd.unet.apply({"params": unet_params}, sample, timesteps, context).sample)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    base = _torch_unet(pipe.unet, unet_inputs)
    pipe.load_lora_weights(lora_out)
    diffusers_eps = _torch_unet(pipe.unet, unet_inputs)
    errors = _rel_err(ours, reference_unet_eps), _rel_err(diffusers_eps, reference_unet_eps)
    print(f"U-Net LoRA vs the authors' loader: ours {errors[0]:.2e}, exported file in diffusers {errors[1]:.2e}")
    assert max(errors) < TOL
    assert _rel_err(base, reference_unet_eps) > 1e-2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_soft_tokens_match_the_authors_loader_and_diffusers(
    tiny_sd, tiny_sd_path, torch_base, authors_files, imported, prompt
):
    _, soft_out = imported
    text_encoder, _ = torch_base
    ids, reference = _authors_soft_token_reference(tiny_sd_path, text_encoder, authors_files["soft_tokens"][1], prompt)
    spec, params = load_flax_adaptor(soft_out, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    vocab = A.soft_tokens.token_embedding(tiny_sd.text_encoder_params).shape[0]
    tokenizer, _ = A.add_soft_tokens(tiny_sd.tokenizer, NUM_TOKENS, spec.soft_token, vocab_size=vocab)
    ours_ids = A.conditional_prompt_ids(tokenizer, [prompt], spec.soft_token, NUM_TOKENS, max_length=ids.shape[1])
    np.testing.assert_array_equal(ours_ids, ids)  # "<fair> <fair>_1 ... prompt" = their tokens joined without space
    _, text_params = A.apply_adaptor(spec, params, tiny_sd.unet_params, tiny_sd.text_encoder_params)
    encoder = A.grow_text_encoder(tiny_sd.text_encoder, NUM_TOKENS)
    ours = np.asarray(encoder(jnp.asarray(ours_ids), params=text_params).last_hidden_state)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_textual_inversion(os.path.join(soft_out, "learned_embeds.safetensors"))
    text = pipe.maybe_convert_prompt(f"{spec.soft_token} {prompt}", pipe.tokenizer)
    torch_ids = pipe.tokenizer([text], padding=True, return_tensors="pt").input_ids
    np.testing.assert_array_equal(torch_ids.numpy(), ids)
    with torch.no_grad():
        diffusers_hidden = pipe.text_encoder(torch_ids)[0].numpy()
        plain = pipe.text_encoder(pipe.tokenizer([prompt], return_tensors="pt").input_ids)[0].numpy()
    errors = _rel_err(ours, reference), _rel_err(diffusers_hidden, reference)
    print(f"soft tokens vs the authors' loader: ours {errors[0]:.2e}, exported file in diffusers {errors[1]:.2e}")
    assert max(errors) < TOL
    assert _rel_err(plain[:, -2:], reference[:, -2:]) > 1e-2  # the prefix changes the prompt's own positions


# --- every key and shape is checked against the base model; each problem is one line --------------------------


def _numpy_state(authors_files, kind):
    return load_torch_state_dict(authors_files[kind][0])


def _refused(state_by_kind, tiny_sd, match):
    sources = [(kind, state, f"{kind}.pth") for kind, state in state_by_kind.items()]
    with pytest.raises(FairdiffError, match=match) as err:
        authors.authors_adaptor(sources, tiny_sd.unet_params, tiny_sd.text_encoder_params, base_model="tiny")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unknown_missing_and_misshaped_keys_are_refused(tiny_sd, authors_files):
    state = _numpy_state(authors_files, "text_lora")
    key = "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"
    extra = {**state, "text_model.encoder.layers.9.mlp.fc1.lora_linear_layer.down.weight": state[key]}
    _refused({"text_lora": extra}, tiny_sd, r"1 key\(s\) that the text_encoder LoRA .* does not have .*layers\.9")
    _refused({"text_lora": {k: v for k, v in state.items() if k != key}}, tiny_sd, r"lacks 1 key\(s\) .*q_proj")
    _refused({"text_lora": {**state, key: state[key][:, :-1]}}, tiny_sd, r"expected \[r, 32\]")
    up = key.replace(".down.", ".up.")
    _refused({"text_lora": {**state, key: state[key][:2], up: state[up][:, :2]}}, tiny_sd, r"mixes LoRA ranks \[2, 3\]")
    unet = _numpy_state(authors_files, "unet_lora")
    _refused({"text_lora": unet}, tiny_sd, r"check --kind")  # a U-Net file passed as text_lora
    bad = {**unet, next(iter(unet)): np.full_like(unet[next(iter(unet))], np.nan)}
    _refused({"unet_lora": bad}, tiny_sd, "NaN")


def test_soft_token_files_are_checked(tiny_sd, authors_files):
    state = _numpy_state(authors_files, "soft_tokens")
    assert sorted(state) == ["position_embedding.weight", "position_ids", "token_embedding.weight"]
    _refused({"soft_tokens": {**state, "token_embedding.bias": state["position_ids"]}}, tiny_sd, "token_embedding.bias")
    table = state["token_embedding.weight"]
    _refused({"soft_tokens": {**state, "token_embedding.weight": table[:, :16]}}, tiny_sd, r"expected \[n \+ 1, 32\]")
    shifted = {**state, "position_embedding.weight": state["position_embedding.weight"] + 0.5}
    _refused({"soft_tokens": shifted}, tiny_sd, "differs from the base model")
    _refused({"soft_tokens": {"position_ids": state["position_ids"]}}, tiny_sd, "lacks 'token_embedding.weight'")
    spec, params = authors.authors_adaptor(
        [("soft_tokens", state, "x.pth")], None, tiny_sd.text_encoder_params, base_model="tiny"
    )
    np.testing.assert_array_equal(params["soft_tokens"], table[1:])  # row 0 (every other token) is dropped
    assert spec.num_soft_tokens == NUM_TOKENS


def test_the_command_refuses_a_wrong_base_and_a_full_out_folder(tiny_sd_path, authors_files, tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRDIFF_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other_sd"
    from fairdiff_jax.models import write_tiny_sd_folder

    write_tiny_sd_folder(str(other), seed=0, text_encoder_config={**_tiny_text_config(), "intermediate_size": 96})
    args = ["--kind", "text_lora", "--source", authors_files["text_lora"][0], "--out", str(tmp_path / "out")]
    with pytest.raises(FairdiffError, match=r"expected \[r, 96\]|\[96, r\]"):
        import_adaptor.main(args + ["--base", str(other)])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    args = ["--kind", "soft_tokens", "--source", authors_files["soft_tokens"][0], "--base", tiny_sd_path]
    with pytest.raises(FairdiffError, match="not empty"):
        import_adaptor.main(args + ["--out", str(tmp_path / "full")])
    with pytest.raises(FairdiffError, match="only replaces adaptors"):
        import_adaptor.main(args + ["--out", str(tmp_path / "full"), "--overwrite"])
    assert (tmp_path / "full" / "notes.txt").exists()
    with pytest.raises(FairdiffError, match="one --kind per --source"):
        import_adaptor.main(["--kind", "soft_tokens", "--base", tiny_sd_path, "--out", str(tmp_path / "o")])


def _tiny_text_config():
    from fairdiff_jax.models.tiny import TINY_TEXT_ENCODER

    return dict(TINY_TEXT_ENCODER)


def test_the_command_prints_one_line_for_a_file_that_runs_code(tiny_sd_path, tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'code_ran'}",))

    path = str(tmp_path / "text_encoder_lora_EMA.pth")
    torch.save({"text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": RunsCode()}, path)
    args = ["import", "--kind", "text_lora", "--source", path, "--base", tiny_sd_path, "--out", str(tmp_path / "o")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fairdiff import: error: ") and "posix.system" in err and "\n" not in err
    assert not (tmp_path / "code_ran").exists() and not (tmp_path / "o").exists()
