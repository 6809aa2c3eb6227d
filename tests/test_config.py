"""Configs: every experiment file loads, strict overrides, validation messages, resolved config, prompts."""

import json
import os

import pytest

from fairdiff_jax import FairdiffError
from fairdiff_jax.config import (
    attribute_names,
    config_from_argv,
    leaf_keys,
    load_config,
    parse_value,
    validate_config,
    write_resolved_config,
)
from fairdiff_jax.prompts import (
    PromptIterator,
    fill_template,
    load_prompt_set,
    load_prompts,
    packaged_prompt_sets,
    parse_prompt_data,
)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_path(name: str) -> str:
    return os.path.join(CONFIGS, name)


@pytest.fixture
def model_dir(tmp_path):
    return str(tmp_path)


@pytest.mark.parametrize(
    "name, attrs, images, steps",
    [
        ("gender.py", {"gender": (0.5, 0.5)}, 24, 10_000),
        ("race.py", {"race": (0.25,) * 4}, 32, 12_000),
        ("gender_race.py", {"gender": (0.5, 0.5), "race": (0.25,) * 4}, 32, 15_000),
        ("gender_race_age.py", {"gender": (0.5, 0.5), "race": (0.25,) * 4, "age": (0.75, 0.25)}, 40, 15_000),
        ("multi_concept.py", {"gender": (0.5, 0.5), "race": (0.25,) * 4}, 40, 15_000),
    ],
)
def test_paper_configs_follow_paper_md(name, attrs, images, steps, model_dir):
    cfg = load_config(config_path(name), [f"--config.model.path={model_dir}"])
    assert {k: tuple(v.target) for k, v in cfg.attributes.items()} == attrs
    assert cfg.train.images_per_prompt == images and cfg.num_steps == steps
    assert cfg.adaptor.kind == "text_lora" and cfg.adaptor.rank == 50 and cfg.adaptor.ema_decay == 0.996
    assert cfg.sampler.train_steps == (19, 23) and cfg.sampler.eval_steps == 25 and cfg.sampler.guidance_scale == 7.5
    assert cfg.train.lr == 5e-5 and cfg.train.weight_decay == 1e-2 and cfg.loss.confidence == 0.8
    if "race" in attrs:
        assert (cfg.attributes.race.factor1, cfg.attributes.race.factor2) == (0.6, 0.3)
        assert cfg.attributes.race.classes == ("WMELH", "Black", "Indian", "Asian")
    assert attribute_names(cfg) == sorted(attrs)


def test_adaptor_switch_and_toy_config():
    for kind in ("text_lora", "unet_lora", "both", "soft_tokens"):
        cfg = load_config(config_path(f"gender.py:{kind}"), validate=False)
        assert cfg.adaptor.kind == kind
    with pytest.raises(FairdiffError, match="unknown adaptor.*soft_tokens"):
        load_config(config_path("gender.py:lora"), validate=False)
    toy = load_config(config_path("toy.py"))  # the toy world (a plug-in) validates without any folder
    assert toy.model.world == "toy" and not toy.model.path
    assert toy.train.images_per_prompt % 8 == 0 and toy.adaptor.rank == 4
    assert toy.adaptor.kind == "unet_lora" and list(toy.attributes) == ["gender"]
    both = load_config(config_path("toy.py:text_lora,race+gender"))
    assert both.adaptor.kind == "text_lora" and sorted(both.attributes) == ["gender", "race"]
    assert both.attributes.race.target == (0.25,) * 4 and not both.attributes.race.facial
    for bad in ("text_lora,hair", "text_lora,gender+gender"):
        with pytest.raises(FairdiffError, match="each must be one of gender, race, age, at most once"):
            load_config(config_path(f"toy.py:{bad}"))


def test_overrides_are_parsed_by_type_and_config_is_locked(model_dir):
    cfg = load_config(
        config_path("gender.py"),
        [
            "--config.attributes.gender.target=(0.3, 0.7)",
            "--config.train.lr",
            "1e-4",
            "--config.num_steps=2e3",
            "--config.parallel.distributed=true",
            "--config.data.prompts=sports",
            "--config.data.template=A photo of a {occupation}",
            f"--config.model.path={model_dir}",
        ],
    )
    assert cfg.attributes.gender.target == (0.3, 0.7)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.num_steps, int) and cfg.num_steps == 2000
    assert cfg.parallel.distributed is True and cfg.data.prompts == ("sports",)
    assert cfg.data.template == "A photo of a {occupation}"
    with pytest.raises(AttributeError):
        cfg.new_key = 1  # locked: no new keys


