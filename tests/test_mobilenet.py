"""MobileNetV3-Large in Flax against a PyTorch reference, and the torchvision state-dict converter.

torchvision from PyPI does not import beside the pinned torch, so the reference below is our own small torch
module that reproduces torchvision's ``mobilenet_v3_large`` module tree (``features.N`` entries; inverted
residual blocks as ``block.J``; ``Conv2dNormActivation`` as ``(conv, bn, act)`` sequentials; squeeze-excitation
with ``fc1``/``fc2``; ``classifier = (Linear, Hardswish, Dropout, Linear)``) and so its state-dict names,
BatchNorm(eps=1e-3) and symmetric padding. It is built from the MobileNetV3 paper's Table 1 independently of the
Flax code (its own channel table and rounding).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.attributes.mobilenet import MobileNetV3Large, init_variables, large_blocks, make_divisible
from fairdiff_jax.attributes.torchvision_convert import (
    convert_torchvision_mobilenet,
    load_torchvision_mobilenet,
    read_state_dict,
    to_torchvision_state_dict,
    torchvision_key,
)
from fairdiff_jax.errors import FairdiffError


def test_channel_rounding_and_torchvision_parameter_count():
    assert [make_divisible(v) for v in (16 * 0.25, 72 * 0.5, 100.0, 1280 * 0.75)] == [8, 40, 104, 960]
    blocks, last = large_blocks(1.0)
    assert (blocks[0].in_channels, blocks[-1].out_channels, last, len(blocks)) == (16, 160, 1280, 15)
    # torchvision's mobilenet_v3_large() (1000 ImageNet classes) has 5,483,032 parameters.
    module = MobileNetV3Large({"imagenet": 1000})
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"])) == 5_483_032


try:
    import torch

    tnn = torch.nn
except ImportError:  # the torch extra is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="parity needs the torch extra (pip install -e .[torch])")
if torch is not None:

    def _divisible(value, divisor=8):
        new = max(divisor, int(value + divisor / 2) // divisor * divisor)
        return new + divisor if new < 0.9 * value else new

    # MobileNetV3-Large, Table 1: kernel, expansion size, out, SE, NL (HS = hard-swish), stride.
    TABLE_1 = [
        (3, 16, 16, False, "RE", 1),
        (3, 64, 24, False, "RE", 2),
        (3, 72, 24, False, "RE", 1),
        (5, 72, 40, True, "RE", 2),
        (5, 120, 40, True, "RE", 1),
        (5, 120, 40, True, "RE", 1),
        (3, 240, 80, False, "HS", 2),
        (3, 200, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1),
        (3, 480, 112, True, "HS", 1),
        (3, 672, 112, True, "HS", 1),
        (5, 672, 160, True, "HS", 2),
        (5, 960, 160, True, "HS", 1),
        (5, 960, 160, True, "HS", 1),
    ]

    def _conv_bn_act(cin, cout, kernel=1, stride=1, groups=1, act=None):
        layers = [
            tnn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            tnn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
        ]
        if act is not None:
            layers.append(act())
        return tnn.Sequential(*layers)

    class TorchSE(tnn.Module):
        def __init__(self, channels, squeeze):
            super().__init__()
            self.avgpool = tnn.AdaptiveAvgPool2d(1)
            self.fc1 = tnn.Conv2d(channels, squeeze, 1)
            self.fc2 = tnn.Conv2d(squeeze, channels, 1)
            self.activation = tnn.ReLU()
            self.scale_activation = tnn.Hardsigmoid()

        def forward(self, x):
            scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
            return scale * x

    class TorchInvertedResidual(tnn.Module):
        def __init__(self, cin, kernel, expanded, cout, use_se, nl, stride):
            super().__init__()
            act = tnn.Hardswish if nl == "HS" else tnn.ReLU
            layers = []
            if expanded != cin:
                layers.append(_conv_bn_act(cin, expanded, act=act))
            layers.append(_conv_bn_act(expanded, expanded, kernel, stride, expanded, act))
            if use_se:
                layers.append(TorchSE(expanded, _divisible(expanded // 4)))
            layers.append(_conv_bn_act(expanded, cout))
            self.block = tnn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            out = self.block(x)
            return out + x if self.residual else out

    class TorchMobileNetV3Large(tnn.Module):
        """torchvision's mobilenet_v3_large tree and names (``_width_mult`` = width)."""

        def __init__(self, num_classes, width=1.0):
            super().__init__()
            scale = lambda c: _divisible(c * width)
            cin = scale(16)
            layers = [_conv_bn_act(3, cin, 3, 2, act=tnn.Hardswish)]
            for kernel, expanded, out, use_se, nl, stride in TABLE_1:
                layers.append(TorchInvertedResidual(cin, kernel, scale(expanded), scale(out), use_se, nl, stride))
                cin = scale(out)
            layers.append(_conv_bn_act(cin, 6 * cin, act=tnn.Hardswish))
            self.features = tnn.Sequential(*layers)
            self.avgpool = tnn.AdaptiveAvgPool2d(1)
            last = scale(1280)
            self.classifier = tnn.Sequential(
                tnn.Linear(6 * cin, last), tnn.Hardswish(), tnn.Dropout(0.2), tnn.Linear(last, num_classes)
            )

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def _random_reference(num_classes, width, seed=0):
        torch.manual_seed(seed)
        model = TorchMobileNetV3Large(num_classes, width)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, tnn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.2)
                    module.running_mean.normal_(0.0, 0.3)
                    module.running_var.uniform_(0.5, 2.0)
                elif isinstance(module, tnn.Linear):
                    module.bias.normal_(0.0, 0.1)
        return model.eval()


