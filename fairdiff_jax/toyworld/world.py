"""The toy world: 8x8 RGB pictures of "a person" whose protected attributes are visible, with a known bias.

Each picture shows a figure on a muted background. The attributes are drawn as:

- gender (0 female, 1 male): hair shape — long hair down both sides of the face vs short hair on top;
- race (0 WMELH, 1 Black, 2 Indian, 3 Asian): one of four distinct skin tones;
- age (0 young, 1 old): hair colour — dark vs grey;
- occupation: a coloured glyph the prompt names — a hat (row 0) or a badge on the shirt (rows 6-7), in
  one of six colours, so 12 occupations.

Per-image jitter (background colour, region colours, hair length, pixel noise) makes each class a
distribution rather than one picture. Every occupation has its own skewed gender, race and age
distribution in the training data; some occupations are held out of debiasing to test generalisation.
Images are ``[B, 8, 8, 3]`` float32 in [-1, 1] (channels last; the U-Net takes them transposed to NCHW).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from fairdiff_jax.errors import FairdiffError

IMAGE_SIZE = 8
ATTRIBUTES = {"gender": ("female", "male"), "race": ("WMELH", "Black", "Indian", "Asian"), "age": ("young", "old")}
PROMPT_TEMPLATE = "a photo of a {occupation}"
PROMPT_WORDS = ("a", "photo", "of", "the", "face", "person")
# Words that name each attribute's classes in training captions (in class order; the baselines' class words,
# fairdiff_jax/baselines/class_words.py, plus age). A training caption names each attribute of its picture
# independently with probability CAPTION_ATTRIBUTE_RATE ("a photo of a young black female doctor"), otherwise it
# is the plain prompt, so the plain prompts keep the occupations' skewed distributions while the text encoder
# learns where gender, race and age lie in text space. With plain captions only (rate 0, the first shipped world)
# the text encoder never needed an attribute direction and the text-encoder LoRA stalled (issue 18). Measured with
# the builder (2 CPU cores): rate 0.25 and 1500 steps drew "a photo of a female X" female only 55 % of the time and
# "male X" male 47 % (the occupation prior); rate 0.5 and 2000 steps 99 % and 82 %.
ATTRIBUTE_WORDS = {
    "gender": ("female", "male"),
    "race": ("white", "black", "indian", "asian"),
    "age": ("young", "old"),
}
CAPTION_ORDER = ("age", "race", "gender")  # word order in a caption: "a young black female doctor"
CAPTION_ATTRIBUTE_RATE = 0.5

# colours in [0, 1]
SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.34, 0.20, 0.12], [0.68, 0.45, 0.29], [0.98, 0.86, 0.45]], np.float32)
HAIR_COLOURS = np.array([[0.12, 0.08, 0.06], [0.86, 0.86, 0.90]], np.float32)  # young, old
CUE_COLOURS = np.array(
    [
        [0.92, 0.10, 0.10],
        [0.10, 0.80, 0.20],
        [0.15, 0.25, 0.95],
        [0.95, 0.90, 0.10],
        [0.90, 0.15, 0.85],
        [0.10, 0.85, 0.90],
    ],
    np.float32,
)
CUE_POSITIONS = ("hat", "badge")
SHIRT_COLOUR = np.array([0.30, 0.30, 0.34], np.float32)
BACKGROUND_COLOUR = np.array([0.50, 0.55, 0.60], np.float32)


@dataclasses.dataclass(frozen=True)
class Occupation:
    """One occupation: its cue glyph and the attribute distributions of its training pictures."""

    name: str
    cue_colour: int
    cue_position: str
    gender: tuple[float, ...]  # (p female, p male)
    race: tuple[float, ...]  # over the 4 races
    age: tuple[float, ...]  # (p young, p old)
    held_out: bool = False

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(occupation=self.name)

    def distribution(self, attribute: str) -> tuple[float, ...]:
        return getattr(self, attribute)


def _race(dominant: int, share: float = 0.55) -> tuple[float, ...]:
    rest = (1.0 - share) / 3.0
    return tuple(share if i == dominant else rest for i in range(4))


# name, p(male), dominant race, p(old), held out of debiasing
_SPEC = (
    ("doctor", 0.85, 0, 0.30, False),
    ("nurse", 0.12, 2, 0.20, False),
    ("pilot", 0.90, 0, 0.20, False),
    ("dancer", 0.10, 3, 0.10, False),
    ("engineer", 0.88, 3, 0.25, False),
    ("teacher", 0.15, 0, 0.35, False),
    ("farmer", 0.85, 2, 0.60, False),
    ("cleaner", 0.12, 1, 0.30, False),
    ("judge", 0.88, 0, 0.70, True),
    ("librarian", 0.15, 0, 0.55, True),
    ("firefighter", 0.90, 1, 0.15, True),
    ("writer", 0.20, 3, 0.40, True),
)

OCCUPATIONS: tuple[Occupation, ...] = tuple(
    Occupation(
        name=name,
        cue_colour=index % len(CUE_COLOURS),
        cue_position=CUE_POSITIONS[index // len(CUE_COLOURS)],
        gender=(round(1.0 - p_male, 4), p_male),
        race=tuple(round(p, 4) for p in _race(dominant)),
        age=(round(1.0 - p_old, 4), p_old),
        held_out=held_out,
    )
    for index, (name, p_male, dominant, p_old, held_out) in enumerate(_SPEC)
)
OCCUPATION_NAMES = tuple(o.name for o in OCCUPATIONS)


def occupation_index(name: str) -> int:
    """Index of an occupation by name (raises ``FairdiffError`` for unknown names)."""
    if name not in OCCUPATION_NAMES:
        raise FairdiffError(f"unknown toy-world occupation '{name}'; choose one of {', '.join(OCCUPATION_NAMES)}.")
    return OCCUPATION_NAMES.index(name)


def split(held_out: bool) -> tuple[str, ...]:
    """Occupation names used for debiasing (``held_out=False``) or kept out of it (``True``)."""
    return tuple(o.name for o in OCCUPATIONS if o.held_out == held_out)


def tokenizer_words() -> tuple[str, ...]:
    """Every word a toy-world prompt or training caption uses (for the code-built CLIP tokenizer)."""
    attribute_words = tuple(w for attr in CAPTION_ORDER for w in ATTRIBUTE_WORDS[attr])
    return tuple(PROMPT_WORDS) + OCCUPATION_NAMES + attribute_words


def caption(occupation: int, named: dict[str, int]) -> str:
    """The training caption of a picture of ``occupation`` naming the classes in ``named`` (``{attr: class}``)."""
    words = [ATTRIBUTE_WORDS[attr][int(named[attr])] for attr in CAPTION_ORDER if attr in named]
    return PROMPT_TEMPLATE.format(occupation=" ".join([*words, OCCUPATIONS[int(occupation)].name]))


@functools.cache
def all_captions() -> tuple[str, ...]:
    """Every training caption: the plain prompts first (in occupation order), then each occupation with every
    combination of named classes (none or one class per attribute)."""
    options = [[None, *range(len(ATTRIBUTE_WORDS[attr]))] for attr in CAPTION_ORDER]
    out = [o.prompt for o in OCCUPATIONS]
    for index in range(len(OCCUPATIONS)):
        for choice in np.ndindex(*(len(o) for o in options)):
            named = {attr: options[i][c] for i, (attr, c) in enumerate(zip(CAPTION_ORDER, choice)) if c > 0}
            if named:
                out.append(caption(index, named))
    return tuple(out)


@functools.cache
def _caption_table() -> dict[str, int]:
    return {text: row for row, text in enumerate(all_captions())}


def caption_rows(labels: dict[str, np.ndarray], rng: np.random.Generator, rate: float = CAPTION_ATTRIBUTE_RATE):
    """Row of :func:`all_captions` for each picture of ``labels``: each attribute named with probability ``rate``."""
    occupation = np.asarray(labels["occupation"], np.int64)
    table = _caption_table()
    named = {attr: rng.random(occupation.shape[0]) < rate for attr in CAPTION_ORDER}
    rows = [
        table[caption(occ, {attr: labels[attr][i] for attr in CAPTION_ORDER if named[attr][i]})]
        for i, occ in enumerate(occupation)
    ]
    return np.asarray(rows, np.int64)


def render(
    gender: np.ndarray,
    race: np.ndarray,
    age: np.ndarray,
    occupation: np.ndarray,
    rng: np.random.Generator,
    *,
    noise: float = 0.03,
) -> np.ndarray:
    """Draw figures with the given integer labels (each ``[B]``); returns ``[B, 8, 8, 3]`` in [-1, 1]."""
    gender, race, age, occupation = (np.asarray(a, np.int64) for a in (gender, race, age, occupation))
    batch = gender.shape[0]
    if not (race.shape == age.shape == occupation.shape == (batch,)):
        raise FairdiffError("render: gender, race, age and occupation must be 1-D label arrays of the same length.")

    def jitter(base: np.ndarray, scale: float) -> np.ndarray:
        return base + rng.uniform(-scale, scale, size=(batch, 3)).astype(np.float32)

    img = np.empty((batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = jitter(np.broadcast_to(BACKGROUND_COLOUR, (batch, 3)), 0.12)[:, None, None, :]
    # shirt (rows 6-7, cols 1-6) and neck (row 5, cols 3-4)
    img[:, 6:8, 1:7] = jitter(np.broadcast_to(SHIRT_COLOUR, (batch, 3)), 0.05)[:, None, None, :]
    skin = jitter(SKIN_TONES[race], 0.03)[:, None, None, :]
    img[:, 2:5, 2:6] = skin
    img[:, 5, 3:5] = skin[:, 0]
    hair = jitter(HAIR_COLOURS[age], 0.05)[:, None, :]
    img[:, 1, 2:6] = hair
    img[:, 1:3, 1] = hair
    img[:, 1:3, 6] = hair
    # long hair reaches row 5 or 6 (jittered length); short hair stops at row 2
    long_hair = gender == 0
    hair_end = np.where(rng.random(batch) < 0.5, 5, 6)
    rows = np.arange(IMAGE_SIZE)[None, :]
    falls = long_hair[:, None] & (rows >= 3) & (rows < hair_end[:, None])  # [B, 8]
    for col in (1, 6):
        img[:, :, col] = np.where(falls[:, :, None], hair, img[:, :, col])
    cue_colour = np.array([OCCUPATIONS[i].cue_colour for i in occupation], np.int64)
    cue_is_hat = np.array([OCCUPATIONS[i].cue_position == "hat" for i in occupation], bool)
    cue = jitter(CUE_COLOURS[cue_colour], 0.04)[:, None, None, :]
    hat = cue_is_hat[:, None, None, None]
    img[:, 0:1, 1:7] = np.where(hat, cue, img[:, 0:1, 1:7])
    img[:, 6:8, 3:5] = np.where(hat, img[:, 6:8, 3:5], cue)
    img += noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img * 2.0 - 1.0, -1.0, 1.0)


def sample_labels(occupation: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Attribute labels drawn from each occupation's skewed training distribution; ``{attr: [B]}``."""
    occupation = np.asarray(occupation, np.int64)
    labels = {}
    for attribute in ATTRIBUTES:
        table = np.array([OCCUPATIONS[i].distribution(attribute) for i in range(len(OCCUPATIONS))], np.float64)
        cumulative = np.cumsum(table[occupation], axis=1)
        draws = rng.random(occupation.shape[0])[:, None]
        labels[attribute] = np.minimum((draws >= cumulative).sum(axis=1), table.shape[1] - 1)
    return labels


