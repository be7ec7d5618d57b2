"""Oracles for the evolution-strategies functions (Salimans et al. 2017)."""

import pytest
import torch

from lightning_prune.functional.evolution import (
    NOISE_KINDS,
    add_perturbation_,
    centered_ranks,
    es_update_,
    es_weights,
    generation_seed,
    noise_like,
    normalized_fitness,
    offspring_direction,
    offspring_seed,
    perturbation,
)


def _tensors():
    return [torch.zeros(7, 3, 3, 3), torch.zeros(11), torch.zeros(5, 4, dtype=torch.float64)]


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_regenerated_perturbations_are_bit_identical(kind):
    tensors = _tensors()
    a = perturbation(tensors, seed=1234, kind=kind)
    torch.manual_seed(99)  # the global RNG plays no part
    torch.rand(100)
    b = perturbation(tensors, seed=1234, kind=kind)
    c = perturbation(tensors, seed=1235, kind=kind)
    for x, y, z, t in zip(a, b, c, tensors):
        assert x.shape == t.shape and x.dtype == t.dtype
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    flat = torch.cat([x.reshape(-1).float() for x in a])
    if kind == "uniform":
        assert flat.min() >= -1 and flat.max() <= 1 and flat.min() < -0.8 and flat.max() > 0.8
    elif kind == "uniform01":
        assert flat.min() >= 0 and flat.max() <= 1
    else:
        assert abs(float(flat.mean())) < 0.2 and 0.8 < float(flat.std()) < 1.2


def test_offspring_are_rebuilt_bit_identically_in_place_and_masks_hold():
    parent = [torch.randn(6, 4), torch.randn(9)]
    mask = torch.rand(6, 4) > 0.5
    parent[0][~mask] = 0
    work = [torch.empty_like(p) for p in parent]
    add_perturbation_(work, parent, seed=7, scale=0.3, kind="uniform", masks=[mask.float(), None])
    first = [w.clone() for w in work]
    add_perturbation_(work, parent, seed=8, scale=0.3, kind="uniform", masks=[mask.float(), None])
    add_perturbation_(work, parent, seed=7, scale=0.3, kind="uniform", masks=[mask.float(), None])
    assert all(torch.equal(a, b) for a, b in zip(first, work))
    eps = perturbation(parent, seed=7, kind="uniform", masks=[mask.float(), None])
    assert torch.equal(work[1], parent[1] + 0.3 * eps[1])
    assert torch.all(work[0][~mask] == 0) and torch.all(work[0][mask] != parent[0][mask])


def test_noise_is_lazy_one_tensor_at_a_time():
    it = noise_like([torch.zeros(3), torch.zeros(4)], seed=0)
    assert next(it).shape == (3,)
    assert next(it).shape == (4,)


