"""Export an adaptor in the formats PyTorch diffusers loads (``fairdiff export`` parses its arguments in
``fairdiff_jax/cli``).

- ``pytorch_lora_weights.safetensors``: PEFT key names (``unet.<module>.lora_A.weight`` [r, in],
  ``lora_B.weight`` [out, r]; ``text_encoder.<module>...``). No ``.alpha`` keys: diffusers then sets PEFT's
  ``lora_alpha = r`` (scaling 1), so ``alpha / rank`` is folded into ``lora_B`` and
  ``pipe.load_lora_weights(OUT)`` at its default scale 1.0 reproduces our delta exactly.
- ``learned_embeds.safetensors``: ``{token: [n, d]}``; ``pipe.load_textual_inversion(path)`` registers
  ``token, token_1, ...`` and expands ``token`` in prompts, as our soft tokens do.
- ``unet_oft/`` (``text_encoder_oft/``): a PEFT OFT adaptor folder (``adapter_config.json`` +
  ``adapter_model.safetensors``); ``PeftModel.from_pretrained(pipe.unet, OUT/unet_oft)`` reproduces our rotations.
- ``adaptor.json`` + ``flax_adaptor/``: the Flax adaptor (orbax) with its base-model fingerprint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from fairdiff_jax.adaptors.lora import lora_modules
from fairdiff_jax.adaptors.oft import export_peft_oft
from fairdiff_jax.adaptors.spec import METADATA_FILE, AdaptorSpec, read_adaptor_metadata
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.convert import pt_module_name
from fairdiff_jax.models.safetensors_io import write_safetensors

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TEXTUAL_INVERSION_NAME = "learned_embeds.safetensors"
OFT_FOLDER_SUFFIX = "_oft"  # OUT/<component>_oft: one PEFT adaptor folder per adapted component


def peft_lora_state_dict(lora_params: Mapping[str, Mapping], *, scale: float) -> dict[str, np.ndarray]:
    """``{"unet.<module>.lora_A.weight": [r, in], "...lora_B.weight": [out, r]}`` (float32, scale folded in B).

    ``lora_params``: ``{component: LoRA tree}`` with component ``unet`` or ``text_encoder``.
    """
    state = {}
    for component, tree in lora_params.items():
        if component not in ("unet", "text_encoder"):
            raise FairdiffError(f"cannot export LoRA for component '{component}'; only unet and text_encoder.")
        for module, factors in lora_modules(tree).items():
            name = f"{component}.{pt_module_name(module)}"
            down = np.asarray(jax.device_get(factors["down"]), dtype=np.float32)
            up = np.asarray(jax.device_get(factors["up"]), dtype=np.float32)
            state[f"{name}.lora_A.weight"] = np.ascontiguousarray(down.T)
            state[f"{name}.lora_B.weight"] = np.ascontiguousarray((np.float32(scale) * up).T)
    return state


def _target_file(out_path: str, default_name: str) -> str:
    if out_path.endswith(".safetensors"):
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        return out_path
    os.makedirs(out_path, exist_ok=True)
    return os.path.join(out_path, default_name)


def export_peft_lora(lora_params: Mapping[str, Mapping], out_path: str, *, scale: float) -> str:
    """Write ``out_path/pytorch_lora_weights.safetensors`` (or ``out_path`` if it is a .safetensors file).

    ``scale`` is ``alpha / rank``; it is folded into ``lora_B`` so diffusers' default scale reproduces it.
    """
    path = _target_file(out_path, LORA_WEIGHTS_NAME)
    write_safetensors(path, peft_lora_state_dict(lora_params, scale=scale), {"format": "pt"})
    return path


def export_textual_inversion(soft_embeddings, token: str, out_path: str) -> str:
    """Write ``{token: [n, d]}`` to ``out_path/learned_embeds.safetensors`` (diffusers textual inversion)."""
    embeds = np.asarray(jax.device_get(soft_embeddings), dtype=np.float32)
    if embeds.ndim != 2:
        raise FairdiffError(f"soft-token embeddings must be [n, d]; got shape {embeds.shape}.")
    path = _target_file(out_path, TEXTUAL_INVERSION_NAME)
    write_safetensors(path, {token: np.ascontiguousarray(embeds)}, {"format": "pt"})
    return path


def export_adaptor(spec: AdaptorSpec, params: Mapping, out_dir: str) -> list[str]:
    """Write every format of one adaptor's parameters into ``out_dir``; returns the written paths."""
    written = []
    if params.get("lora"):
        written.append(export_peft_lora(params["lora"], out_dir, scale=spec.lora_scale))
    if "soft_tokens" in params:
        written.append(export_textual_inversion(params["soft_tokens"], spec.soft_token, out_dir))
    for component, tree in sorted(params.get("oft", {}).items()):
        written.append(export_peft_oft(tree, spec.oft_settings, os.path.join(out_dir, component + OFT_FOLDER_SUFFIX)))
    written.append(os.path.join(out_dir, METADATA_FILE))
    from fairdiff_jax.checkpoints import save_flax_adaptor

    written.append(save_flax_adaptor(out_dir, spec, params))
    return written


def training_folder(workdir: str) -> str:
    """The folder holding ``adaptor.json`` and ``checkpoints/``: ``workdir`` itself, or the ``train/`` folder of a
    ``fairdiff demo`` workdir."""
    if not os.path.isfile(os.path.join(workdir, METADATA_FILE)):
        nested = os.path.join(workdir, "train")
        if os.path.isfile(os.path.join(nested, METADATA_FILE)):
            return nested
    return workdir


def export_run(workdir: str, out_dir: str, *, step: int | None = None, use_ema: bool = True):
    """Export the adaptor of a training run (EMA by default, newest step unless given); returns
    ``(spec, step, written paths)``."""
    from fairdiff_jax.checkpoints import restore_adaptor_item

    if not os.path.isdir(workdir):
        raise FairdiffError(f"workdir {workdir} does not exist; pass the --workdir used for 'fairdiff train'.")
    workdir = training_folder(workdir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FairdiffError(f"--out {out_dir} is a file; give a folder to write the exported adaptor into")
    spec = read_adaptor_metadata(workdir)
    found_step, item = restore_adaptor_item(workdir, step)
    written = export_adaptor(spec, item["ema"] if use_ema else item["params"], out_dir)
    return spec, found_step, written
