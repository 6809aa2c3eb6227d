"""Which classifier scores an evaluation: ``attributes.<name>.eval_classifier`` where set, else the training one.

The paper scores its tables with classifiers trained separately from the ones that guide training (held-out
CelebA / FairFace MobileNetV3s; sail-sg/finetune-fair-diffusion, eval-generated-images.py). Scoring with the
training classifier overstates debiasing (the adaptor was optimised against it), so every evaluation records,
per attribute, which classifier scored, and the table says so.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

TRAINING = "training classifier"


@dataclasses.dataclass(frozen=True, eq=False)
class Scoring:
    """The evaluation classifier ``(params, images) -> (logits, valid)``, its parameters and, per attribute, what
    scored it (``"eval_classifier PATH"`` or ``"training classifier"``)."""

    classifier: Any
    params: Any
    scored_by: Mapping[str, str]

    @property
    def uses_training_classifier(self) -> bool:
        return any(source == TRAINING for source in self.scored_by.values())


def scoring_classifier(cfg, run) -> Scoring:
    """The :class:`Scoring` of ``cfg``: the run's own classifier when no ``eval_classifier`` is set, else the
    classifier folders of ``attributes.<name>.eval_classifier`` (``.classifier`` for attributes without one)."""
    names = list(run.task.attributes)
    separate = {n: str(cfg.attributes[n].eval_classifier) for n in names if cfg.attributes[n].eval_classifier}
    if not separate:
        return Scoring(run.classifier, run.frozen["classifier"], {n: TRAINING for n in names})
    from fairdiff_jax.worlds.stable_diffusion import load_classifier

    eval_cfg = copy.deepcopy(cfg)
    for name, path in separate.items():
        eval_cfg.attributes[name].classifier = path
    classifier, params, _ = load_classifier(eval_cfg, names)  # it finds the faces itself
    return Scoring(
        classifier, params, {n: f"eval_classifier {separate[n]}" if n in separate else TRAINING for n in names}
    )


def scored_by_note(scored_by: Mapping[str, str]) -> str:
    """One line for a table: which classifier scored each attribute, with a warning for the training one."""
    parts = ", ".join(f"{name}: {source}" for name, source in scored_by.items())
    note = f"Scored by: {parts}."
    if TRAINING in scored_by.values():
        note += (
            " The training classifier scored (no attributes.<name>.eval_classifier set), which overstates debiasing;"
            " the paper scores with separately trained classifiers."
        )
    return note
