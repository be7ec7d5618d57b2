"""Evolution strategies on a list of tensors, with perturbations regenerated from seeds.

Salimans, Ho, Chen, Sidor, Sutskever, "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning", 2017, arXiv:1703.03864 (Algorithm 2: every worker knows every seed, exchanges only fitness
scalars and regenerates every perturbation to apply the same update), with fitness shaping and mirrored
sampling as in openai/evolution-strategies-starter.

Nothing here stores a population: an offspring is ``parent + scale * eps(seed)``, and ``eps`` is drawn
again from its seed whenever it is needed (one tensor at a time), so memory is the parent plus one working
copy whatever the population size.

Example::

    seeds = [offspring_seed(generation_seed, k) for k in range(population // 2)]
    fitness = ...                      # F(parent + sigma * sign * eps(seed)) of every offspring
    weights = es_weights(fitness, antithetic=True)
    es_update_(params, parent, seeds, weights, sigma=0.02, lr=0.01, population=population)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "NOISE_KINDS",
    "add_perturbation_",
    "centered_ranks",
    "es_update_",
    "es_weights",
    "generation_seed",
    "noise_like",
    "normalized_fitness",
    "offspring_direction",
    "offspring_seed",
    "perturbation",
]

#: ``cut(i, noise)``: the part of tensor ``i``'s noise (drawn at its full shape) that this process holds
Cut = Callable[[int, Tensor], Tensor]

#: ``"uniform"``: U(-1, 1) (the noise of the Habr article «Спартанское обучение нейронных сетей»,
#: "Spartan training of neural networks", in Russian); ``"gaussian"``: N(0, 1) (Salimans et al.);
#: ``"uniform01"``: U(0, 1) (the multiplier of the gradient-shaped noise).
NOISE_KINDS = ("uniform", "gaussian", "uniform01")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generation_seed(generator: torch.Generator) -> int:
    """Draw the seed of one generation from ``generator`` (a 62-bit Python int)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def offspring_seed(generation_seed: int, index: int) -> int:
    """The seed of perturbation ``index`` of a generation: a SplitMix64 hash, distinct for every index.

    A pure function of two integers, so every rank (and a resumed run) derives the same seed.
    """
    return _splitmix64(_splitmix64(int(generation_seed) & _MASK64) ^ int(index)) >> 1  # fits in int64


