"""EMA warm-up against diffusers' ``EMAModel`` (what the paper's authors step after every finite update)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.adaptors.ema import ema_update, warmed_up_decay


def trajectory(rng, steps):
    return [{"down": rng.standard_normal((3, 2)), "up": rng.standard_normal((2, 4))} for _ in range(steps)]


def test_warm_up_matches_diffusers_ema_model():
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import EMAModel

    rng = np.random.default_rng(0)
    initial = {"down": rng.standard_normal((3, 2)), "up": np.zeros((2, 4))}
    params = [torch.nn.Parameter(torch.tensor(initial[k], dtype=torch.float64)) for k in ("down", "up")]
    reference = EMAModel(params, decay=0.996)
    ema = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), initial)
    for count, values in enumerate(trajectory(rng, 40), start=1):
        with torch.no_grad():
            for p, k in zip(params, ("down", "up")):
                p.copy_(torch.tensor(values[k]))
        reference.step(params)
        ema = ema_update(ema, values, 0.996, update_count=count)
        assert abs(float(warmed_up_decay(0.996, count)) - reference.cur_decay_value) < 1e-7
        for shadow, k in zip(reference.shadow_params, ("down", "up")):
            np.testing.assert_allclose(np.asarray(ema[k]), shadow.numpy(), rtol=1e-5, atol=1e-6)
    # the first update copies the parameters; late updates use the configured decay
    assert float(warmed_up_decay(0.996, 1)) == 0.0
    assert float(warmed_up_decay(0.996, jnp.asarray(5000))) == pytest.approx(0.996)


def test_without_update_count_the_decay_is_constant_and_counts_may_be_traced():
    ema = {"w": jnp.ones(3)}
    for _ in range(3):
        ema = ema_update(ema, {"w": jnp.zeros(3)}, 0.9)
    np.testing.assert_allclose(np.asarray(ema["w"]), 0.9**3, rtol=1e-6)
    step = jax.jit(lambda e, p, n: ema_update(e, p, 0.996, update_count=n))
    warmed = step({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, jnp.asarray(3))
    np.testing.assert_allclose(np.asarray(warmed["w"]), 3 / 12, rtol=1e-6)  # (1 + 2) / (10 + 2)