def sample_training_batch(
    batch: int, rng: np.random.Generator, *, occupations: Sequence[int] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pictures from the biased training distribution: images ``[B, 8, 8, 3]`` and labels ``{attr: [B]}``.

    Labels include ``occupation``; occupations are uniform over ``occupations`` (default: all).
    """
    choices = np.arange(len(OCCUPATIONS)) if occupations is None else np.asarray(occupations, np.int64)
    occupation = rng.choice(choices, size=batch)
    labels = sample_labels(occupation, rng)
    labels["occupation"] = occupation
    return render(labels["gender"], labels["race"], labels["age"], occupation, rng), labels


def sample_balanced_batch(batch: int, rng: np.random.Generator, *, noise: float = 0.03):
    """Pictures with every label uniform and independent (for training the classifiers), with labels."""
    labels = {attr: rng.integers(0, len(names), size=batch) for attr, names in ATTRIBUTES.items()}
    labels["occupation"] = rng.integers(0, len(OCCUPATIONS), size=batch)
    images = render(labels["gender"], labels["race"], labels["age"], labels["occupation"], rng, noise=noise)
    return images, labels


def describe() -> dict:
    """A JSON-able description of the world: attributes, occupations, prompts, splits and distributions."""
    return {
        "image_size": IMAGE_SIZE,
        "pixel_range": [-1.0, 1.0],
        "attributes": {attr: list(names) for attr, names in ATTRIBUTES.items()},
        "prompt_template": PROMPT_TEMPLATE,
        "captions": {
            "attribute_words": {attr: list(words) for attr, words in ATTRIBUTE_WORDS.items()},
            "order": list(CAPTION_ORDER),
        },
        "occupations": [
            {
                "name": o.name,
                "prompt": o.prompt,
                "cue": {"colour": o.cue_colour, "position": o.cue_position},
                "held_out": o.held_out,
                "train_distribution": {attr: list(o.distribution(attr)) for attr in ATTRIBUTES},
            }
            for o in OCCUPATIONS
        ],
        "splits": {"debias": list(split(False)), "held_out": list(split(True))},
    }
