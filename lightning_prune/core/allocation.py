"""Which units a size budget removes: one ranking across groups, one search, for every channel callback and
for :func:`~lightning_prune.core.one_shot.prune_one_shot`.

The units go in ascending score across all groups (each group keeping its floor), the widths rounded up to
``round_to``; a FLOPs or parameter budget takes the fewest of them that meets it (:func:`budget_plan`). The
last unit such a prefix takes can be large -- half a layer where a group has two units -- and overshoot
the target; :meth:`RankedRemoval.give_back` then returns removed units, the most important first, while the
target still holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_prune.core.compression import round_kept

__all__ = ["BudgetPlan", "RankedRemoval", "budget_plan"]

Plan = dict[str, list[int]]


class RankedRemoval:
    """``removal(n)``: the ``n`` lowest ``scores`` across ``groups`` (group ``g`` losing at most
    ``size - floors[g]`` units), made feasible and rounded to ``round_to`` per group
    (:func:`~lightning_prune.core.compression.round_kept`: the largest scores come back first); a plan maps
    group name -> sorted removed units. ``total``: the most units that can go."""

    def __init__(self, groups: Sequence[Any], scores: Sequence[Tensor], floors: Sequence[int],
                 round_to: int = 1) -> None:
        self.groups, self.round_to = list(groups), int(round_to)
        self.scores = [[float(s) for s in sc.tolist()] for sc in scores]
        self.floors = list(floors)
        self.order = sorted((s, gi, u) for gi, sc in enumerate(self.scores) for u, s in enumerate(sc))
        self.total = sum(max(g.size - f, 0) for g, f in zip(self.groups, self.floors))

    def __call__(self, n: int) -> Plan:
        chosen: dict[int, list[int]] = {}
        for _, gi, u in self.order:
            if n <= 0:
                break
            if len(chosen.get(gi, [])) < self.groups[gi].size - self.floors[gi]:
                chosen.setdefault(gi, []).append(u)
                n -= 1
        return {self.groups[gi].name: sorted(round_kept(self.groups[gi], units, self.round_to,
                                                        self._most_important_first(gi, units)))
                for gi, units in chosen.items()}

    def _most_important_first(self, gi: int, units: Sequence[int]) -> list[int]:
        return sorted(units, key=lambda u: (-self.scores[gi][u], u))

    def give_back(self, removed: Mapping[str, Sequence[int]], fits: Callable[[Plan], bool],
                  closed: frozenset[str] = frozenset()) -> list[tuple[str, Plan]]:
        """The plans, one per step, of returning removed units to ``removed`` while ``fits(plan)`` holds, each
        with the group it returned units to: each group's removed units, most important first, in steps that
        keep its width a multiple of ``round_to`` (one unit where its units are not channels), the step with
        the most important unit over all groups tried first; a group whose next step does not fit returns no
        more, nor do the ``closed`` groups."""
        plan = {name: list(units) for name, units in removed.items()}
        index = {g.name: gi for gi, g in enumerate(self.groups)}
        queues = {name: self._most_important_first(index[name], units) for name, units in plan.items()
                  if units and name in index and name not in closed}
        steps: list[tuple[str, Plan]] = []
        while queues:
            name = max(queues, key=lambda k: (self.scores[index[k]][queues[k][0]], k))
            group, queue = self.groups[index[name]], queues[name]
            step = self.round_to if group.unit == "channel" and self.round_to > 1 else 1
            back = set(queue[:step])
            trial = {**plan, name: sorted(group.feasible(u for u in plan[name] if u not in back))}
            if not fits(trial):
                del queues[name]
                continue
            plan = trial
            steps.append((name, {k: v for k, v in plan.items() if v}))
            queues[name] = [u for u in queue if u not in back and u in trial[name]]
            if not queues[name]:
                del queues[name]
        return steps


@dataclass
class BudgetPlan:
    """What :func:`budget_plan` chose: the plan, its measured remaining fraction, and whether the target
    holds (``floor``: with the target unmet, what removing every removable unit keeps)."""

    removed: Plan
    measured: float
    met: bool
    floor: float | None = None


def budget_plan(removal: RankedRemoval, predict: Callable[[Plan], float], measure: Callable[[Plan], float],
                target: float) -> BudgetPlan:
    """The fewest units in ``removal``'s ranking whose remaining fraction (FLOPs or parameters) is at most
    ``target``, then the most important of them given back while it still is.

    ``predict(plan)`` is fast and close (within ~1%); ``measure(plan)`` exact and slow: the bisection runs on
    the prediction, its goal corrected by the measurement (up to four times); still above, more units go, in
    growing strides, until the measurement meets the target. The units given back are checked against the
    prediction (what each step adds to the measured plan's remaining fraction), then measured: the most steps
    the measurement accepts stay (a bisection over the steps); where it refuses one, the give-back runs again
    from there without that step's group (at most three rounds)."""
    measured_plans: dict[tuple, float] = {}  # rounding maps neighbouring counts to one plan: measured once

    def measure_once(plan: Plan) -> float:
        key = tuple(sorted((k, tuple(v)) for k, v in plan.items()))
        if key not in measured_plans:
            measured_plans[key] = float(measure(plan))
        return measured_plans[key]

    total = removal.total
    goal, n = float(target), 0
    removed: Plan = {}
    measured = 1.0  # (measured in the first round)
    for _ in range(4):
        lo, hi = 0, total
        while lo < hi:  # the fewest removals the prediction says meet the goal
            mid = (lo + hi) // 2
            if predict(removal(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        if n and removal(lo) == removed:  # the corrected goal chose the same plan: the strides below go on
            break
        n, removed = lo, removal(lo)
        measured = measure_once(removed)
        if measured <= target or n == total:
            break
        goal *= target / measured
    step = 1
    while measured > target and n < total:  # still above: remove more, with growing strides, until met
        n = min(n + step, total)
        step *= 2
        removed = removal(n)
        measured = measure_once(removed)
    if measured > target:
        floor = measured if n == total else measure_once(removal(total))
        return BudgetPlan(removed, measured, False, floor)
    closed: set[str] = set()  # groups whose step the measurement refused: they return no more
    for _ in range(3):
        # what a step adds is predicted as a difference from the measured plan (the prediction's bias cancels)
        base, slack = predict(removed), float(target) - measured
        steps = removal.give_back(removed, lambda plan, base=base, slack=slack: predict(plan) - base <= slack,
                                  frozenset(closed))
        lo, hi = 0, len(steps)  # the most steps whose measurement still meets the target
        if steps and measure_once(steps[-1][1]) <= target:  # (the prediction is close: usually all of them)
            lo, removed, measured = len(steps), steps[-1][1], measure_once(steps[-1][1])
        while lo < hi:  # (bisected)
            mid = (lo + hi + 1) // 2
            after = measure_once(steps[mid - 1][1])
            if after <= target:
                lo, removed, measured = mid, steps[mid - 1][1], after
            else:
                hi = mid - 1
        if lo == len(steps):  # every step offered fits (or none was offered)
            break
        closed.add(steps[lo][0])  # the first refused step's group; the others may still fit
    return BudgetPlan(removed, measured, True)
