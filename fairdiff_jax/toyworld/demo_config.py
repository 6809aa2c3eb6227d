"""The toy-world config (``configs/toy.py`` re-exports it; it lives in the package so ``fairdiff demo`` works
from any install). ``model.world = "toy"`` builds the run on the embedded world's model, classifiers and
occupations (``model.path`` empty = the shipped build; ``data.prompts`` empty = the world's occupations). ARG
picks the adaptor and the attributes to debias: ``unet_lora`` (default), ``text_lora``, ``both`` or
``soft_tokens``, then e.g. ``,gender+race`` (default gender; targets uniform, change them with
``--config.attributes.NAME.target``); ``adaptor=...,attributes=...`` works too.
"""

from fairdiff_jax.adaptors.spec import ADAPTOR_KINDS
from fairdiff_jax.config import attribute, base_config, parse_config_arg
from fairdiff_jax.errors import FairdiffError

TOY_ATTRIBUTES = ("gender", "race", "age")
# The U-Net LoRA is the toy default (the paper's default is the text-encoder LoRA). Measured on the shipped world
# (v4, M = 200, 2 CPU cores, 2026-12-04): U-Net LoRA, cosine lr 1e-2 -> 1e-3, 250 steps: gender bias 0.716 -> 0.081
# (held out 0.740 -> 0.065, cue 0.859 -> 0.849); the text-encoder LoRA (the branch below) reaches 0.12-0.16 over
# three seeds (the U-Net LoRA: 0.08-0.12 over the same seeds), so it stays opt-in (--adaptor text_lora).
DEFAULT_ADAPTOR = "unet_lora"


def parse_arg(arg: str | None) -> tuple[str, tuple[str, ...]]:
    """``"ADAPTOR[,ATTR+ATTR...]"`` -> (adaptor kind, attribute names)."""
    switches = parse_config_arg(arg, "toy.py", adaptor=DEFAULT_ADAPTOR, attributes="gender")
    kind = switches.adaptor
    if kind not in ADAPTOR_KINDS:
        raise FairdiffError(f"configs/toy.py:{kind} names an unknown adaptor; choose one of {', '.join(ADAPTOR_KINDS)}")
    names = tuple(a for a in switches.attributes.split("+") if a) or ("gender",)
    unknown = [a for a in names if a not in TOY_ATTRIBUTES]
    if unknown or len(set(names)) != len(names):
        raise FairdiffError(
            f"toy attributes '{'+'.join(names)}': each must be one of {', '.join(TOY_ATTRIBUTES)}, at most once, "
            "joined by '+' (e.g. --attributes gender+race, or configs/toy.py:unet_lora,gender+race)"
        )
    return kind, names


def get_config(arg=None):
    kind, names = parse_arg(arg)
    config = base_config()
    config.model.world = "toy"
    config.model.path = ""  # the shipped world (or $FAIRDIFF_TOY_WORLD)
    config.model.dtype = "float32"
    config.adaptor.kind = kind
    config.adaptor.rank = 4
    config.adaptor.alpha = 4.0
    config.adaptor.num_tokens = 5  # the paper's five soft prompt tokens
    config.adaptor.ema_decay = 0.9
    config.sampler.guidance_scale = 3.0
    config.sampler.train_steps = (6, 8)
    config.sampler.eval_steps = 10
    # 8x8 pixels: the unrolled chain without remat is still the faster demo on CPU with the canonical-gradient
    # convolution (benchmarks/toy_step.py, 2 cores: step 0.88 s, compile 42 s, 725 MiB against 1.12 s, 15 s,
    # 101 MiB rolled with remat; 250 steps take ~260 s against ~295 s)
    config.sampler.unroll = 8
    config.sampler.remat_policy = "none"
    for name in names:  # the toy classifiers see the whole 8x8 picture: no face crop
        config.attributes[name] = attribute(name, facial=False)
    config.loss.lambda_img = 8.0  # the paper's λ_img; 1.0 debiased faster but lost the cue (0.96 -> 0.77)
    config.loss.lambda_face = 0.0
    config.loss.num_ot_samples = 20
    config.data.prompts = ()  # the world's occupations: train on 8, evaluate on those and 4 held out
    config.train.images_per_prompt = 8
    config.train.prompts_per_step = 2
    config.train.lr = 1e-2
    config.train.lr_schedule = "cosine"  # to 1e-3: a constant 1e-2 kept oscillating around the target
    config.eval.images_per_prompt = 200
    config.eval.batch_size = 200
    config.num_steps = 250
    config.checkpoint_every = 50
    config.keep_checkpoints = 2
    config.log_every = 5
    config.sample_every = 50
    if kind == "text_lora":
        # one text-encoder LoRA serves every occupation: all 8 debiased prompts in every update (4 images each,
        # the same 32 images a step as 4 prompts x 8) and a slower EMA keep it from chasing the prompts of the
        # last step. Measured (M = 200, experiments/results/toy_tables.md, 2026-12-04): gender bias 0.716 -> 0.136 /
        # 0.119 / 0.157 over seeds 0-2 on the shipped world (held out 0.740 -> 0.180 / 0.245 / 0.085; an earlier
        # machine's seeds gave 0.121 / 0.129 / 0.176); 2 prompts x 8, EMA 0.9 overshot single occupations (dancer
        # 98% -> 33% female on an earlier world)
        config.train.prompts_per_step = 8
        config.train.images_per_prompt = 4
        config.adaptor.ema_decay = 0.98
    return config