def _state_dict_numpy(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _max_relative_error(ours, reference):
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def tiny_pair():
    model = _random_reference(6, 0.25)
    state = _state_dict_numpy(model)
    module, variables = convert_torchvision_mobilenet(state, {"race": 4, "age": 2}, width_multiplier=0.25)
    return model, state, module, variables


@needs_torch
def test_key_names_match_torchvision_tree(tiny_pair):
    model, state, module, variables = tiny_pair
    from flax.traverse_util import flatten_dict

    flax_keys = {torchvision_key(p[1:]) for p in flatten_dict(variables) if not p[1].startswith("head_")}
    torch_keys = {k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("classifier.3")}
    assert flax_keys == torch_keys
    assert torchvision_key(("features_4", "block_2", "fc1", "kernel")) == "features.4.block.2.fc1.weight"
    # and back: our variables load strictly into the torch tree and reproduce its outputs
    exported = to_torchvision_state_dict(variables, ["race", "age"])
    fresh = TorchMobileNetV3Large(6, 0.25).eval()
    missing, unexpected = fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(images).numpy(), model(images).numpy(), rtol=1e-6, atol=1e-6)
    assert torchvision_key(("features_1", "block_0", "bn", "var")) == "features.1.block.0.1.running_var"


@needs_torch
def test_tiny_parity_with_torch_multi_head(tiny_pair):
    model, _, module, variables = tiny_pair
    images = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits = jax.jit(module.apply)(variables, jnp.asarray(images))
    error = _max_relative_error(np.concatenate([logits["race"], logits["age"]], axis=-1), reference)
    print(f"tiny MobileNetV3 (width 0.25, 64x64) parity: max relative error {error:.2e}")
    assert error <= 1e-4
    assert np.std(reference) > 1e-3  # the comparison is not between two near-constant outputs


@needs_torch
def test_head_map_by_slice_and_by_layer_name(tiny_pair):
    model, state, _, variables = tiny_pair
    _, age_only = convert_torchvision_mobilenet(
        {k: v for k, v in state.items()},
        {"age": 2, "rest": 4},
        head_map={"age": (4, 6), "rest": slice(0, 4)},
        width_multiplier=0.25,
    )
    np.testing.assert_array_equal(age_only["params"]["head_age"]["kernel"], variables["params"]["head_age"]["kernel"])
    renamed = {k.replace("classifier.3", "heads.gender"): v for k, v in state.items()}
    renamed["heads.gender.weight"], renamed["heads.gender.bias"] = (
        state["classifier.3.weight"][:2],
        state["classifier.3.bias"][:2],
    )
    _, named = convert_torchvision_mobilenet(
        renamed, {"gender": 2}, head_map={"gender": "heads.gender"}, width_multiplier=0.25
    )
    np.testing.assert_array_equal(named["params"]["head_gender"]["kernel"], state["classifier.3.weight"][:2].T)


