"""Debias race to uniform over (WMELH, Black, Indian, Asian) (PAPER.md: race; N = 32, 12k steps).

Usage: ``fairdiff train --config configs/race.py[:ADAPTOR] --workdir DIR`` (ADAPTOR as in gender.py).
"""

from fairdiff_jax.config import adaptor_from_arg, attribute, base_config


def get_config(arg=None):
    config = base_config()
    config.adaptor.kind = adaptor_from_arg(arg, "race.py")
    config.attributes.race = attribute("race", (0.25, 0.25, 0.25, 0.25), factor1=0.6, factor2=0.3)
    config.loss.lambda_img = 6.0
    config.loss.lambda_face = 0.1
    config.faces.detector = "dlib_cnn"  # the authors' face detector; L_face also needs loss.face_reference_path
    config.train.images_per_prompt = 32
    config.eval.images_per_prompt = 80
    config.num_steps = 12_000
    # the authors' prompt context: padded to the prompt's own length with an attention mask (PAPER.md, common)
    config.data.prompt_padding = "prompt"
    return config
