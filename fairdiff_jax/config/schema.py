"""The config schema: every key a run may set, with the paper's common settings (PAPER.md) as defaults.

Config files follow big_vision: a Python file with ``get_config(arg=None) -> ConfigDict`` built on
:func:`base_config` and :func:`attribute`, so every experiment has the same keys. ``arg`` switches several
fields at once; :func:`parse_config_arg` is its one syntax (``unet_lora``, ``unet_lora,gender+race`` or
``adaptor=unet_lora,attributes=gender+race``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ml_collections import ConfigDict

from fairdiff_jax.errors import FairdiffError

# Class names in class order (PAPER.md encodings).
CLASSES = {
    "gender": ("female", "male"),
    "race": ("WMELH", "Black", "Indian", "Asian"),
    "age": ("young", "old"),
}
DEFAULT_WORLD = "stable_diffusion"


def attribute(
    name: str,
    target: Sequence[float] | None = None,
    *,
    factor1: float = 0.2,
    factor2: float = 1.0,
    classifier: str = "",
    eval_classifier: str = "",
    facial: bool = True,
    classes: Sequence[str] | None = None,
    cost_weights: Sequence[Sequence[float]] = (),
) -> ConfigDict:
    """One ``attributes.<name>`` entry; ``target`` defaults to uniform over the classes.

    ``factor2`` (the face-box damping of L_img's gradient, fairdiff_jax/alignment/face_box.py) defaults to 1 = no
    damping; a smaller value needs a face detector (``faces.detector``). The paper configs carry the paper's values.
    ``cost_weights`` (``[K][K]``, row: target label, column: class; empty = unweighted) scale the transport cost's
    probability differences, e.g. the authors' age weighting ``((1, 1), (2, 1))``
    (``alignment.targets.old_label_young_weight``).
    """
    classes = tuple(classes if classes is not None else CLASSES[name])
    target = tuple(float(t) for t in target) if target is not None else tuple(1.0 / len(classes) for _ in classes)
    return ConfigDict(
        {
            "classes": classes,
            "target": target,
            "factor1": float(factor1),
            "factor2": float(factor2),
            "classifier": classifier,
            "eval_classifier": eval_classifier,
            "facial": bool(facial),
            "cost_weights": tuple(tuple(float(w) for w in row) for row in cost_weights),
        }
    )


def parse_config_arg(arg: str | None, config_name: str, **defaults: str) -> ConfigDict:
    """A config file's ``:ARG`` as a ConfigDict of strings over the keys of ``defaults`` (in order).

    ``"a,b"`` gives the values positionally, ``"k=v,k=v"`` by name; missing keys keep their default.
    """
    values = dict(defaults)
    names = list(defaults)
    for position, part in enumerate(p for p in (arg or "").split(",") if p):
        key, eq, value = part.partition("=")
        if not eq:
            if position >= len(names):
                raise FairdiffError(
                    f"configs/{config_name}:{arg} has too many values; it takes {', '.join(names)} (e.g. "
                    f"{config_name}:{','.join(str(v) for v in defaults.values())})"
                )
            key, value = names[position], part
        if key not in values:
            raise FairdiffError(f"configs/{config_name}:{arg}: unknown switch '{key}'; it takes {', '.join(names)}")
        values[key] = value
    return ConfigDict(values)


def adaptor_from_arg(arg: str | None, config_name: str) -> str:
    """The adaptor kind chosen by a paper config's ``:ARG`` (default ``text_lora``)."""
    from fairdiff_jax.adaptors.spec import ADAPTOR_KINDS

    kind = parse_config_arg(arg, config_name, adaptor="text_lora").adaptor
    if kind not in ADAPTOR_KINDS:
        raise FairdiffError(
            f"configs/{config_name}:{kind} names an unknown adaptor; choose one of {', '.join(ADAPTOR_KINDS)}"
        )
    return kind


def base_config() -> ConfigDict:
    """Every key a config may set, with the paper's common settings (PAPER.md, "Common") as defaults."""
    c = ConfigDict()
    # world: which model family builds the run (fairdiff_jax.worlds; plug-ins register more names);
    # path: its model folder (a diffusers-format SD folder); variant: diffusers weight-file variant ("" or "fp16");
    # attention: how the U-Net / VAE / CLIP attention is computed while training and generating
    # (fairdiff_jax.models.attention: "auto" picks cuDNN flash attention on GPUs, matmul or chunked elsewhere;
    # "splash" is the Pallas kernel for TPUs, opt-in).
    c.model = ConfigDict(
        {
            "world": DEFAULT_WORLD,
            "path": "models/stable-diffusion-v1-5",
            "dtype": "bfloat16",
            "variant": "",
            "attention": "auto",
        }
    )
    # ema_warmup: the EMA decay ramps as min(ema_decay, (1+s)/(10+s)) over its updates s, as diffusers' EMAModel
    # (what the paper's authors use) does; False = ema_decay from the first update
    c.adaptor = ConfigDict(
        {"kind": "text_lora", "rank": 50, "alpha": 50.0, "num_tokens": 5, "ema_decay": 0.996, "ema_warmup": True}
    )
    # OFT (adaptor.kind=unet_oft): fairdiff_jax.adaptors.oft.OFTSettings, PEFT's defaults but the exact Cayley map
    c.adaptor.oft = ConfigDict(
        {
            "block_size": 32,
            "num_blocks": 0,
            "coft": False,
            "eps": 6e-5,
            "block_share": False,
            "cayley_neumann": False,
            "num_neumann_terms": 5,
        }
    )
    c.sampler = ConfigDict(
        {
            "solver": "dpmpp_2m",
            "guidance_scale": 7.5,
            "train_steps": (19, 23),  # inclusive range; one count is drawn per iteration
            "eval_steps": 25,
            "gradient_mode": "adjusted",
            "remat_policy": "full",
            "unroll": 1,  # sampling steps per lax.scan iteration; >= the step count unrolls fully (faster, more memory)
            # "" = the model's scheduler_config.json, or diffusers' default of the solver when it names none
            # (SD 1.5: DPM-Solver++ "linspace"); "leading" / "linspace" / "trailing" override it
            "timestep_spacing": "",
            # DPM-Solver++'s last step: "sigma_min" = second order to t = 0 (diffusers 0.19.3, the authors' pin, and
            # Flax); "zero" = first order to sigma 0 (PyTorch diffusers >= 0.26's default)
            "final_sigmas_type": "sigma_min",
        }
    )
    c.attributes = ConfigDict()
    # The face-realism loss L_face (fairdiff_jax/face_terms.py): lambda_face = 0 is off; > 0 needs a dlib face detector
    # (faces.detector), a reference set of real faces (face_reference_path, `fairdiff faces build-reference`) and a
    # face embedder (face_embedder_path; "" = dlib's ResNet from the faces extra). face_keep_confidence: the original
    # classifier's probability above which the original face is the target (0.9; 0.8 gender x race; 0.75 with age).
    c.loss = ConfigDict(
        {
            "lambda_img": 8.0,
            "lambda_face": 0.0,
            "confidence": 0.8,
            "face_keep_confidence": 0.9,
            "num_ot_samples": 100,
            "clip_path": "",
            "dino_path": "",
            "face_embedder_path": "",
            "face_reference_path": "",
        }
    )
    # prompt sources (see prompts.py); empty = the world's own prompt splits. prompt_padding: "max_length" pads
    # every prompt to the text encoder's length (77 for SD, as diffusers' pipelines do); "prompt" pads to the
    # prompt's own length with an attention mask, and "" to that length, as the paper's authors do (one compile
    # per distinct length; exact for one prompt per step, longer prompts of a step set the length otherwise)
    c.data = ConfigDict({"prompts": ("occupations",), "template": "", "prompt_padding": "max_length"})
    c.train = ConfigDict(
        {
            "images_per_prompt": 24,
            "prompts_per_step": 1,
            "lr": 5e-5,
            "weight_decay": 1e-2,
            "betas": (0.9, 0.999),
            "microbatch": 0,  # images per gradient micro-batch; 0 = all at once
            # "constant" (the paper) or "cosine": decay from lr to lr * final_lr_fraction over num_steps
            "lr_schedule": "constant",
            "final_lr_fraction": 0.1,
            # a run stops (naming the last good checkpoint) after this many skipped non-finite updates in a row
            "max_skipped_in_a_row": 20,
        }
    )
    # clip_path / dino_path: evaluation encoders for CLIP-T / CLIP-I / DINO (separate from loss.*; "" = not computed)
    c.eval = ConfigDict({"images_per_prompt": 60, "seed": 2022, "batch_size": 32, "clip_path": "", "dino_path": ""})
    # the comparison methods of `fairdiff evaluate --method NAME`, with their papers' defaults (fairdiff_jax/baselines)
    from fairdiff_jax.baselines.methods import METHODS, method_defaults

    c.baselines = ConfigDict({name: method_defaults(name) for name in METHODS})
    c.num_steps = 10_000
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.log_every = 10
    c.sample_every = 200
    c.seed = 0
    c.parallel = ConfigDict({"mode": "shard_map", "distributed": False})
    # Largest-face detection for facial attributes (fairdiff_jax/attributes/detectors.py): "none" = the whole image
    # is the face; "haar" = OpenCV's bundled cascade; "yunet" = OpenCV YuNet from the ONNX file model_path;
    # "dlib_cnn" / "dlib_hog" = dlib's CNN / HOG detector with dlib's 5 landmarks (the faces extra; model_path may
    # name another CNN .dat).
    c.faces = ConfigDict(
        {"detector": "none", "model_path": "", "min_face_size": 32, "score_threshold": 0.6, "min_neighbors": 5}
    )
    return c


def attribute_names(cfg: ConfigDict) -> list[str]:
    """Attribute names in the canonical order every module uses (sorted; ConfigDict's own order)."""
    return sorted(cfg.attributes.keys())