def test_offspring_seeds_are_distinct_deterministic_and_fit_int64():
    seeds = [offspring_seed(123, i) for i in range(2000)]
    assert len(set(seeds)) == 2000
    assert seeds == [offspring_seed(123, i) for i in range(2000)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert offspring_seed(124, 0) != seeds[0]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [generation_seed(g1) for _ in range(3)] == [generation_seed(g2) for _ in range(3)]


def test_antithetic_directions():
    assert [offspring_direction(i, True) for i in range(4)] == [(0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0)]
    assert [offspring_direction(i, False) for i in range(3)] == [(0, 1.0), (1, 1.0), (2, 1.0)]


@pytest.mark.parametrize("n", [2, 5, 40])
def test_centered_ranks_form_a_fixed_grid_in_half_interval(n):
    grid = torch.arange(n, dtype=torch.float64) / (n - 1) - 0.5
    for seed in range(3):
        fitness = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 10**seed
        ranks = centered_ranks(fitness)
        assert torch.equal(torch.sort(ranks).values, grid)
        assert ranks.min() == -0.5 and ranks.max() == 0.5
        assert torch.equal(centered_ranks(fitness ** 3 * 2 + 1), ranks)  # invariant to monotone transforms
    assert centered_ranks(torch.tensor([3.0, 1.0, 2.0])).tolist() == [0.5, -0.5, 0.0]
    assert centered_ranks(torch.tensor([1.0, 1.0])).tolist() == [-0.5, 0.5]  # ties broken by position


def test_normalized_fitness_is_z_scored_and_zero_without_spread():
    z = normalized_fitness(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(z.std(unbiased=False)) == pytest.approx(1.0)
    assert torch.equal(normalized_fitness(torch.full((4,), 2.5)), torch.zeros(4, dtype=torch.float64))


def test_es_weights_pair_differences_and_non_finite_fitness_is_worst():
    f = torch.tensor([4.0, 1.0, 2.0, 3.0])
    r = centered_ranks(f)
    assert torch.equal(es_weights(f, antithetic=True), torch.stack([r[0] - r[1], r[2] - r[3]]))
    assert torch.equal(es_weights(f, antithetic=False), r)
    w = es_weights(torch.tensor([float("nan"), 0.0, 1.0, 2.0]), antithetic=False)
    assert w[0] == -0.5
    with pytest.raises(ValueError, match="even population"):
        es_weights(torch.ones(3), antithetic=True)
    with pytest.raises(ValueError, match="fitness shaping"):
        es_weights(torch.ones(2), shaping="rank")


def _es_step(theta, target, gen_seed, n=20, sigma=0.05, lr=0.02, kind="gaussian", shaping="centered_rank",
             masks=None):
    """One generation of OpenAI-ES on F = -||theta - target||^2, everything regenerated from seeds."""
    parent = [theta.clone()]
    work = [torch.empty_like(theta)]
    fitness = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        k, sign = offspring_direction(i, True)
        add_perturbation_(work, parent, offspring_seed(gen_seed, k), sign * sigma, kind, masks=masks)
        fitness[i] = -((work[0] - target) ** 2).sum()
    weights = es_weights(fitness, antithetic=True, shaping=shaping)
    seeds = [offspring_seed(gen_seed, k) for k in range(n // 2)]
    out = [torch.empty_like(theta)]
    es_update_(out, parent, seeds, weights, sigma, lr, n, kind, masks=masks)
    return out[0]


@pytest.mark.parametrize(("kind", "shaping"), [("gaussian", "centered_rank"), ("uniform", "centered_rank"),
                                               ("gaussian", "normalized")])
def test_es_on_negative_squared_distance_moves_toward_the_optimum(kind, shaping):
    target = torch.linspace(-1, 1, 50)
    theta = torch.zeros(50)
    distances = [float((theta - target).norm())]
    for gen in range(60):
        theta = _es_step(theta, target, gen_seed=gen, kind=kind, shaping=shaping)
        distances.append(float((theta - target).norm()))
    assert distances[1] < distances[0]  # the first step already goes the right way
    assert distances[-1] < 0.35 * distances[0]
    assert sum(b < a for a, b in zip(distances, distances[1:])) > 30  # most generations get closer


def test_es_update_is_bit_identical_when_recomputed_and_respects_masks():
    target = torch.linspace(-1, 1, 30)
    mask = (torch.arange(30) % 3 != 0).float()
    theta = torch.randn(30) * mask
    a = _es_step(theta, target, gen_seed=3, masks=[mask])
    b = _es_step(theta.clone(), target, gen_seed=3, masks=[mask])
    assert torch.equal(a, b)
    assert torch.all(a[mask == 0] == 0) and not torch.equal(a, theta)


def test_es_update_formula_single_direction():
    parent = [torch.zeros(5)]
    out = [torch.empty(5)]
    weights = torch.tensor([0.5, -0.25], dtype=torch.float64)
    es_update_(out, parent, [11, 12], weights, sigma=0.1, lr=0.2, population=4, kind="gaussian")
    e1, e2 = perturbation(parent, 11)[0], perturbation(parent, 12)[0]
    expected = 0.2 / (4 * 0.1) * (0.5 * e1 - 0.25 * e2)
    assert torch.allclose(out[0], expected, atol=1e-7)
    with pytest.raises(ValueError, match="2 seeds for 3 weights"):
        es_update_(out, parent, [1, 2], torch.ones(3), 0.1, 0.1, 6)
