"""Adaptors: what one is (``spec``), LoRA, OFT and soft tokens as parameter transforms (``transform``, ``lora``,
``oft``, ``soft_tokens``), their EMA and the diffusers / PEFT export (``export``). Run checkpoints and exported
Flax adaptors are stored by ``fairdiff_jax.checkpoints``."""

from fairdiff_jax.adaptors.ema import PAPER_EMA_DECAY, ema_update
from fairdiff_jax.adaptors.lora import (
    DEFAULT_TARGETS,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    apply_lora,
    find_lora_targets,
    init_lora,
    lora_delta,
    lora_scale,
)
from fairdiff_jax.adaptors.oft import OFTSettings, apply_oft, export_peft_oft, init_oft
from fairdiff_jax.adaptors.soft_tokens import (
    DEFAULT_TOKEN,
    add_soft_tokens,
    apply_soft_tokens,
    conditional_prompt_ids,
    grow_text_encoder,
    init_soft_tokens,
    prompt_ids,
    soft_token_names,
)
from fairdiff_jax.adaptors.spec import (
    ADAPTOR_KINDS,
    AdaptorSpec,
    base_fingerprint,
    check_base_model,
    make_adaptor_spec,
    read_adaptor_metadata,
    spec_for_kind,
    write_adaptor_metadata,
)
from fairdiff_jax.adaptors.transform import apply_adaptor, init_adaptor, project_adaptor

__all__ = [
    "ADAPTOR_KINDS",
    "DEFAULT_TARGETS",
    "DEFAULT_TOKEN",
    "PAPER_EMA_DECAY",
    "TEXT_ENCODER_TARGETS",
    "UNET_TARGETS",
    "AdaptorSpec",
    "OFTSettings",
    "add_soft_tokens",
    "apply_adaptor",
    "apply_lora",
    "apply_oft",
    "apply_soft_tokens",
    "base_fingerprint",
    "check_base_model",
    "conditional_prompt_ids",
    "ema_update",
    "export_peft_oft",
    "find_lora_targets",
    "grow_text_encoder",
    "init_adaptor",
    "init_lora",
    "init_oft",
    "init_soft_tokens",
    "lora_delta",
    "lora_scale",
    "make_adaptor_spec",
    "project_adaptor",
    "prompt_ids",
    "read_adaptor_metadata",
    "soft_token_names",
    "spec_for_kind",
    "write_adaptor_metadata",
]
