"""Prompt sets and a deterministic, checkpointable prompt iterator.

A prompt source is a package prompt set by name (``"occupations"``, see ``fairdiff_jax/data/prompts/``), a
JSON file, or a text file with one prompt per line. JSON files are either a plain list of prompts or one of
the paper authors' two schemas (their ``data/1-prompts/*.json``). ``occupation.json``::

    {"prompt_templates_train": ["... {occupation} ..."], "occupations_train_set": [...],
     "prompt_templates_test": ["... {occupation} ..."], "occupations_val_set": [...],
     "test_prompts": ["full prompt", ...]}

Train prompts are every train template filled with every train item (templates outer), validation prompts
the test templates with the validation items; test prompts are given in full. A template has exactly one
named field (``{occupation}``, ``{sport}``, ...). ``occupation_w_style_and_context.json``,
``personal_descriptor.json`` and ``sports.json`` list full prompts::

    {"train_prompts": [...], "val_prompts": [...], "test_prompts": [...]}

(the keys their ``exp-5 .../1-main-debias.py`` and ``gen-images.py`` read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from collections.abc import Sequence
from importlib import resources

import numpy as np

from fairdiff_jax.errors import FairdiffError

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The train, validation and test prompts of one source."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def split(self, name: str) -> tuple[str, ...]:
        if name not in SPLITS:
            raise FairdiffError(f"unknown prompt split '{name}'; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def packaged_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped in ``fairdiff_jax/data/prompts``."""
    folder = resources.files("fairdiff_jax") / "data" / "prompts"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def resolve_prompt_source(source: str) -> str:
    """The file behind ``source``: an existing path, or the package prompt set of that name."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return path
    packaged = resources.files("fairdiff_jax") / "data" / "prompts" / f"{source}.json"
    if packaged.is_file():
        return str(packaged)
    raise FairdiffError(
        f"prompt source '{source}' is neither a file nor a packaged prompt set ({', '.join(packaged_prompt_sets())}); "
        "set --config.data.prompts to one of those or to a .json/.txt file"
    )


def fill_template(template: str, item: str) -> str:
    """Put ``item`` into the single named field of ``template`` (``"a {occupation}"`` -> ``"a nurse"``)."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if len(fields) != 1:
        raise FairdiffError(
            f"prompt template '{template}' must have exactly one field like {{occupation}}; found {sorted(fields)}"
        )
    return template.format(**{fields.pop(): item})


def _strings(data, key: str, where: str) -> list[str]:
    values = data.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise FairdiffError(f"'{key}' in {where} must be a list of strings")
    return values


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _full_prompt_lists(data: dict, where: str, template: str) -> PromptSet:
    """The authors' ``{"train_prompts", "val_prompts", "test_prompts"}`` files (prompts given in full)."""
    if template:
        raise FairdiffError(
            f"{where} lists full prompts (train_prompts / val_prompts) and has no templates to replace; "
            "leave the prompt template empty for it"
        )
    train, val, test = (_unique(_strings(data, f"{split}_prompts", where)) for split in SPLITS)
    if not train:
        raise FairdiffError(f"{where} yields no training prompts; fill 'train_prompts'")
    return PromptSet(train=train, val=val, test=test)


def parse_prompt_data(data, where: str = "prompt data", template: str = "") -> PromptSet:
    """Build a ``PromptSet`` from loaded JSON (authors' schema or a list of strings).

    A non-empty ``template`` replaces the file's templates; for a plain list it turns items into prompts.
    """
    if isinstance(data, list):
        items = _strings({"items": data}, "items", where)
        prompts = _unique(fill_template(template, item) for item in items) if template else _unique(items)
        return PromptSet(train=prompts, val=prompts, test=prompts)
    if not isinstance(data, dict):
        raise FairdiffError(f"{where} must hold a JSON list of prompts or an object with 'prompt_templates_train'")
    if "prompt_templates_train" not in data and ("train_prompts" in data or "val_prompts" in data):
        return _full_prompt_lists(data, where, template)
    train_templates = [template] if template else _strings(data, "prompt_templates_train", where)
    test_templates = [template] if template else _strings(data, "prompt_templates_test", where)
    train = _unique(
        fill_template(t, item) for t in train_templates for item in _strings(data, "occupations_train_set", where)
    )
    val = _unique(
        fill_template(t, item) for t in test_templates for item in _strings(data, "occupations_val_set", where)
    )
    test = _unique(_strings(data, "test_prompts", where))
    if not train:
        raise FairdiffError(
            f"{where} yields no training prompts; fill 'prompt_templates_train' and 'occupations_train_set'"
        )
    return PromptSet(train=train, val=val, test=test)


def load_prompt_set(source: str, template: str = "") -> PromptSet:
    """Load one source (package name, ``.json`` or ``.txt`` file)."""
    path = resolve_prompt_source(source)
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".json"):
            lines = [line.strip() for line in f]
            return parse_prompt_data([line for line in lines if line and not line.startswith("#")], path, template)
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise FairdiffError(f"prompt file '{path}' is not valid JSON ({err}); fix the file") from None
    return parse_prompt_data(data, path, template)


def load_prompts(sources: str | Sequence[str], split: str = "train", template: str = "") -> list[str]:
    """The prompts of ``split`` from one source or several (concatenated, duplicates dropped, order kept)."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    prompts = _unique(p for source in sources for p in load_prompt_set(source, template).split(split))
    if not prompts:
        raise FairdiffError(f"no '{split}' prompts in {sources}; add them to the prompt file or choose another split")
    return list(prompts)


class PromptIterator:
    """Yields ``prompts_per_step`` distinct prompts per step, epoch after epoch, each epoch freshly shuffled.

    The order depends only on (seed, epoch), so the state ``{"epoch", "position", "seed", "num_prompts"}``
    is enough to resume exactly; a partial last batch of an epoch is dropped.
    """

    def __init__(self, prompts: Sequence[str], prompts_per_step: int = 1, seed: int = 0, shuffle: bool = True):
        if not 1 <= prompts_per_step <= len(prompts):
            raise FairdiffError(
                f"train.prompts_per_step={prompts_per_step} must be between 1 and the number of prompts "
                f"({len(prompts)})"
            )
        self.prompts = list(prompts)
        self.prompts_per_step = int(prompts_per_step)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def __iter__(self):
        return self

    def __next__(self) -> list[str]:
        if self.position + self.prompts_per_step > len(self.prompts):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        picked = self._order[self.position : self.position + self.prompts_per_step]
        self.position += self.prompts_per_step
        return [self.prompts[i] for i in picked]

    def state(self) -> dict:
        """JSON-serialisable state to store in a checkpoint's ``meta``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": len(self.prompts)}

    def restore(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; the prompt list must be the same length."""
        if int(state.get("num_prompts", len(self.prompts))) != len(self.prompts):
            before, now = state["num_prompts"], len(self.prompts)
            raise FairdiffError(
                f"the prompt list changed since the checkpoint ({before} -> {now} prompts); "
                "resume with the same data.prompts or start a new --workdir"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
