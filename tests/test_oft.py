"""OFT adaptor: orthogonal Cayley blocks, identity at init, and parity with PEFT's OFT in PyTorch.

The parity test exports random (trained-looking) skew parameters in PEFT's format, loads them with
``PeftModel.from_pretrained`` on the diffusers U-Net of the tiny SD folder, and compares noise predictions with
the JAX U-Net run on ``apply_oft`` params, for the exact Cayley transform, PEFT's Neumann series, COFT and
block sharing.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fairdiff_jax.adaptors import oft
from fairdiff_jax.adaptors.lora import UNET_TARGETS
from fairdiff_jax.errors import FairdiffError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_world import PROMPTS, tiny_config, tiny_run  # noqa: E402

TOL = 1e-4


def _random_skews(params, std, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_exact_cayley_is_orthogonal_and_matches_the_inverse_formula():
    settings = oft.OFTSettings(block_size=6)
    skew = np.random.default_rng(0).normal(scale=0.5, size=(3, 15))
    rotations = np.asarray(oft.cayley(jnp.asarray(skew, jnp.float32), settings), np.float64)
    q = np.zeros((3, 6, 6))
    rows, cols = np.triu_indices(6, 1)
    q[:, rows, cols] = skew
    q = q - np.swapaxes(q, 1, 2)
    eye = np.eye(6)
    expected = np.stack([(eye - qb) @ np.linalg.inv(eye + qb) for qb in q])
    np.testing.assert_allclose(rotations, expected, atol=1e-5)
    np.testing.assert_allclose(
        np.einsum("rji,rjk->rik", rotations, rotations), np.broadcast_to(eye, q.shape), atol=1e-5
    )


def test_zero_init_is_the_base_model_and_rotation_preserves_column_norms(tiny_sd):
    settings = oft.OFTSettings(block_size=8)
    params = oft.init_oft(tiny_sd.unet_params, "unet", settings)
    modules = oft.oft_modules(params)
    flat = flatten_dict(tiny_sd.unet_params)
    attention = {p[:-1] for p in flat if len(p) > 3 and p[-1] == "kernel" and p[-3] in ("attn1", "attn2")}
    assert set(modules) == attention and len(modules) % 4 == 0  # every to_q/to_k/to_v/to_out.0, nothing else
    same = flatten_dict(oft.apply_oft(tiny_sd.unet_params, params, settings))
    for module in modules:
        np.testing.assert_array_equal(same[module + ("kernel",)], flat[module + ("kernel",)])
    rotated = flatten_dict(oft.apply_oft(tiny_sd.unet_params, _random_skews(params, 0.3), settings))
    module = sorted(modules)[0]
    before, after = np.asarray(flat[module + ("kernel",)]), np.asarray(rotated[module + ("kernel",)])
    assert np.abs(after - before).max() > 1e-2
    # an orthogonal map on the input side keeps the norm of each output column (kernel [in, out])
    np.testing.assert_allclose(np.linalg.norm(after, axis=0), np.linalg.norm(before, axis=0), rtol=1e-5)


def test_coft_projection_bounds_every_block():
    skew = jnp.asarray(np.random.default_rng(1).normal(size=(4, 28)), jnp.float32)
    projected = np.asarray(oft.project_skew(skew, eps=0.5))
    norms = np.sqrt(2.0) * np.linalg.norm(projected, axis=1)
    np.testing.assert_allclose(norms, 0.5 / np.sqrt(4), rtol=1e-5)
    small = skew * 1e-4
    np.testing.assert_array_equal(np.asarray(oft.project_skew(small, eps=0.5)), np.asarray(small))


def test_bad_settings_are_user_errors(tiny_sd):
    with pytest.raises(FairdiffError, match="exactly one of block_size or num_blocks"):
        oft.OFTSettings(block_size=8, num_blocks=4)
    with pytest.raises(FairdiffError, match="does not divide"):
        oft.init_oft(tiny_sd.unet_params, "unet", oft.OFTSettings(block_size=7))
    params = oft.init_oft(tiny_sd.unet_params, "unet", oft.OFTSettings(block_size=8))
    with pytest.raises(FairdiffError, match="different model or block size"):
        oft.apply_oft(tiny_sd.unet_params, params, oft.OFTSettings(block_size=4))


def test_gradient_flows_into_the_skews(tiny_sd):
    settings = oft.OFTSettings(block_size=8, coft=True, eps=10.0)
    params = _random_skews(oft.init_oft(tiny_sd.unet_params, "unet", settings), 0.05)

    def loss(p):
        kernels = flatten_dict(oft.apply_oft(tiny_sd.unet_params, p, settings))
        return sum(jnp.sum(jnp.sin(kernels[m + ("kernel",)])) for m in oft.oft_modules(p))

    grads = jax.grad(loss)(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


# ----------------------------------------------------------------------------------------- PEFT parity

PARITY_SETTINGS = {
    "cayley": oft.OFTSettings(block_size=8),
    "neumann_blocks": oft.OFTSettings(block_size=0, num_blocks=2, cayley_neumann=True, num_neumann_terms=5),
    "neumann3_shared": oft.OFTSettings(block_size=4, block_share=True, cayley_neumann=True, num_neumann_terms=3),
    "coft": oft.OFTSettings(block_size=8, coft=True, eps=0.3),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(PARITY_SETTINGS))
def test_exported_oft_matches_peft_in_pytorch(tiny_sd, tiny_sd_path, tmp_path, name):
    torch = pytest.importorskip("torch", reason="parity checks need the torch extra: pip install -e '.[torch]'")
    peft = pytest.importorskip("peft", reason="the OFT parity check needs peft: pip install -e '.[torch]'")
    from diffusers import UNet2DConditionModel

    settings = PARITY_SETTINGS[name]
    params = _random_skews(oft.init_oft(tiny_sd.unet_params, "unet", settings), 0.1, seed=3)
    out = oft.export_peft_oft(params, settings, str(tmp_path / "unet_oft"))
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()
    adapted = peft.PeftModel.from_pretrained(
        UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet"), out
    ).eval()

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    timesteps = np.asarray([25, 800])
    context = rng.standard_normal((2, 16, 32)).astype(np.float32)
    unet_params = oft.apply_oft(tiny_sd.unet_params, params, settings)
    ours = np.asarray(
        tiny_sd.unet.apply(
            {"params": unet_params}, jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context)
        ).sample
    )
    with torch.no_grad():
        args = (torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context))
        theirs = adapted(*args).sample.numpy()
        base_eps = base(*args).sample.numpy()
    err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"OFT ({name}) relative error vs peft: {err:.2e}")
    assert err <= TOL
    assert float(np.abs(base_eps - theirs).max() / np.abs(theirs).max()) > 1e-2  # the adaptor is active in peft


# ------------------------------------------------------------------------------ the unet_oft adaptor kind


@pytest.fixture(scope="module")
def oft_world(tiny_sd_path):
    cfg = tiny_config(tiny_sd_path, "--config.adaptor.kind=unet_oft", "--config.adaptor.oft.block_size=8")
    return tiny_run(tiny_sd_path, cfg), cfg


def test_unet_oft_kind_is_registered_and_trained_by_the_train_step(oft_world):
    import optax

    from fairdiff_jax.adaptors import ADAPTOR_KINDS, AdaptorSpec
    from fairdiff_jax.train import make_batch
    from fairdiff_jax.train_step import init_state, make_train_step, step_model

    run, cfg = oft_world
    assert "unet_oft" in ADAPTOR_KINDS and run.spec.oft_targets == {"unet": list(UNET_TARGETS)}
    assert AdaptorSpec.from_json(json.loads(json.dumps(run.spec.to_json()))).oft_settings == run.spec.oft_settings
    optimizer = optax.sgd(1.0)
    state = init_state(run.spec, run.frozen, optimizer, jax.random.PRNGKey(1))
    assert set(state.params) == {"oft"} and all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.params))
    batch = make_batch(run, cfg, PROMPTS[:2], step=1)
    step = jax.jit(make_train_step(step_model(run, cfg), optimizer, axis_name=None))
    new_state, metrics = step(state, run.frozen, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = [float(jnp.abs(x).max()) for x in jax.tree.leaves(new_state.params)]
    assert min(moved) > 0  # every rotated projection received a gradient


@pytest.mark.slow  # a second train-step compilation (~20 s)
def test_coft_parameters_stay_in_their_radius_after_a_train_step(oft_world):
    import optax

    from fairdiff_jax.train import make_batch
    from fairdiff_jax.train_step import init_state, make_train_step, step_model

    run, cfg = oft_world
    optimizer = optax.sgd(1.0)
    batch = make_batch(run, cfg, PROMPTS[:2], step=1)
    # after the update every block is back inside its radius (PEFT's in-place projection)
    cfg_coft = cfg.copy_and_resolve_references()
    cfg_coft.adaptor.oft.coft, cfg_coft.adaptor.oft.eps = True, 1e-3
    coft_run = tiny_run(run.model_folder, cfg_coft)
    coft_step = jax.jit(make_train_step(step_model(coft_run, cfg_coft), optimizer, axis_name=None))
    coft_state, _ = coft_step(
        init_state(coft_run.spec, coft_run.frozen, optimizer, jax.random.PRNGKey(1)), coft_run.frozen, batch
    )
    for skew in jax.tree.leaves(coft_state.params):
        norms = np.sqrt(2.0) * np.linalg.norm(np.asarray(skew), axis=-1)
        assert norms.max() <= 1e-3 / np.sqrt(skew.shape[0]) * (1 + 1e-5) and norms.max() > 0


@pytest.mark.torch
def test_exported_run_loads_into_peft(oft_world, tiny_sd_path, tmp_path):
    torch = pytest.importorskip("torch", reason="parity checks need the torch extra: pip install -e '.[torch]'")
    peft = pytest.importorskip("peft", reason="the OFT parity check needs peft: pip install -e '.[torch]'")
    from diffusers import UNet2DConditionModel

    from fairdiff_jax.adaptors import apply_adaptor, init_adaptor
    from fairdiff_jax.adaptors.export import export_adaptor

    run, _ = oft_world
    params = _random_skews(init_adaptor(jax.random.PRNGKey(0), run.spec, run.frozen["unet"], None), 0.1, seed=5)
    written = export_adaptor(run.spec, params, str(tmp_path))
    assert str(tmp_path / "unet_oft") in written
    adapted = peft.PeftModel.from_pretrained(
        UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet"), str(tmp_path / "unet_oft")
    ).eval()
    unet_params, _ = apply_adaptor(run.spec, params, run.frozen["unet"], run.frozen["text_encoder"])
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 16, 32)).astype(np.float32)
    ours = np.asarray(
        run.pipeline.unet.apply(
            {"params": unet_params}, jnp.asarray(sample), jnp.asarray([500]), jnp.asarray(context)
        ).sample
    )
    with torch.no_grad():
        theirs = adapted(torch.from_numpy(sample), torch.tensor([500]), torch.from_numpy(context)).sample.numpy()
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) <= TOL
