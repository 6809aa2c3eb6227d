"""Ethical intervention: a fairness clause appended to the prompt (Bansal et al., EMNLP 2022).

Bansal, Yin, Monajatipoor, Chang, "How well can Text-to-Image Generative Models understand Ethical Natural
Language Interventions?" (arXiv 2210.15230). Their ENTIGEN benchmark appends, after a space, the clause
``"if all individuals can be a {subject} irrespective of their {axis}"`` to the neutral prompt, where
``{subject}`` is the prompt's occupation and ``{axis}`` names the social axis (``gender``, ``race``, and
``gender and race`` when both are intervened on; their intervention files ``neutral_prompts_objects_ei``,
``_eir`` and ``_eigr``). The method changes nothing but the conditional prompt; the unconditional prompt of
classifier-free guidance stays ``""``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from fairdiff_jax.errors import FairdiffError


@dataclasses.dataclass(frozen=True)
class EthicalInterventionConfig:
    """The clause and how the subject is found in a prompt (defaults: Bansal et al.'s wording)."""

    clause: str = "if all individuals can be a {subject} irrespective of their {axis}"
    # the words the clause uses for each attribute of the config (Bansal et al. also use "skin color")
    axis_words: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"gender": "gender", "race": "race"})
    # the subject is the first "of a(n) <subject>" up to a comma or full stop
    # ("A photo of the face of a doctor, a person" -> "doctor")
    subject_pattern: str = r"\bof an? ([^,.]+)"


def axis_phrase(attributes: Sequence[str], config: EthicalInterventionConfig) -> str:
    """``"gender"``, ``"race"`` or ``"gender and race"`` for the debiased attributes, in the given order."""
    if not attributes:
        raise FairdiffError("ethical intervention needs at least one attribute (e.g. gender) to name in its clause.")
    missing = [a for a in attributes if a not in config.axis_words]
    if missing:
        raise FairdiffError(
            f"ethical intervention has no clause word for attribute(s) {missing}; known: {sorted(config.axis_words)}. "
            "Add them to the method's axis_words (e.g. axis_words={'age': 'age'})."
        )
    words = [config.axis_words[a] for a in attributes]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def prompt_subject(prompt: str, config: EthicalInterventionConfig) -> str:
    """The occupation (or other subject) named by ``prompt``, found with ``config.subject_pattern``."""
    match = re.search(config.subject_pattern, prompt)
    if match is None:
        raise FairdiffError(
            f"cannot find the subject of the prompt {prompt!r} with the pattern {config.subject_pattern!r}; pass the "
            "subjects explicitly or set the method's subject_pattern to a regex with one group."
        )
    return match.group(1).strip()


def intervene(
    prompts: Sequence[str],
    attributes: Sequence[str],
    config: EthicalInterventionConfig = EthicalInterventionConfig(),
    *,
    subjects: Sequence[str] | None = None,
) -> list[str]:
    """Each prompt followed by a space and the fairness clause about its subject and the debiased attributes."""
    prompts = list(prompts)
    if subjects is None:
        subjects = [prompt_subject(p, config) for p in prompts]
    if len(subjects) != len(prompts):
        raise FairdiffError(f"got {len(subjects)} subjects for {len(prompts)} prompts; give one subject per prompt.")
    axis = axis_phrase(attributes, config)
    return [f"{p} {config.clause.format(subject=s, axis=axis)}" for p, s in zip(prompts, subjects)]
