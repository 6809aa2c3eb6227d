"""Exponential moving average of the adaptor parameters (paper: decay 0.996; the EMA is what is exported)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PAPER_EMA_DECAY = 0.996


def warmed_up_decay(decay: float | jax.Array, update_count: int | jax.Array) -> jax.Array:
    """The decay of EMA update number ``update_count`` (1 = first) under diffusers' ``EMAModel`` warm-up.

    ``min(decay, (1 + s) / (10 + s))`` with ``s = update_count - 1``, and 0 for the first update (the EMA
    becomes the parameters): ``EMAModel.get_decay`` with its defaults (``use_ema_warmup=False``,
    ``update_after_step=0``, ``min_decay=0``), the same in diffusers 0.19.3 and 0.39. The paper's authors
    build ``EMAModel(params, decay=0.996)`` and step it after every finite optimiser step
    (sail-sg/finetune-fair-diffusion, exp-1-debias-gender/1-main-debias.py), so their EMA warms up:
    0.5 at update 9, 0.9 at update 81, 0.996 from update 2241 on.
    """
    steps = jnp.asarray(update_count, jnp.float32) - 1.0
    ramp = jnp.where(steps <= 0, 0.0, (1.0 + steps) / (10.0 + jnp.maximum(steps, 0.0)))
    return jnp.minimum(jnp.asarray(decay, jnp.float32), ramp)


def ema_update(
    ema: Any, params: Any, decay: float | jax.Array = PAPER_EMA_DECAY, *, update_count: int | jax.Array | None = None
) -> Any:
    """``d * ema + (1 - d) * params``, leaf by leaf (float32); ``d = decay``, or with ``update_count`` (the
    1-based number of this update) the warmed-up :func:`warmed_up_decay`."""
    decay = jnp.asarray(decay, jnp.float32) if update_count is None else warmed_up_decay(decay, update_count)
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
