"""Debias gender x race over four prompt sets at once (PAPER.md: multi-concept; N = 40, 15k steps).

Prompt sets: occupations, sports, occupations with style and context, personal descriptors.
Usage: ``fairdiff train --config configs/multi_concept.py[:ADAPTOR] --workdir DIR`` (ADAPTOR as in gender.py).
"""

from fairdiff_jax.config import adaptor_from_arg, attribute, base_config


def get_config(arg=None):
    config = base_config()
    config.adaptor.kind = adaptor_from_arg(arg, "multi_concept.py")
    config.attributes.gender = attribute("gender", (0.5, 0.5), factor1=0.2, factor2=0.2)
    config.attributes.race = attribute("race", (0.25, 0.25, 0.25, 0.25), factor1=0.6, factor2=0.3)
    config.loss.lambda_img = 8.0
    config.loss.lambda_face = 0.1
    config.faces.detector = "dlib_cnn"  # the authors' face detector; L_face also needs loss.face_reference_path
    config.loss.face_keep_confidence = 0.8
    config.data.prompts = ("occupations", "sports", "occupations_style", "personal_descriptors")
    config.train.images_per_prompt = 40
    config.eval.images_per_prompt = 160
    config.num_steps = 15_000
    # the authors' prompt context: padded to the prompt's own length with an attention mask (PAPER.md, common)
    config.data.prompt_padding = "prompt"
    return config
