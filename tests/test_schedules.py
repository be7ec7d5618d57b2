import math

import pytest

from lightning_prune.callbacks.schedules import is_update_step, polynomial_sparsity, ramp


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (25, 0.5203), (50, 0.7875), (100, 0.9), (150, 0.9)])
def test_cubic_schedule_oracles(step, expected):
    # Zhu & Gupta's cubic schedule, s_i = 0, s_f = 0.9 over steps 0-100 (computed by hand)
    assert polynomial_sparsity(step, 0.0, 0.9, 0, 100) == pytest.approx(expected, abs=5e-5)


def test_schedule_is_clipped_before_begin_and_independent_of_the_update_window():
    assert polynomial_sparsity(-10, 0.2, 0.9, 0, 100) == pytest.approx(0.2)
    assert polynomial_sparsity(60, 0.0, 0.5, 50, 50) == pytest.approx(0.5)  # zero span: target at once
    assert polynomial_sparsity(50, 0.0, 0.9, 0, 100, exponent=1) == pytest.approx(0.45)


def test_first_update_is_at_begin_plus_frequency():
    # last_update starts at 0: with begin=0 and every_n_steps=10 the first mask update is at step 10
    updates, last = [], 0
    for step in range(0, 45):
        if is_update_step(step, 0, -1, 10, last):
            updates.append(step)
            last = step
    assert updates == [10, 20, 30, 40]


def test_update_window_end():
    assert is_update_step(30, 0, 30, 10, 20)
    assert not is_update_step(40, 0, 30, 10, 30)
    assert not is_update_step(5, 10, -1, 1, 0)


def test_ramps():
    assert ramp(0.5) == 0.5 and ramp(-1) == 0.0 and ramp(2) == 1.0
    assert (ramp(0.5, "cosine") == pytest.approx(0.5)
            and ramp(0.25, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi / 4))))
    with pytest.raises(ValueError, match="Unknown ramp"):
        ramp(0.1, "exp")
