"""Debias gender to 50/50 (PAPER.md: gender; N = 24, lambda_img 8, factors 0.2/0.2, lambda_face 1, 10k steps).

Usage: ``fairdiff train --config configs/gender.py[:ADAPTOR] --workdir DIR`` with ADAPTOR one of
text_lora (default), unet_lora, both, soft_tokens (5 soft tokens, the paper's prompt-prefix variant).
"""

from fairdiff_jax.config import adaptor_from_arg, attribute, base_config


def get_config(arg=None):
    config = base_config()
    config.adaptor.kind = adaptor_from_arg(arg, "gender.py")
    config.attributes.gender = attribute("gender", (0.5, 0.5), factor1=0.2, factor2=0.2)
    config.loss.lambda_img = 8.0
    config.loss.lambda_face = 1.0
    config.faces.detector = "dlib_cnn"  # the authors' face detector; L_face also needs loss.face_reference_path
    config.train.images_per_prompt = 24
    config.eval.images_per_prompt = 60
    config.num_steps = 10_000
    # the authors' prompt context: padded to the prompt's own length with an attention mask (PAPER.md, common)
    config.data.prompt_padding = "prompt"
    return config