def test_parse_value_follows_current_type():
    assert parse_value("k", "false", True) is False
    assert parse_value("k", "'quoted'", "x") == "quoted" and parse_value("k", "a b", "x") == "a b"
    assert parse_value("k", "3", 0.5) == 3.0 and isinstance(parse_value("k", "3", 0.5), float)
    assert parse_value("k", "(1, 2)", (0, 0)) == (1, 2) and parse_value("k", "[1, 2]", (0, 0)) == (1, 2)
    with pytest.raises(FairdiffError, match="expected an integer"):
        parse_value("k", "2.5", 1)
    with pytest.raises(FairdiffError, match="bool"):
        parse_value("k", "maybe", True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.lrr=1", r"unknown config key 'train.lrr'; did you mean train.lr"),
        ("--config.atributes.gender.target=(0.5, 0.5)", r"did you mean attributes.gender.target"),
        ("--config.attributes.gender.target=(0.3, 0.6)", r"sums to 0.9, not 1"),
        ("--config.attributes.gender.target=(0.2, 0.3, 0.5)", r"has 3 entries but gender has 2 classes"),
        ("--config.attributes.gender.target=(-0.5, 1.5)", r"negative"),
        ("--config.adaptor.kind=lora", r"adaptor.kind='lora' is not allowed; choose one of text_lora"),
        ("--config.sampler.gradient_mode=approx", r"choose one of adjusted, exact, detached"),
        ("--config.train.microbatch=-1", r"must be 0 .* or positive"),  # whether it divides: test_train
        ("--config.data.prompts=nope.json", r"prompt source 'nope.json'"),
        ("--config.train", r"is a group, not a value"),
    ],
)
def test_bad_values_give_one_clear_line(override, message, model_dir):
    with pytest.raises(FairdiffError, match=message) as info:
        load_config(config_path("gender.py"), [override, f"--config.model.path={model_dir}"])
    assert "\n" not in str(info.value)


def test_target_sum_tolerance_and_missing_model_folder(model_dir):
    ok = load_config(
        config_path("gender.py"),
        ["--config.attributes.gender.target=(0.3333333, 0.6666667)", f"--config.model.path={model_dir}"],
    )
    assert ok.attributes.gender.target == (0.3333333, 0.6666667)
    with pytest.raises(FairdiffError, match=r"model folder '/no/such/sd' not found; set --config.model.path="):
        load_config(config_path("gender.py"), ["--config.model.path=/no/such/sd"])
    with pytest.raises(FairdiffError, match="config file .* not found"):
        load_config(config_path("nope.py"))


def test_config_from_argv_and_resolved_config_roundtrip(tmp_path, model_dir):
    argv = ["--workdir", "W", "--config", config_path("gender_race_age.py:both"), "--config.seed=7"]
    cfg, rest = config_from_argv(argv + [f"--config.model.path={model_dir}"])
    assert rest == ["--workdir", "W"] and cfg.seed == 7 and cfg.adaptor.kind == "both"
    json_path, py_path = write_resolved_config(cfg, str(tmp_path / "run"))
    with open(json_path) as f:
        data = json.load(f)
    assert data["attributes"]["age"]["target"] == [0.75, 0.25] and data["seed"] == 7
    reloaded = load_config(py_path)
    assert leaf_keys(reloaded) == leaf_keys(cfg)
    assert reloaded.to_dict() == cfg.to_dict()  # tuples stay tuples through the Python file
    validate_config(reloaded)


# ----------------------------------------------------------------------------------------------- prompts


def test_packaged_occupations_are_split_without_overlap():
    assert {"occupations", "sports", "occupations_style", "personal_descriptors"} <= set(packaged_prompt_sets())
    prompts = load_prompt_set("occupations")
    assert len(prompts.train) >= 300 and len(prompts.val) == 10 and len(prompts.test) == 50
    assert not set(prompts.test) & set(prompts.train)
    assert prompts.train[0].startswith("A photo of the face of a ") and prompts.train[0].endswith(", a person")
    assert "A photo of the face of a librarian, a person" in prompts.val
    multi = load_prompts(("occupations", "sports", "occupations_style", "personal_descriptors"))
    assert len(multi) == len(set(multi)) > len(prompts.train) + 100


