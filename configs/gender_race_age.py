"""Debias gender x race and align age to 75% young / 25% old (PAPER.md: + age; N = 40, 15k steps).

Usage: ``fairdiff train --config configs/gender_race_age.py[:ADAPTOR] --workdir DIR`` (ADAPTOR as in gender.py).
"""

from fairdiff_jax.alignment.targets import old_label_young_weight
from fairdiff_jax.config import adaptor_from_arg, attribute, base_config


def get_config(arg=None):
    config = base_config()
    config.adaptor.kind = adaptor_from_arg(arg, "gender_race_age.py")
    config.attributes.gender = attribute("gender", (0.5, 0.5), factor1=0.2, factor2=0.2)
    config.attributes.race = attribute("race", (0.25, 0.25, 0.25, 0.25), factor1=0.6, factor2=0.3)
    # cost_weights: the authors count the "young" probability twice in the transport cost when the target is "old"
    config.attributes.age = attribute(
        "age", (0.75, 0.25), factor1=0.6, factor2=0.3, cost_weights=old_label_young_weight()
    )
    config.loss.lambda_img = 8.0
    config.loss.lambda_face = 0.1
    config.faces.detector = "dlib_cnn"  # the authors' face detector; L_face also needs loss.face_reference_path
    config.loss.face_keep_confidence = 0.75
    config.train.images_per_prompt = 40
    config.eval.images_per_prompt = 160
    config.num_steps = 15_000
    # the authors' prompt context: padded to the prompt's own length with an attention mask (PAPER.md, common)
    config.data.prompt_padding = "prompt"
    return config
