"""A size budget's plan (lightning_prune.core.allocation): the fewest lowest-ranked units that meet it, and
the most important of them given back where the last one taken overshoots."""

from __future__ import annotations

import pytest
import torch

from lightning_prune.core.allocation import RankedRemoval, budget_plan
from lightning_prune.graph import ChannelGroup

# two heads of 0.3 of the FLOPs each, and 16 channels of 0.0125 each
HEAD_COST, CHANNEL_COST = 0.3, 0.0125


def _groups():
    return [ChannelGroup("heads", 2, "head", 8, (), (), ("heads",)),
            ChannelGroup("channels", 16, "channel", 1, (), (), ("channels",))]


def _scores():  # every channel ranks below both heads: a prefix takes 15 channels, then a head
    return [torch.tensor([0.5, 2.0]), torch.arange(1, 17, dtype=torch.float64) / 100]


def _remaining(plan, channel_cost=CHANNEL_COST):
    return 1.0 - HEAD_COST * len(plan.get("heads", ())) - channel_cost * len(plan.get("channels", ()))


def test_a_large_last_unit_is_offset_by_the_most_important_removed_units_coming_back():
    removal = RankedRemoval(_groups(), _scores(), [1, 1])
    prefix = removal(16)  # what the fewest units in the ranking that meet 0.75 are
    assert _remaining(prefix) == pytest.approx(0.5125)  # 0.24 below the target
    plan = budget_plan(removal, _remaining, _remaining, 0.75)
    # the head stays removed (giving it back breaks the target); all 15 channels come back
    assert plan.met and plan.removed == {"heads": [0]}
    assert plan.measured == pytest.approx(0.7)


def test_channels_come_back_in_steps_of_round_to_most_important_first():
    removal = RankedRemoval(_groups(), _scores(), [1, 1], round_to=4)
    plan = budget_plan(removal, _remaining, _remaining, 0.66)
    # the prefix keeps 4 channels (0.55 with the head); two steps of 4 come back (0.65), a third would not fit
    assert plan.removed == {"heads": [0], "channels": [0, 1, 2, 3]}  # the lowest-ranked stay removed
    assert plan.measured == pytest.approx(0.65)


def test_a_prediction_that_underestimates_the_steps_is_corrected_by_measuring_them():
    removal = RankedRemoval(_groups(), _scores(), [1, 1])

    def predict(plan):  # half the channels' true cost: it would give back 14 of them
        return _remaining(plan, CHANNEL_COST / 2)

    plan = budget_plan(removal, predict, _remaining, 0.605)
    # measured, 7 channels fit (0.5125 + 7 * 0.0125 = 0.6); the bisection over the steps finds them
    assert plan.met and len(plan.removed["channels"]) == 15 - 7
    assert plan.measured == pytest.approx(0.6)


def test_a_target_the_groups_cannot_reach_says_what_removing_everything_keeps():
    removal = RankedRemoval(_groups(), _scores(), [1, 1])
    plan = budget_plan(removal, _remaining, _remaining, 0.1)
    assert not plan.met and plan.floor == pytest.approx(1 - HEAD_COST - 15 * CHANNEL_COST)


def test_a_group_whose_step_the_measurement_refuses_returns_no_more_and_the_others_still_do():
    """The most important unit taken is one the prediction makes cheap (0.01 of the FLOPs, 0.04 counted):
    given back first, it breaks the target; the give-back runs again without its group, and two of the
    other group's channels come back (without the second round: 0.89, both steps refused together)."""
    groups = [ChannelGroup(name, size, "channel", 1, (), (), (name,)) for name, size in (("x", 2), ("y", 8))]
    scores = [torch.tensor([0.085, 9.0]), torch.arange(1, 9, dtype=torch.float64) / 100]

    def cost(per_x):
        return lambda plan: 1.0 - per_x * len(plan.get("x", ())) - 0.01 * len(plan.get("y", ()))

    plan = budget_plan(RankedRemoval(groups, scores, [1, 1]), cost(0.01), cost(0.04), 0.9105)
    assert plan.met and plan.removed == {"x": [0], "y": [0, 1, 2, 3, 4]}
    assert plan.measured == pytest.approx(0.91)
