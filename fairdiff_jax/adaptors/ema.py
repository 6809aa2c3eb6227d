"""Exponential moving average of the adaptor parameters (paper: decay 0.996; the EMA is what is exported)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PAPER_EMA_DECAY = 0.996


def ema_update(ema: Any, params: Any, decay: float | jax.Array = PAPER_EMA_DECAY) -> Any:
    """``decay * ema + (1 - decay) * params``, leaf by leaf (float32)."""
    decay = jnp.asarray(decay, jnp.float32)
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
