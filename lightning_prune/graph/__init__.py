"""Channel-group analysis: which channel dimensions of a model can be removed exactly, and how.

Two engines find the candidate groups. The default (``engine="traced"``, :mod:`.labels`) exports the model
with ``torch.export`` and follows a unit label for every dimension of every tensor through every ATen
operator (views into heads, splits and chunks, concatenations, contractions, normalisations), with no list of
module classes; when the model cannot be exported, or with ``engine="torch-pruning"``, torch-pruning's
``DependencyGraph`` and the expansions below are used, as before. Either way every group is proven exact.

Shared by the gate callbacks, the channel baselines and :func:`lightning_prune.compress`. torch-pruning's
``DependencyGraph`` traces the model and maps indices through concatenations, residual sums, depthwise convs
and reshapes; this module expands its groups itself (a visited-set expansion that stays linear where
torch-pruning's re-adds every index subset), turns each into a :class:`ChannelGroup`, and keeps only the
groups whose removal is proven exact.

A group is a set of **units** removed together: a channel (a conv filter, a Linear unit, a residual-stream
channel with every producer, BatchNorm, LayerNorm entry, ``pos_embed``/``cls_token``/layer-scale entry and
reader column coupled to it), a whole attention **head** of timm's ``Attention`` (its q, k and v rows and its
``proj`` columns; ``num_heads`` is updated), or a whole **conv group** of a grouped convolution (ResNeXt,
RegNet: the channels that feed the group, the group's filters and their readers; ``groups`` is updated).

A unit is removed exactly when nothing reads it: every layer that mixes channels -- a Conv/Linear reading them
(an **input site**: the gate multiplies its input channels, and folds into its weight columns), a LayerNorm,
GroupNorm(1) or GRN computing statistics over them (a **norm site**: once units are pruned, its statistics are
taken over the kept channels only) -- must not see it. Depthwise convs, BatchNorms, activations, additions and
squeeze-excite multiplies act per channel and are sliced along. The claim is **checked, not assumed**: on a
float64 copy with random BatchNorm statistics, norm affines, biases, gains and layer scales, a random subset
of every group's units is masked (zero at the input sites, restricted norm sites) and the masked outputs are
compared with those of a copy from which the units were physically sliced; a group that breaks the equality
(or the slicing) is left alone with the reason. Groups that cannot be sliced at all (split sizes fixed in the
model's code, channel-mixing ops) are rejected before that check, each with its reason. A reader that computes
its weight from its parameters (a weight-standardised conv, a ``weight_norm`` Linear) is **frozen** into a
plain layer holding the computed weight before its input channels go (``frozen``,
:attr:`ChannelGroup.frozen`).

Example::

    analysis = analyse_channels(timm.create_model("resnet50"), torch.randn(2, 3, 64, 64))
    print(analysis.coverage, len(analysis.groups), analysis.skipped)
    small = copy.deepcopy(model); slice_units(small, analysis.groups,
                                              {g.name: [0, 1] for g in analysis.groups})

The package, one idea per module: ``types`` (groups, sites, slices, errors), ``inputs`` (what to
trace and with what), ``layers`` (layer kinds), ``dependencies`` (raw groups from torch-pruning's dependency
graph), ``slicing`` (masking and slicing units), ``proof`` (the exactness check), ``cost`` (FLOPs and
parameters), ``latency`` (the measured latency table),
``frozen`` (readers that compute their weight, frozen into plain layers), ``along`` (convs sliding along
the units, run at the dense width once some are gone), ``budget`` (the time limit) and
``analysis`` (:func:`analyse_channels`, orchestrating them).
Every public name is re-exported here.
"""

from lightning_prune.graph.along import (
    ALONG_TYPES,
    AlongUnitsConv1d,
    AlongUnitsConv2d,
    AlongUnitsConv3d,
    along_units_layers,
    rewrap_along_units,
)
from lightning_prune.graph.analysis import analyse_channels
from lightning_prune.graph.budget import DEFAULT_ANALYSIS_TIME_LIMIT_S, GRAPH_TIME_LIMIT_S
from lightning_prune.graph.cost import CostModel, count_ops_and_params, meta_copy
from lightning_prune.graph.frozen import (
    FROZEN_MARKER,
    FROZEN_TYPES,
    FrozenConv1d,
    FrozenConv2d,
    FrozenConv3d,
    FrozenLinear,
    effective_weight,
    freeze,
    freeze_modules,
    frozen_in_state,
    frozen_names,
    refreeze,
)
from lightning_prune.graph.inputs import (
    call_model,
    evaluating,
    example_inputs_for,
    like_model,
    module_modes,
    restore_modes,
    traced_root,
)
from lightning_prune.graph.latency import LatencyModel, LatencyPredictor, LayerTable, measure_latency_model
from lightning_prune.graph.layers import PRODUCER_TYPES, channel_dim  # noqa: F401 - PRODUCER_TYPES as before
from lightning_prune.graph.proof import masked_and_sliced, randomised_copy
from lightning_prune.graph.slicing import (  # noqa: F401 - the private two: gates.py imports them from here
    cut_like,
    drop_cached_tensors,
    norm_size,
    parameter_cuts,
    reads_now,
    restricted_forward,
    restricted_norm_hooks,
    slice_units,
    zero_input_hook,
    zero_unit_hooks,
)
from lightning_prune.graph.types import (
    ChannelAnalysis,
    ChannelGroup,
    GraphTimeoutError,
    ModelInputError,
    Site,
    Slice,
    failure_reason,
)

__all__ = [
    "ALONG_TYPES",
    "AlongUnitsConv1d",
    "AlongUnitsConv2d",
    "AlongUnitsConv3d",
    "along_units_layers",
    "rewrap_along_units",
    "reads_now",
    "DEFAULT_ANALYSIS_TIME_LIMIT_S",
    "GRAPH_TIME_LIMIT_S",
    "CostModel",
    "count_ops_and_params",
    "meta_copy",
    "FROZEN_MARKER",
    "FROZEN_TYPES",
    "FrozenConv1d",
    "FrozenConv2d",
    "FrozenConv3d",
    "FrozenLinear",
    "effective_weight",
    "freeze",
    "freeze_modules",
    "frozen_in_state",
    "frozen_names",
    "refreeze",
    "ChannelAnalysis",
    "ChannelGroup",
    "GraphTimeoutError",
    "LatencyModel",
    "LatencyPredictor",
    "LayerTable",
    "ModelInputError",
    "Site",
    "Slice",
    "analyse_channels",
    "parameter_cuts",
    "cut_like",
    "call_model",
    "evaluating",
    "channel_dim",
    "drop_cached_tensors",
    "example_inputs_for",
    "failure_reason",
    "like_model",
    "masked_and_sliced",
    "measure_latency_model",
    "randomised_copy",
    "module_modes",
    "restore_modes",
    "restricted_norm_hooks",
    "slice_units",
    "traced_root",
    "zero_unit_hooks",
]