@needs_torch
def test_converter_errors_name_the_problem(tiny_pair):
    _, state, _, _ = tiny_pair
    with pytest.raises(FairdiffError, match="features.5.block.1.1.running_var"):
        convert_torchvision_mobilenet(
            {k: v for k, v in state.items() if k != "features.5.block.1.1.running_var"},
            {"race": 4, "age": 2},
            width_multiplier=0.25,
        )
    with pytest.raises(FairdiffError, match="width multiplier"):
        convert_torchvision_mobilenet(state, {"race": 4, "age": 2}, width_multiplier=1.0)
    with pytest.raises(FairdiffError, match="has 6 outputs"):
        convert_torchvision_mobilenet(state, {"race": 4}, width_multiplier=0.25)
    with pytest.raises(FairdiffError, match="do not use"):
        convert_torchvision_mobilenet(
            {**state, "extra.weight": state["classifier.3.weight"]}, {"race": 4, "age": 2}, width_multiplier=0.25
        )
    with pytest.raises(FairdiffError, match="head 'race'"):
        convert_torchvision_mobilenet(
            state, {"race": 4, "age": 2}, head_map={"race": (0, 3), "age": (4, 6)}, width_multiplier=0.25
        )


@needs_torch
def test_read_state_dict_from_pt_and_safetensors(tiny_pair, tmp_path):
    from safetensors.torch import save_file

    model, state, _, variables = tiny_pair
    wrapped = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "lightning.ckpt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    for name in ("lightning.ckpt", "weights.safetensors"):
        loaded = read_state_dict(str(tmp_path / name))
        assert set(loaded) == set(state)
        _, again = load_torchvision_mobilenet(str(tmp_path / name), {"race": 4, "age": 2}, width_multiplier=0.25)
        np.testing.assert_array_equal(
            again["batch_stats"]["features_3"]["block_1"]["bn"]["var"],
            variables["batch_stats"]["features_3"]["block_1"]["bn"]["var"],
        )
    with pytest.raises(FairdiffError, match="does not exist"):
        read_state_dict(str(tmp_path / "missing.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FairdiffError, match="cannot read"):
        read_state_dict(str(tmp_path / "garbage.pt"))


@needs_torch
def test_train_mode_uses_batch_statistics_and_updates_running_stats(tiny_pair):
    _, _, module, variables = tiny_pair
    images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    train_apply = jax.jit(
        lambda v, x, key: module.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
    )
    train_logits, updates = train_apply(variables, images, jax.random.key(0))
    eval_logits = jax.jit(module.apply)(variables, images)
    assert not np.allclose(train_logits["race"], eval_logits["race"], atol=1e-3)
    old = variables["batch_stats"]["features_0"]["bn"]["mean"]
    new = updates["batch_stats"]["features_0"]["bn"]["mean"]
    assert not np.allclose(old, new) and np.all(np.isfinite(new))


@needs_torch
def test_full_width_parity_at_224():
    model = _random_reference(2, 1.0, seed=1)
    module, variables = convert_torchvision_mobilenet(_state_dict_numpy(model), {"gender": 2})
    images = np.random.default_rng(2).uniform(-1, 1, size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    start = time.perf_counter()
    logits = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(images))["gender"])
    error = _max_relative_error(logits, reference)
    print(f"MobileNetV3-Large (224x224) parity: max relative error {error:.2e} ({time.perf_counter() - start:.1f}s)")
    assert error <= 1e-4


def test_init_variables_matches_module_shapes_and_torchvision_init():
    module = MobileNetV3Large({"gender": 2}, width_multiplier=0.25)
    variables = init_variables(module, image_size=32)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree_util.tree_structure(dict(expected)) == jax.tree_util.tree_structure(variables)
    assert all(
        a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(variables))
    )
    stats = variables["batch_stats"]["features_0"]["bn"]
    np.testing.assert_array_equal(stats["var"], np.ones_like(stats["var"]))
    kernel = variables["params"]["features_16"]["conv"]["kernel"]  # 1x1 conv, fan-out = out channels
    assert abs(kernel.std() - np.sqrt(2.0 / kernel.shape[-1])) < 0.1 * np.sqrt(2.0 / kernel.shape[-1])
