"""Prompt sets load from the authors' own json files (both schemas of their ``data/1-prompts/``).

The expected prompts are computed with the authors' expressions: ``exp-*/1-main-debias.py`` (train: every
train template with every train occupation, templates outer; val: the test templates with the val
occupations), ``exp-5 .../1-main-debias.py`` (``train_prompts`` / ``val_prompts`` of the other three files) and
``gen-images.py`` (``test_prompts``).
"""

import json

import pytest

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.prompts import load_prompt_set, load_prompts

OCCUPATION = {  # the layout of their occupation.json
    "prompt_templates_train": ["A photo of the face of a {occupation}, a person", "A portrait of a {occupation}"],
    "occupations_train_set": ["actuary", "baker", "chemist"],
    "prompt_templates_test": ["A photo of the face of a {occupation}, a person"],
    "occupations_val_set": ["librarian", "dancer"],
    "occupations_test_set": ["doctor", "nurse"],
    "test_prompts": ["A photo of the face of a doctor, a person", "A photo of the face of a nurse, a person"],
}
SPORTS = {  # the layout of their sports.json / personal_descriptor.json / occupation_w_style_and_context.json
    "train_prompts": ["A photo of the face of a person playing golf", "A photo of the face of a tennis player"],
    "val_prompts": ["A photo of the face of a person playing chess"],
    "test_prompts": ["A photo of the face of a person playing soccer", "A photo of the face of a person playing golf"],
}


@pytest.fixture()
def authors_folder(tmp_path):
    for name, data in [("occupation.json", OCCUPATION), ("sports.json", SPORTS)]:
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def test_occupation_schema_matches_the_authors_expressions(authors_folder):
    data = OCCUPATION
    train = [p.format(occupation=o) for p in data["prompt_templates_train"] for o in data["occupations_train_set"]]
    val = [p.format(occupation=o) for p in data["prompt_templates_test"] for o in data["occupations_val_set"]]
    prompts = load_prompt_set(str(authors_folder / "occupation.json"))
    assert list(prompts.train) == train
    assert list(prompts.val) == val
    assert list(prompts.test) == data["test_prompts"]


def test_full_prompt_schema_loads_every_split(authors_folder):
    path = str(authors_folder / "sports.json")
    prompts = load_prompt_set(path)
    assert list(prompts.train) == SPORTS["train_prompts"]
    assert list(prompts.val) == SPORTS["val_prompts"]
    assert list(prompts.test) == SPORTS["test_prompts"]
    both = load_prompts([str(authors_folder / "occupation.json"), path], "test")
    assert both == OCCUPATION["test_prompts"] + SPORTS["test_prompts"]


def test_full_prompt_schema_refuses_a_template_and_an_empty_train_list(tmp_path):
    path = tmp_path / "sports.json"
    path.write_text(json.dumps(SPORTS))
    with pytest.raises(FairdiffError, match="has no templates to replace"):
        load_prompt_set(str(path), template="a {sport}")
    path.write_text(json.dumps({"train_prompts": [], "val_prompts": ["x"]}))
    with pytest.raises(FairdiffError, match="fill 'train_prompts'"):
        load_prompt_set(str(path))
    path.write_text(json.dumps({"train_prompts": ["ok", 3]}))
    with pytest.raises(FairdiffError, match="must be a list of strings"):
        load_prompt_set(str(path))
