"""The toy-world config (``configs/toy.py`` re-exports it; it lives in the package so ``fairdiff demo`` works
from any install). ``model.path`` / ``data.prompts`` = "toy" make the run use the embedded world's model,
classifiers and occupations. ARG picks the adaptor: ``text_lora`` (default), ``unet_lora``, ``both`` or
``soft_tokens``.
"""

from fairdiff_jax.config import TOY_MODEL_PATH, TOY_PROMPTS, adaptor_from_arg, attribute, base_config


def get_config(arg=None):
    config = base_config()
    config.model.path = TOY_MODEL_PATH
    config.model.dtype = "float32"
    config.adaptor.kind = adaptor_from_arg(arg, "toy.py")
    config.adaptor.rank = 4
    config.adaptor.alpha = 4.0
    config.adaptor.num_tokens = 2
    config.adaptor.ema_decay = 0.9
    config.sampler.guidance_scale = 3.0
    config.sampler.train_steps = (6, 8)
    config.sampler.eval_steps = 10
    # 8x8 pixels: unrolling the chain without remat halves the step on CPU (1.31 -> 0.65 s, 84 -> 590 MiB)
    config.sampler.unroll = 8
    config.sampler.remat_policy = "none"
    config.attributes.gender = attribute("gender", (0.5, 0.5), facial=False)
    config.loss.lambda_img = 8.0  # the paper's λ_img; 1.0 debiased faster but lost the cue (0.96 -> 0.77)
    config.loss.lambda_face = 0.0
    config.loss.num_ot_samples = 20
    config.data.prompts = (TOY_PROMPTS,)
    config.train.images_per_prompt = 8
    config.train.prompts_per_step = 2
    config.train.lr = 1e-2
    config.eval.images_per_prompt = 200
    config.eval.batch_size = 200
    config.num_steps = 200
    config.checkpoint_every = 50
    config.keep_checkpoints = 2
    config.log_every = 5
    config.sample_every = 50
    return config
