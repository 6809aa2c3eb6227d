"""The toy world as a plug-in world (``config.model.world = "toy"``, registered through the ``fairdiff_jax.worlds``
entry point): its model folder, classifiers, occupation-cue features and occupation prompts."""

from __future__ import annotations

from fairdiff_jax.config.schema import attribute_names
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.worlds import World, WorldPlugin


def validate(cfg) -> None:
    from fairdiff_jax.toyworld.build import is_complete

    if cfg.model.path and not is_complete(cfg.model.path):
        raise FairdiffError(
            f"model.path='{cfg.model.path}' is not a complete toy-world build; leave it empty for the shipped world "
            "or build one with fairdiff_jax.toyworld.build.build_toy_world(folder)"
        )


def check_training(cfg) -> None:
    """The toy world's 8x8 pictures have no faces: L_face and factor2 stay off (one line otherwise)."""
    from fairdiff_jax.face_terms import face_terms_requested

    if face_terms_requested(cfg):
        raise FairdiffError(
            "the toy world has no faces, so the face terms cannot be used there; train with "
            "--config.loss.lambda_face=0 and --config.attributes.<name>.factor2=1"
        )


def build(cfg) -> World:
    """The shipped (or ``$FAIRDIFF_TOY_WORLD``, or ``model.path``) toy world, scored for ``cfg``'s attributes."""
    from fairdiff_jax.toyworld import build as toy_build
    from fairdiff_jax.toyworld import classifiers as toy_classifiers
    from fairdiff_jax.toyworld import world as toy_world

    names = attribute_names(cfg)
    folder = cfg.model.path or toy_build.ensure_toy_world()
    params = toy_classifiers.load_classifiers(folder)

    def classify(p, images):
        logits, valid = toy_classifiers.classify({"attributes": p["attributes"]}, images)
        return {n: logits[n] for n in names}, valid

    def cue_features(p, images):  # semantics of the toy world: the occupation cue (logits: softmax saturates)
        logits, _ = toy_classifiers.classify({"cue": p["cue"]}, images)
        return logits["occupation"]

    def prompts(held_out):
        return [toy_world.PROMPT_TEMPLATE.format(occupation=o) for o in toy_world.split(held_out)]

    return World(
        model_folder=folder,
        components=toy_build.COMPONENTS,  # pixel space: no VAE
        classifier=classify,
        classifier_params=params,
        feature_fns=(cue_features,),
        feature_params=(params,),
        prompts={"train": prompts(False), "debiased": prompts(False), "held_out": prompts(True)},
    )


TOY_WORLD = WorldPlugin(build=build, validate=validate, check_training=check_training)
