"""The optimiser of the adaptor: AdamW (the paper's) with a constant or cosine-decayed learning rate."""

from __future__ import annotations

import optax

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg) -> optax.Schedule:
    """The paper's constant rate (DESIGN.md §1.3), or a cosine decay to ``lr * final_lr_fraction``."""
    lr = float(cfg.train.lr)
    if cfg.train.lr_schedule == "constant":
        return optax.constant_schedule(lr)
    return optax.cosine_decay_schedule(lr, int(cfg.num_steps), alpha=float(cfg.train.final_lr_fraction))


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with :func:`learning_rate`; the schedule counts the optimizer's own steps, so resumes continue it."""
    b1, b2 = (float(b) for b in cfg.train.betas)
    return optax.adamw(learning_rate(cfg), b1=b1, b2=b2, weight_decay=float(cfg.train.weight_decay))