def test_authors_schema_list_and_text_sources(tmp_path):
    data = {
        "prompt_templates_train": ["a {occupation}", "the {occupation}"],
        "occupations_train_set": ["nurse", "pilot"],
        "prompt_templates_test": ["photo of a {occupation}"],
        "occupations_val_set": ["judge"],
        "test_prompts": ["a full test prompt"],
    }
    parsed = parse_prompt_data(data)
    assert parsed.train == ("a nurse", "a pilot", "the nurse", "the pilot")
    assert parsed.val == ("photo of a judge",) and parsed.test == ("a full test prompt",)
    assert parse_prompt_data(data, template="X {job}").train == ("X nurse", "X pilot")
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["p one", "p two"]))
    assert load_prompts(str(listed), "test") == ["p one", "p two"]
    text = tmp_path / "prompts.txt"
    text.write_text("# comment\nfirst prompt\n\nsecond prompt\n")
    assert load_prompts(str(text)) == ["first prompt", "second prompt"]
    assert fill_template("a {sport} player", "golf") == "a golf player"
    with pytest.raises(FairdiffError, match="exactly one field"):
        fill_template("a {x} and {y}", "z")


def test_prompt_iterator_resumes_exactly_and_covers_each_epoch():
    prompts = [f"prompt {i}" for i in range(10)]
    run = PromptIterator(prompts, prompts_per_step=3, seed=5)
    first_epoch = [next(run) for _ in range(3)]
    flat = [p for batch in first_epoch for p in batch]
    assert len(set(flat)) == 9  # distinct within an epoch; the 10th is dropped with the partial batch
    history = [next(run) for _ in range(4)]
    state = run.state()
    expected = [next(run) for _ in range(6)]
    resumed = PromptIterator(prompts, prompts_per_step=3, seed=0)
    resumed.restore(json.loads(json.dumps(state)))  # the state survives JSON (checkpoint meta)
    assert [next(resumed) for _ in range(6)] == expected
    assert [p for batch in history[:3] for p in batch] != flat  # each epoch is reshuffled
    with pytest.raises(FairdiffError, match="prompt list changed"):
        PromptIterator(prompts[:8], 3).restore(state)
    with pytest.raises(FairdiffError, match="prompts_per_step"):
        PromptIterator(prompts, 11)


def test_face_terms_are_checked_at_train_time_in_one_line(model_dir, tmp_path):
    from fairdiff_jax.config import validate_face_training

    reference = tmp_path / "faces.safetensors"
    reference.write_bytes(b"checked when loaded")
    model = f"--config.model.path={model_dir}"
    cases = [
        ([], "needs a reference set of real faces"),  # the paper's config as shipped: L_face on, no reference yet
        (["--config.faces.detector=haar", f"--config.loss.face_reference_path={reference}"], "dlib's 5 landmarks"),
        (
            ["--config.loss.lambda_face=0", "--config.faces.detector=none"],
            "attributes.race.factor2=0.3: factor2 damps L_img",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(FairdiffError, match=message) as info:
            validate_face_training(load_config(config_path("gender_race.py"), [model, *overrides]))
        assert "\n" not in str(info.value) and "--config." in str(info.value)
    ready = [f"--config.loss.face_reference_path={reference}", model]
    validate_face_training(load_config(config_path("gender_race.py"), ready))  # dlib_cnn + a reference: accepted
    off = ["--config.loss.lambda_face=0", "--config.faces.detector=none", model]
    off += ["--config.attributes.gender.factor2=1", "--config.attributes.race.factor2=1"]
    validate_face_training(load_config(config_path("gender_race.py"), off))  # no face terms: nothing to check
    with pytest.raises(FairdiffError, match="the toy world has no faces"):
        validate_face_training(load_config(config_path("toy.py"), ["--config.loss.lambda_face=1"]))
    with pytest.raises(FairdiffError, match="lambda_face=-1.0 must be >= 0"):
        load_config(config_path("gender.py"), ["--config.loss.lambda_face=-1", model])
