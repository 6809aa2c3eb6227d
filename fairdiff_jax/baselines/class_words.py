"""The words that name each attribute's classes in the baselines' prompts, in the config's class order."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from fairdiff_jax.errors import FairdiffError

# gender 0 = female, 1 = male; race 0 = WMELH, 1 = Black, 2 = Indian, 3 = Asian (PAPER.md's class encodings)
DEFAULT_CLASS_WORDS = {"gender": ("female", "male"), "race": ("white", "black", "indian", "asian")}


def joint_class_words(attributes: Sequence[str], class_words: Mapping[str, Sequence[str]], method: str) -> list[str]:
    """One phrase per joint class of ``attributes`` (``"male"``, or ``"male black"`` for gender x race)."""
    missing = [a for a in attributes if a not in class_words]
    if not attributes or missing:
        raise FairdiffError(
            f"{method} has no class words for attribute(s) {missing or '(none given)'}; known: {sorted(class_words)}. "
            "Add them to the method's class_words, e.g. class_words={'age': ('young', 'old')}."
        )
    return [" ".join(words) for words in itertools.product(*(class_words[a] for a in attributes))]
