from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from estuary.adapters import ServerAdam

finite = st.floats(-1.0, 1.0, allow_nan=False).filter(lambda x: abs(x) > 1e-4)


@settings(max_examples=50, deadline=None)
@given(values=arrays(np.float64, (3, 4), elements=finite), scale=st.floats(0.01, 100.0))
def test_first_step_is_lr_times_sign_and_scale_invariant(values: np.ndarray, scale: float) -> None:
    values[:, 3] = 0.0  # an untrained column (rank 3 of r_max 4)

    step = ServerAdam(lr=0.05).step({"m": values})["m"]
    scaled = ServerAdam(lr=0.05).step({"m": values * scale})["m"]

    np.testing.assert_allclose(step[:, :3], 0.05 * np.sign(values[:, :3]), rtol=1e-4)
    assert not step[:, 3].any()
    np.testing.assert_allclose(step, scaled, rtol=1e-3, atol=1e-9)


def test_consistent_direction_keeps_full_steps_and_flips_are_damped() -> None:
    steady = ServerAdam(lr=0.1)
    flipping = ServerAdam(lr=0.1)
    update = {"m": np.ones((2, 2))}

    steady_steps = [steady.step(update)["m"][0, 0] for _ in range(5)]
    flip_steps = [flipping.step({"m": update["m"] * (-1) ** i})["m"][0, 0] for i in range(5)]

    np.testing.assert_allclose(steady_steps, 0.1, rtol=1e-4)
    assert abs(flip_steps[-1]) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"lr": 0}, "lr"), ({"beta1": 1.0}, "beta1"), ({"eps": 0}, "eps")]
)
def test_bad_hyperparameters_name_the_parameter(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ServerAdam(**kwargs)


def test_reset_forgets_moments() -> None:
    opt = ServerAdam(lr=0.1)
    opt.step({"m": np.ones(3)})
    opt.step({"m": np.ones(3)})

    opt.reset()

    assert opt.rounds == 0
    np.testing.assert_allclose(opt.step({"m": -np.ones(3)})["m"], -0.1, rtol=1e-4)
