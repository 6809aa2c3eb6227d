"""Loading diffusers-layout folders without torch: keys, shapes, errors, cache, dtype."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models import load_stable_diffusion, load_unet
from fairdiff_jax.models import loader as loader_mod
from fairdiff_jax.models.convert import convert_pt_state_dict, flax_to_pt_state_dict, pt_key_candidates
from fairdiff_jax.models.safetensors_io import read_safetensors, write_safetensors


def test_loaded_trees_match_the_model_shapes(tiny_sd):
    for module_shapes, params in (
        (loader_mod.unet_param_shapes(tiny_sd.unet), tiny_sd.unet_params),
        (loader_mod.vae_param_shapes(tiny_sd.vae), tiny_sd.vae_params),
        (loader_mod.text_encoder_param_shapes(tiny_sd.text_encoder), tiny_sd.text_encoder_params),
    ):
        expected = {k: tuple(v.shape) for k, v in flatten_dict(module_shapes).items()}
        got = {k: tuple(v.shape) for k, v in flatten_dict(params).items()}
        assert got == expected


def test_pt_names_follow_diffusers_conventions():
    assert pt_key_candidates(("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0", "kernel"))[
        0
    ] == ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight")
    assert pt_key_candidates(("time_embedding", "linear_1", "bias")) == ["time_embedding.linear_1.bias"]
    assert pt_key_candidates(("decoder", "mid_block", "attentions_0", "query", "kernel")) == [
        "decoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.query.weight",
    ]
    assert pt_key_candidates(("text_model", "encoder", "layers", "1", "mlp", "fc1", "kernel"))[0] == (
        "text_model.encoder.layers.1.mlp.fc1.weight"
    )


def test_round_trip_flax_pt_flax_is_exact(tiny_sd):
    state = flax_to_pt_state_dict(tiny_sd.unet_params)
    assert state["conv_in.weight"].shape == (32, 4, 3, 3)  # PyTorch conv layout [O, I, H, W]
    back = convert_pt_state_dict(state, tiny_sd.unet_params, component="unet", source="memory")
    for key, value in flatten_dict(tiny_sd.unet_params).items():
        np.testing.assert_array_equal(np.asarray(value), flatten_dict(back)[key])


def test_legacy_vae_attention_names_load(tiny_sd):
    state = flax_to_pt_state_dict(tiny_sd.vae_params)
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert legacy.keys() != state.keys()
    back = convert_pt_state_dict(legacy, tiny_sd.vae_params, component="vae", source="memory")
    np.testing.assert_array_equal(
        back["decoder"]["mid_block"]["attentions_0"]["query"]["kernel"],
        np.asarray(tiny_sd.vae_params["decoder"]["mid_block"]["attentions_0"]["query"]["kernel"]),
    )


def _copy(src, tmp_path):
    dst = str(tmp_path / "sd")
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_file_and_key_errors_are_one_clear_line(tiny_sd_path, tmp_path):
    with pytest.raises(FairdiffError, match="does not exist"):
        load_stable_diffusion(str(tmp_path / "nowhere"))

    folder = _copy(tiny_sd_path, tmp_path)
    os.remove(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FairdiffError, match=r"unet.*diffusion_pytorch_model\.safetensors"):
        load_unet(folder, cache_dir=None)

    weights = os.path.join(tiny_sd_path, "unet", "diffusion_pytorch_model.safetensors")
    state = read_safetensors(weights)
    del state["conv_in.bias"]
    write_safetensors(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), state)
    with pytest.raises(FairdiffError, match="conv_in.bias") as err:
        load_unet(folder, cache_dir=None)
    assert "\n" not in str(err.value)

    state = read_safetensors(weights)
    state["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
    write_safetensors(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), state)
    with pytest.raises(FairdiffError, match=r"conv_in.weight.*shape"):
        load_unet(folder, cache_dir=None)

    state = read_safetensors(weights)
    state["extra.weight"] = np.zeros((2,), np.float32)
    write_safetensors(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), state)
    with pytest.raises(FairdiffError, match="extra.weight"):
        load_unet(folder, cache_dir=None)


def test_torch_pickle_only_folder_says_how_to_convert(tiny_sd_path, tmp_path):
    folder = _copy(tiny_sd_path, tmp_path)
    os.rename(
        os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"),
        os.path.join(folder, "unet", "diffusion_pytorch_model.bin"),
    )
    with pytest.raises(FairdiffError, match="safe_serialization=True"):
        load_unet(folder, cache_dir=None)


def test_truncated_weights_file_is_reported(tiny_sd_path, tmp_path):
    folder = _copy(tiny_sd_path, tmp_path)
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(FairdiffError, match="truncated"):
        load_unet(folder, cache_dir=None)


def test_conversion_cache_is_used_and_survives_corruption(tiny_sd_path, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    _, first = load_unet(tiny_sd_path, cache_dir=cache)
    entries = os.listdir(cache)
    assert len(entries) == 1

    calls = []
    monkeypatch.setattr(loader_mod, "read_safetensors", lambda path: calls.append(path) or {})
    _, second = load_unet(tiny_sd_path, cache_dir=cache)  # served from the cache: no file read
    assert calls == []
    np.testing.assert_array_equal(np.asarray(first["conv_in"]["kernel"]), np.asarray(second["conv_in"]["kernel"]))

    monkeypatch.undo()
    with open(os.path.join(cache, entries[0]), "wb") as f:
        f.write(b"not msgpack")
    _, third = load_unet(tiny_sd_path, cache_dir=cache)  # corrupt entry: rebuilt from the weights
    np.testing.assert_array_equal(np.asarray(first["conv_in"]["kernel"]), np.asarray(third["conv_in"]["kernel"]))


def test_bfloat16_weights(tiny_sd_path):
    unet, params = load_unet(tiny_sd_path, dtype=jnp.bfloat16, cache_dir=None)
    assert unet.dtype == jnp.bfloat16
    assert {v.dtype for v in flatten_dict(params).values()} == {jnp.dtype(jnp.bfloat16)}


def test_components_subset_and_scheduler(tiny_sd_path):
    sd = load_stable_diffusion(tiny_sd_path, components=("tokenizer", "scheduler"), cache_dir=None)
    assert sd.unet is None and sd.vae is None
    ids = sd.tokenizer("a photo of the face of a doctor, a person", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == sd.tokenizer.bos_token_id
    assert sd.tokenizer.convert_ids_to_tokens(ids[8]) == "doctor</w>"
    alphas = sd.scheduler.alphas_cumprod()
    assert alphas.shape == (1000,) and np.all(np.diff(alphas) < 0)
    with pytest.raises(FairdiffError, match="unknown component"):
        load_stable_diffusion(tiny_sd_path, components=("unet", "safety_checker"))


def test_bad_json_is_reported(tiny_sd_path, tmp_path):
    folder = _copy(tiny_sd_path, tmp_path)
    with open(os.path.join(folder, "unet", "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(FairdiffError, match="cannot parse U-Net config"):
        load_unet(folder, cache_dir=None)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({}, f)
    os.remove(os.path.join(folder, "model_index.json"))
    with pytest.raises(FairdiffError, match="model index"):
        load_stable_diffusion(folder)
