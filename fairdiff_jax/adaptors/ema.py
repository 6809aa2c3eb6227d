"""Exponential moving average of the adaptor parameters (paper: decay 0.996; the EMA is what is exported)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PAPER_EMA_DECAY = 0.996


class AdaptorState(NamedTuple):
    """Trainable adaptor parameters and their EMA (two pytrees of the same structure). A pytree itself."""

    params: Any
    ema: Any


def init_adaptor_state(params: Any) -> AdaptorState:
    """The state at step 0: the EMA starts at the initial parameters (a float32 copy, never an alias, so
    the state can be donated)."""
    return AdaptorState(
        params=params, ema=jax.tree_util.tree_map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
    )


def ema_update(ema: Any, params: Any, decay: float | jax.Array = PAPER_EMA_DECAY) -> Any:
    """``decay * ema + (1 - decay) * params``, leaf by leaf (float32)."""
    decay = jnp.asarray(decay, jnp.float32)
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)


def update_adaptor_state(state: AdaptorState, new_params: Any, decay: float | jax.Array = PAPER_EMA_DECAY):
    """The state after an optimiser step: ``params = new_params``, EMA moved towards them."""
    return AdaptorState(params=new_params, ema=ema_update(state.ema, new_params, decay))
