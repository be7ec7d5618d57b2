import math

import pytest
import torch

from lightning_prune.functional import (
    expected_l0,
    hard_concrete_gate,
    hard_concrete_mean,
    hard_concrete_sample,
    hard_sigmoid_l0,
    log_alpha_from_droprate,
)

# Louizos et al. 2018, verified by Monte Carlo with 2M samples, beta = 2/3
ORACLES = [(-2.0, 0.4010, 0.143, 0.043), (0.0, 0.8318, 0.500, 0.500), (2.5, 0.9837, 0.906, 1.0)]


@pytest.mark.parametrize(("log_alpha", "p_open", "mean", "gate"), ORACLES)
def test_closed_forms_match_the_oracles(log_alpha, p_open, mean, gate):
    la = torch.tensor([log_alpha], dtype=torch.float64)
    assert expected_l0(la).item() == pytest.approx(p_open, abs=1e-4)
    assert hard_concrete_gate(la).item() == pytest.approx(gate, abs=1e-3)


@pytest.mark.parametrize(("log_alpha", "p_open", "mean", "gate"), ORACLES)
def test_monte_carlo_of_the_sampler(log_alpha, p_open, mean, gate):
    g = torch.Generator().manual_seed(0)
    z = hard_concrete_sample(torch.full((400_000,), log_alpha, dtype=torch.float64), generator=g)
    assert z.min() >= 0 and z.max() <= 1
    assert (z > 0).double().mean().item() == pytest.approx(p_open, abs=3e-3)
    assert z.mean().item() == pytest.approx(mean, abs=3e-3)
    if log_alpha == 0.0:
        assert (z == 1).double().mean().item() == pytest.approx(0.1685, abs=3e-3)  # P(z = 1) at log_alpha = 0
    m = hard_concrete_mean(torch.tensor([log_alpha]), samples=200_000, generator=g)
    assert m.item() == pytest.approx(mean, abs=5e-3)


def test_beta_log_term_and_penalty_gradient_against_autograd():
    assert (2 / 3) * math.log(0.1 / 1.1) == pytest.approx(-1.5986, abs=1e-4)
    la = torch.tensor([-2.0, 0.0, 2.5], dtype=torch.float64, requires_grad=True)
    expected_l0(la).sum().backward()
    p = torch.sigmoid(la.detach() + (2 / 3) * math.log(11.0))
    assert torch.allclose(la.grad, p * (1 - p))  # d/dx sigmoid(x + c)
    assert torch.autograd.gradcheck(lambda x: expected_l0(x), (la.detach().clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: hard_sigmoid_l0(x), (la.detach().clone().requires_grad_(),))


def test_sampler_is_differentiable_and_seeded():
    la = torch.zeros(1000, requires_grad=True)
    z = hard_concrete_sample(la, generator=torch.Generator().manual_seed(1))
    z.sum().backward()
    assert la.grad is not None and la.grad.abs().sum() > 0
    again = hard_concrete_sample(la.detach(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(z.detach(), again)


def test_hard_sigmoid_variant_and_init():
    x = torch.tensor([-10.0, -1.5986, 10.0])
    assert hard_sigmoid_l0(x).tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-4)
    assert log_alpha_from_droprate(0.5) == 0.0
    assert log_alpha_from_droprate(0.2) == pytest.approx(1.386, abs=1e-3)
    assert log_alpha_from_droprate(0.3) == pytest.approx(0.847, abs=1e-3)
    with pytest.raises(ValueError, match="droprate"):
        log_alpha_from_droprate(1.0)