def offspring_direction(index: int, antithetic: bool) -> tuple[int, float]:
    """Which perturbation offspring ``index`` uses and with which sign.

    With antithetic (mirrored) pairs offspring ``2k`` is ``+eps_k`` and ``2k + 1`` is ``-eps_k``.
    """
    return (index // 2, 1.0 if index % 2 == 0 else -1.0) if antithetic else (index, 1.0)


def noise_like(tensors: Sequence[Tensor], seed: int, kind: str = "gaussian",
               shapes: Sequence[Sequence[int]] | None = None, cut: Cut | None = None) -> Iterator[Tensor]:
    """Yield one noise tensor per tensor of ``tensors`` (same shape, dtype, device), drawn from ``seed``.

    The noise is generated lazily, in order, from one ``torch.Generator`` per device seeded with ``seed``:
    the same seed and the same tensors give bit-identical noise, and only one noise tensor is alive at a
    time when the caller consumes them one by one.

    Shards: when ``tensors`` are the local shards of larger tensors (FSDP2), ``shapes`` are the full tensors'
    shapes and ``cut(i, noise)`` keeps this process's part: every noise tensor is drawn whole from the shared
    seed (one at a time) and cut, so each process perturbs its part of exactly the noise an unsharded
    process draws (the generator's stream cannot skip to a shard's first element).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"Unknown noise kind {kind!r}; expected one of {list(NOISE_KINDS)}.")
    if (shapes is None) != (cut is None):
        raise ValueError("`shapes` and `cut` go together (the full shapes of sharded tensors and their cut).")
    generators: dict[torch.device, torch.Generator] = {}
    for i, tensor in enumerate(tensors):
        gen = generators.get(tensor.device)
        if gen is None:
            gen = generators[tensor.device] = torch.Generator(device=tensor.device).manual_seed(int(seed))
        shape = tensor.shape if shapes is None else tuple(shapes[i])
        out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        if kind == "gaussian":
            out.normal_(0.0, 1.0, generator=gen)
        elif kind == "uniform":
            out.uniform_(-1.0, 1.0, generator=gen)
        else:
            out.uniform_(0.0, 1.0, generator=gen)
        if cut is not None:
            out = cut(i, out)
            if out.shape != tensor.shape:
                raise ValueError(
                    f"cut({i}, noise) has shape {tuple(out.shape)}, the tensor {tuple(tensor.shape)}")
        yield out


def perturbation(tensors: Sequence[Tensor], seed: int, kind: str = "gaussian",
                 shape_by: Sequence[Tensor] | None = None,
                 masks: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """The whole perturbation ``eps(seed)`` as a list (see :func:`add_perturbation_` for the in-place form).

    Args:
        tensors: the parameters (only shapes, dtypes and devices are read).
        seed: the perturbation's seed.
        kind: one of :data:`NOISE_KINDS`.
        shape_by: optional tensors multiplying the noise elementwise (the gradient-shaped mutation).
        masks: optional boolean masks (``False`` = pruned, the perturbation is exactly zero there).
    """
    out = []
    for i, noise in enumerate(noise_like(tensors, seed, kind)):
        out.append(_shape(noise, i, shape_by, masks))
    return out


def _shape(noise: Tensor, i: int, shape_by: Sequence[Tensor] | None,
           masks: Sequence[Tensor | None] | None) -> Tensor:
    if shape_by is not None:
        noise.mul_(shape_by[i])
    if masks is not None and masks[i] is not None:
        noise.mul_(masks[i])
    return noise


@torch.no_grad()
def add_perturbation_(params: Sequence[Tensor], parent: Sequence[Tensor], seed: int, scale: float,
                      kind: str = "gaussian", shape_by: Sequence[Tensor] | None = None,
                      masks: Sequence[Tensor | None] | None = None,
                      shapes: Sequence[Sequence[int]] | None = None, cut: Cut | None = None) -> None:
    """Set ``params[i] = parent[i] + scale * eps_i(seed)`` in place, one noise tensor at a time.

    Masked positions (``masks[i] == False``) keep their parent value exactly (a pruned zero stays zero).
    ``shapes`` and ``cut``: ``params`` are local shards (see :func:`noise_like`).
    """
    for i, noise in enumerate(noise_like(parent, seed, kind, shapes, cut)):
        noise = _shape(noise, i, shape_by, masks)
        params[i].copy_(parent[i]).add_(noise, alpha=float(scale))


def centered_ranks(fitness: Tensor) -> Tensor:
    """openai/evolution-strategies-starter's ``centered_rank``: ``rank / (n - 1) - 0.5``.

    The result is always the grid ``{-0.5, -0.5 + 1/(n-1), ..., 0.5}`` (a permutation of it); ties are
    broken by position, so the output does not depend on the scale of the fitness. ``n = 1`` gives ``0``.
    """
    flat = fitness.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    if n < 2:
        return torch.zeros_like(flat)
    order = torch.sort(flat, stable=True).indices
    ranks = torch.empty(n, dtype=torch.float64, device=flat.device)
    ranks[order] = torch.arange(n, dtype=torch.float64, device=flat.device)
    return ranks / (n - 1) - 0.5


def normalized_fitness(fitness: Tensor) -> Tensor:
    """PyTorch-ES's z-scored fitness ``(F - mean) / std`` (population std); all zeros when ``std == 0``."""
    flat = fitness.detach().reshape(-1).to(torch.float64)
    std = flat.std(unbiased=False) if flat.numel() > 1 else flat.new_zeros(())
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(flat)
    return (flat - flat.mean()) / std


def es_weights(fitness: Tensor, antithetic: bool = True, shaping: str = "centered_rank") -> Tensor:
    """The weight of every perturbation ``eps_k`` in the ES update, from the offspring's fitness.

    Fitness is shaped (``"centered_rank"`` or ``"normalized"``); non-finite fitness counts as the worst.
    With antithetic pairs the weight of ``eps_k`` is ``F_{2k} - F_{2k+1}`` (``+eps_k`` minus ``-eps_k``).

    Returns:
        a float64 tensor with one weight per perturbation (``n / 2`` with antithetic pairs, else ``n``).
    """
    f = fitness.detach().reshape(-1).to(torch.float64)
    if not torch.isfinite(f).all():
        finite = f[torch.isfinite(f)]
        worst = (finite.min() - 1.0) if finite.numel() else f.new_zeros(())
        f = torch.where(torch.isfinite(f), f, worst)
    if shaping == "centered_rank":
        shaped = centered_ranks(f)
    elif shaping == "normalized":
        shaped = normalized_fitness(f)
    else:
        raise ValueError(f"Unknown fitness shaping {shaping!r}; expected 'centered_rank' or 'normalized'.")
    if antithetic:
        if shaped.numel() % 2:
            raise ValueError(
                f"Antithetic pairs need an even population, got {shaped.numel()} fitness values.")
        return shaped[0::2] - shaped[1::2]
    return shaped


@torch.no_grad()
def es_update_(params: Sequence[Tensor], parent: Sequence[Tensor], seeds: Sequence[int], weights: Tensor,
               sigma: float, lr: float, population: int, kind: str = "gaussian",
               shape_by: Sequence[Tensor] | None = None,
               masks: Sequence[Tensor | None] | None = None, shapes: Sequence[Sequence[int]] | None = None,
               cut: Cut | None = None) -> None:
    """Salimans et al.'s update ``theta = parent + lr / (n sigma) * sum_k w_k eps_k``, in place.

    Every ``eps_k`` is regenerated from ``seeds[k]`` (one tensor at a time), so no perturbation is stored;
    the same seeds and weights give bit-identical results on every process. Masked positions keep the
    parent's value exactly.

    Args:
        params: the tensors to write (the model's parameters).
        parent: the parent's values (may be ``params`` themselves only if no copy is needed).
        seeds: one seed per perturbation, aligned with ``weights``.
        weights: from :func:`es_weights`.
        sigma: the perturbation scale the offspring were evaluated at.
        lr: the ES step size (``alpha``).
        population: ``n``, the number of offspring evaluated.
        shapes, cut: ``params`` are local shards of tensors of these shapes (see :func:`noise_like`).
    """
    if len(seeds) != weights.numel():
        raise ValueError(f"{len(seeds)} seeds for {weights.numel()} weights.")
    for p, q in zip(params, parent):
        if p is not q:
            p.copy_(q)
    coef = float(lr) / (int(population) * float(sigma))
    for seed, w in zip(seeds, weights.tolist()):
        if w == 0.0:
            continue
        for i, noise in enumerate(noise_like(parent, seed, kind, shapes, cut)):
            noise = _shape(noise, i, shape_by, masks)
            params[i].add_(noise, alpha=coef * w)
