"""Adaptors as pure parameter transforms: the initial trainable tree of a spec, and the frozen weights with it
applied (LoRA deltas added, OFT rotations applied, soft-token rows appended). Trainable parameters are one pytree
``{"lora": {"unet": ..., "text_encoder": ...}, "oft": {component: ...}, "soft_tokens": [n, d]}`` (only the parts
the spec uses).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fairdiff_jax.adaptors import lora as lora_lib
from fairdiff_jax.adaptors import oft as oft_lib
from fairdiff_jax.adaptors import soft_tokens as soft_lib
from fairdiff_jax.adaptors.lora_branch import LoraBranch, kernels_are_float32
from fairdiff_jax.adaptors.spec import AdaptorSpec, _mismatch, _shapes_digest, _weights_of


def init_adaptor(
    key: jax.Array, spec: AdaptorSpec, unet_params: Mapping | None, text_encoder_params: Mapping | None
) -> dict:
    """Initial trainable parameters ``{"lora": {component: tree}, "oft": {component: tree}, "soft_tokens": [n, d]}``
    for ``spec`` (OFT starts at the identity rotation, LoRA at a zero delta)."""
    trees = {"unet": unet_params, "text_encoder": text_encoder_params}
    lora_key, soft_key = jax.random.split(key)
    params: dict = {}
    if spec.lora_rank:
        keys = jax.random.split(lora_key, len(spec.lora_targets))
        params["lora"] = {
            component: lora_lib.init_lora(k, trees[component], patterns, spec.lora_rank)
            for k, (component, patterns) in zip(keys, sorted(spec.lora_targets.items()))
        }
    if spec.oft_targets:
        params["oft"] = {
            component: oft_lib.init_oft(trees[component], patterns, spec.oft_settings)
            for component, patterns in sorted(spec.oft_targets.items())
        }
    if spec.num_soft_tokens:
        table_rows = soft_lib.token_embedding(text_encoder_params).shape[0]
        params["soft_tokens"] = soft_lib.init_soft_tokens(
            soft_key, text_encoder_params, spec.num_soft_tokens, exclude_ids=[table_rows - 2, table_rows - 1]
        )
    return params


def apply_adaptor(
    spec: AdaptorSpec, adaptor_params: Mapping, unet_params: Mapping | None, text_encoder_params: Mapping | None
) -> tuple[Any, Any]:
    """``(unet_params, text_encoder_params)`` with LoRA deltas added and soft-token rows appended.

    Pure (jit/grad over ``adaptor_params``). Checks the base model's layer shapes against the spec's
    fingerprint (values are checked by :func:`check_base_model`, which needs concrete arrays). With soft
    tokens, run the text encoder returned by ``soft_tokens.grow_text_encoder(text_encoder, n)``.
    """
    if (
        spec.fingerprint
        and _shapes_digest(_weights_of(spec, unet_params, text_encoder_params)) != (spec.fingerprint["shapes_sha256"])
    ):
        raise _mismatch(spec, "different layer shapes")
    trees = {"unet": unet_params, "text_encoder": text_encoder_params}
    for component, lora_tree in adaptor_params.get("lora", {}).items():
        trees[component] = lora_lib.apply_lora(trees[component], lora_tree, scale=spec.lora_scale)
    for component, oft_tree in adaptor_params.get("oft", {}).items():
        trees[component] = oft_lib.apply_oft(trees[component], oft_tree, spec.oft_settings)
    if "soft_tokens" in adaptor_params:
        trees["text_encoder"] = soft_lib.apply_soft_tokens(trees["text_encoder"], adaptor_params["soft_tokens"])
    return trees["unet"], trees["text_encoder"]


def project_adaptor(spec: AdaptorSpec, adaptor_params: Mapping) -> Any:
    """The parameters after an optimiser update with COFT's constraint enforced (PEFT projects its OFT parameter
    in place before every forward pass); the identity for every other adaptor."""
    if "oft" not in adaptor_params or not spec.oft_settings.coft:
        return adaptor_params
    projected = dict(adaptor_params)
    projected["oft"] = {c: oft_lib.project_oft(tree, spec.oft_settings) for c, tree in adaptor_params["oft"].items()}
    return projected


def adapt_weights(
    spec: AdaptorSpec, adaptor_params: Mapping, unet_params: Mapping | None, text_encoder_params: Mapping | None
) -> tuple[Any, Any, dict[str, LoraBranch]]:
    """``(unet_params, text_encoder_params, branches)`` for generation: as :func:`apply_adaptor`, except that a
    component whose adapted kernels are not float32 (bf16 frozen weights) keeps its frozen kernels and gets an
    unmerged float32 :class:`~fairdiff_jax.adaptors.lora_branch.LoraBranch` (``branches[component]``), so no
    update is rounded away. Run that component's model through ``lora_branch.with_branch``.
    """
    trees = {"unet": unet_params, "text_encoder": text_encoder_params}
    lora = dict(adaptor_params.get("lora", {}))
    branches = {
        component: LoraBranch(factors, jnp.asarray(spec.lora_scale, jnp.float32))
        for component, factors in lora.items()
        if not kernels_are_float32(trees[component], factors)
    }
    merged = {key: value for key, value in adaptor_params.items() if key != "lora"}
    merged["lora"] = {c: f for c, f in lora.items() if c not in branches}
    unet, text_encoder = apply_adaptor(spec, merged, unet_params, text_encoder_params)
    return unet, text_encoder, branches
