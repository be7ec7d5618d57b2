"""Channel groups from the traced operator graph: unit labels for every tensor dimension.

The model is traced with PyTorch's own tracer (``torch.export.export(..., strict=False)`` in eval mode) and
every dimension of every tensor is followed through every ATen operator. A **producer** (the output channels
of a Conv/Linear) creates one *atom* per channel; an operator's output carries the atoms its inputs carried
at the positions it reads. Atoms that must be removed together are merged (a union-find): an addition or a
multiplication couples the atoms at each position (residual streams, gates), a contraction (``q @ k^T``, a
softmax, a reduction) merges everything along the dimension it mixes (whole attention heads), an equal
``chunk``/``split``/``unbind`` of a labelled dimension pairs the pieces (q/k/v, GLU and SwiGLU gates, Res2Net
splits), ``cat`` concatenates labels, views and permutes move them (a channel dimension split into heads x
head dim keeps one label per element). A label lives in a *block*: the dims it varies along and an array of
atoms; a dim along which the array is constant carries no label.

Readers cut the dependency: a Conv/Linear module reading a labelled dim is an **input site** (a gate there
masks the units), a LayerNorm / RMSNorm / GroupNorm(1) / GRN computing statistics over it is a **norm site**
(restricted statistics), a convolution sliding along it (ECA's conv1d over the channel vector) is a **slide
site** (zeros at the removed units; sliced, it runs at the dense width: :mod:`lightning_prune.graph.along`),
and a convolution whose kernel is 1 along it (stride 1, no padding: timm's ``LambdaLayer``) passes it through.
A Conv/Linear module whose forward computes the weight it uses from its parameters (weight standardisation,
``weight_norm``) is an input site too: the group names it in ``frozen``, and it is replaced by a plain layer
holding that weight before its input channels go (:mod:`lightning_prune.graph.frozen`). A GroupNorm with
several groups makes each of its groups one unit (``num_groups`` drops with them). A depthwise convolution
follows the channels one by one: a Conv module's, a ``ConvTranspose`` module's, or one of a module's own
tensors (``F.conv2d(x, self.filt, groups=self.channels)``: timm's ``BlurPool2d``; the filter is sliced and the
``groups`` attribute shrinks). Heads folded into the batch dim (``q.reshape(B * self.num_heads, dim_head,
-1)``: BoTNet, HaloNet, MViTv2) keep their labels there; the literal multiple of the batch is the attribute
to update (``num_heads``), and a depthwise conv whose weight the folded heads share (MViTv2's q/k/v pooling)
keeps each head whole and its own channels. Windows along other dims (``unfold``) keep a dim's labels.
Parameters and buffers combined with a labelled dim (norm affines, biases, layer-scale gammas,
``pos_embed``/``cls_token``, relative-position bias tables along heads, BatchNorm statistics) are sliced with
it; integer attributes of the
module that reshapes, splits or slices with a size that shrinks with the units (``num_heads``, ``attn_dim``,
split widths, a list of split sizes, a slice bound such as DPN's ``num_1x1_c``, the shape a parameter is
viewed with) are found by their value on the module running the operator (and, for a reshape in a method of a
submodule that the module calls instead of its forward -- timm's ``self.rel_pos.get_bias()`` viewing its MLP's
output with ``self.num_heads`` and ``self.bias_shape`` -- on the submodule that made the reshaped tensor) and
updated, by the number of removed units' positions the size holds (a slice bound: those before it). A size
held by several attributes of that module is tried one attribute at a time when updating all of them fails the
proof. Split sizes that no list attribute holds are looked for one per piece (``[self.dim_conv3,
self.dim_untouched]``), one piece at most computed from the whole (``[self.pdim, self.dim - self.pdim]``: the
attribute holding the whole is updated). One attribute holds one size: where its uses carry different units
(SHViT's ``pdim`` sizing a piece of the stream and ``v``), their positions are paired in the order of their
units and the labels are propagated again. An operator this module does not know that touches a labelled dim
fixes those atoms (never removed) with the reason ``"aten.X on dim d"``; the model's outputs fix theirs (where
an operator had merged the channels into one unit first -- a channel mean feeding a gate, a single-head
attention's scores -- the reason names it). Labels are propagated until no atoms merge any more (a later
contraction can make an earlier dim unlabelled), then the last pass records sites and slices.

The exactness proof of :mod:`lightning_prune.graph.proof` stays the final judge.

A size the model's code takes from a tensor's shape (``B, N, C = x.shape`` then ``reshape(B, N, h, C // h)``
or ``reshape(B, N, C)``) is a constant in the exported graph; one eager forward with tagged ints
(:mod:`lightning_prune.graph.shapes`) finds which output dims of a reshape derive from which tensor dim, and
the two are coupled so that they keep the same number of positions (the residual stream with the q/k/v and
attention outputs of CrossViT's, Twins', ConViT's, NesT's, VOLO's, GCViT's and EdgeNeXt's attention).

Known limits: only ``* k`` and ``// k`` with a plain integer ``k`` keep a size's origin (a sum, a product of
two sizes, ``int(math.sqrt(T))`` give a constant again, left to the proof); the coupling pairs positions in
the order of their units, which may merge more than needed where two layouts disagree.

A grouped convolution's groups are whole units (input channels of a group with its filters). Where those
units all end up merged (a radix split summed over its groups: ResNeSt's split attention reshapes the
``radix x C`` outputs to ``(radix, C)`` and sums or softmaxes over the radix) the labels are propagated
again with that conv's units paired across its groups instead: the j-th filter of every group is one unit,
the i-th input channel of every group another (the conv keeps its groups, each loses the same positions);
its input site holds every input channel with the weight column that reads it (``Site.columns``: ``c % (cin
/ groups)``).
A module reached under several names (a position encoding shared by the blocks of a stage) goes by its first
name, and every use of one module or parameter loses the same positions (their atoms are coupled). Units that
hold every channel of some module dim (a piece of an unequal split read by a conv of its own) form a
*floor* of the group: a removal never takes a whole floor.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.graph.along import ALONG_TYPES, along_units_reason
from lightning_prune.graph.frozen import freeze_reason
from lightning_prune.graph.inputs import evaluating, example_arguments
from lightning_prune.graph.layers import (
    TRANSPOSED_CONV_TYPES,
    VIEW_OPS,
    channel_dim,
    is_grn,
    is_rms_norm,
    op_name,
)
from lightning_prune.graph.shapes import shape_provenance
from lightning_prune.graph.slicing import slice_extent
from lightning_prune.graph.types import (
    ChannelGroup,
    GraphTimeoutError,
    Site,
    Slice,
    failure_reason,
    prefixed_name,
)

__all__ = ["LabelGraph", "trace_labels"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
FIXED = 0
_OUTPUT = "no layer reads these channels (model output)"
_MAX_BLOCK = 4_000_000
_MAX_VARIANTS = 8  # attribute choices tried for a group that fails its proof
_MAX_MERGE_NOTES = 10_000  # operators that merged channels into one unit, kept to say why a group stays
_MAX_PAIRING_PROPAGATIONS = 3  # propagations that pair more grouped convs across their groups (ResNeSt)


class _Fix(Exception):
    """Internal: an operator whose labelled dims cannot be followed."""


# ---------------------------------------------------------------------------------------------- union-find
class _Atoms:
    """Atoms (one per producer channel) in a union-find; atom 0 is FIXED (never removed)."""

    def __init__(self) -> None:
        self.parent = np.zeros(1024, dtype=np.int64)
        self.n = 1
        self.owner: list[str] = [""]
        self.changed = False

    def new(self, count: int, owner: str) -> np.ndarray:
        while self.n + count > len(self.parent):
            self.parent = np.concatenate([self.parent, np.arange(len(self.parent), 2 * len(self.parent))])
        ids = np.arange(self.n, self.n + count, dtype=np.int64)
        self.parent[ids] = ids
        self.n += count
        self.owner.extend([owner] * count)
        return ids

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return int(root)

    def roots(self, arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr, dtype=np.int64)
        while True:
            p = self.parent[arr]
            if np.array_equal(p, arr):
                return arr
            arr = p

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == FIXED or (ra != FIXED and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.changed = True

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(self.roots(a), self.roots(b))
        differ = a != b
        if not differ.any():
            return
        pairs = np.unique(np.stack([a[differ], b[differ]], 1), axis=0)
        for x, y in pairs.tolist():
            self.union(x, y)

    def union_all(self, arr: np.ndarray) -> int:
        flat = np.unique(self.roots(arr).ravel())
        for x in flat[1:].tolist():
            self.union(int(flat[0]), x)
        return self.find(int(flat[0])) if len(flat) else FIXED


# ---------------------------------------------------------------------------------------------- labels
@dataclass
class _Lab:
    """The labels of one tensor: blocks ``(dims, atoms)`` (``atoms.shape`` = sizes of those dims), the
    parameters it is a view of (``(name, {dim: (param dim, offset)})``) and whether it was computed from
    parameters in a way not followed (``derived``)."""

    shape: tuple[int, ...]
    blocks: list[tuple[tuple[int, ...], np.ndarray]] = field(default_factory=list)
    origins: list[tuple[str, dict[int, tuple[int, int]]]] = field(default_factory=list)
    derived: frozenset[int] = frozenset()  # dims along which values vary with parameter data


def _plain(shape: Iterable[int]) -> _Lab:
    return _Lab(tuple(int(s) for s in shape))


def _shape_of(val: Any) -> tuple[int, ...] | None:
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):
            return None
    return None


@dataclass
class _Records:
    slices: list[tuple[str, str, int, np.ndarray]] = field(default_factory=list)
    sites: list[tuple[Any, ...]] = field(default_factory=list)  # (module, kind, dim, atoms[, weight[, the
    # weight column of each channel]])
    fixes: list[tuple[np.ndarray, str]] = field(default_factory=list)
    sizes: list[tuple[list[str], list[tuple[Any, Any]], str]] = field(default_factory=list)  # (modules,
    # [(size, atoms per position of it) or (sizes of the pieces, [atoms per position of each])], what):
    # attributes that hold a size which shrinks with the units
    notes: list[tuple[np.ndarray, str]] = field(default_factory=list)
    attrs: list[tuple[str, str, np.ndarray]] = field(default_factory=list)  # (module, attribute, atoms per
    # position of the size it holds): an attribute known to hold the size (an RNN's ``input_size``)
    frozen: dict[str, set[str]] = field(default_factory=dict)  # layer computing its weight -> the roles
    # ("in", "out") whose removal freezes it (lightning_prune.graph.frozen)


_PASS = {"clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "dropout", "lift_fresh_copy",
         "feature_dropout", "alpha_dropout", "_assert_tensor_metadata", "copy", "clamp", "clamp_min",
         "clamp_max", "hardtanh", "leaky_relu", "elu", "celu", "gelu", "silu", "mish", "relu", "relu6",
         "sigmoid", "tanh", "hardswish", "hardsigmoid", "softplus", "logit", "prelu_scalar"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "norm", "linalg_vector_norm", "logsumexp", "max",
           "min",
           "prod", "var_mean", "std_mean", "any", "all", "argmax", "argmin"}
_POOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
         "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
         "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
         "_adaptive_avg_pool2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_bilinear2d",
         "upsample_bicubic2d", "_upsample_nearest_exact2d", "upsample_linear1d", "lp_pool2d",
         "_upsample_bicubic2d_aa", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_nearest3d",
         "_upsample_nearest_exact1d", "_upsample_nearest_exact3d"}
_NEW = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros",
        "new_ones", "new_empty", "new_full", "arange", "zeros", "ones", "full", "empty", "scalar_tensor",
        "linspace", "tensor", "randn", "rand", "bernoulli", "empty_strided", "eye", "new_tensor"}


class LabelGraph:
    """Unit labels of a traced model; :meth:`groups` turns them into :class:`ChannelGroup` candidates."""

    def __init__(self, model: nn.Module, example: Any, check: Callable[[], None] = lambda: None,
                 max_passes: int = 6) -> None:
        self.model = model
        self.check = check
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())
        # a module or parameter reached under several names (CoaT's position encodings shared by the blocks
        # of a stage) goes by its first name, the one ``named_modules``/``named_parameters`` give
        self._canon = _first_names(model.named_modules(remove_duplicate=False))
        self._canon_tensor = _first_names(itertools.chain(model.named_parameters(remove_duplicate=False),
                                                          model.named_buffers(remove_duplicate=False)))
        self.program = _export(model, example)
        # what failed in a step that only helps the proof (named in the skip reason of every group that then
        # fails it: trace_labels gives them as hints)
        self.notes: list[str] = []
        try:  # sizes the model's code takes from a tensor's shape (a constant in the exported graph)
            self.derived_sizes = shape_provenance(model, example, self.program, check)
        except GraphTimeoutError:
            raise
        except Exception as error:  # noqa: BLE001 - a hint only: without it such couplings are left to the proof
            self.derived_sizes = {}
            self.notes.append(failure_reason("finding the sizes taken from a tensor's shape", error))
        self._node_by_name = {n.name: n for n in self.program.graph.nodes}
        sig = self.program.graph_signature
        self.placeholders: dict[str, tuple[str, str]] = {}
        for name, fqn in sig.inputs_to_parameters.items():
            self.placeholders[name] = ("param", self._canon_tensor.get(fqn, fqn))
        for name, fqn in sig.inputs_to_buffers.items():
            self.placeholders[name] = ("buffer", self._canon_tensor.get(fqn, fqn))
        for name, fqn in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
            self.placeholders[name] = ("constant", fqn)
        self.passes = 0
        # grouped convs whose units are positions paired across the conv groups (not whole groups): those
        # whose whole-group units all end up merged (a radix split summed over its groups, ResNeSt's split
        # attention), found by a first propagation and given a second one
        # (merged by the operators themselves, before the fixes apply: units that a fix alone keeps, such as
        # the model's outputs, do not count, as pairing them would gain nothing)
        self.paired: set[str] = set()
        # positions of the sizes that one integer attribute holds, coupled (found after a propagation, made
        # in the next): one attribute, one size, every use of it loses the same number of positions
        self._attr_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        for attempt in range(_MAX_PAIRING_PROPAGATIONS):
            self._propagate(max_passes)
            if attempt == _MAX_PAIRING_PROPAGATIONS - 1:
                break  # (the groups describe this propagation's pairing: none is added after it)
            collapsed = self._collapsed - self.paired
            try:
                pairs = self._attribute_couplings()
            except GraphTimeoutError:
                raise
            except Exception as error:  # noqa: BLE001 - a hint only: without it such sizes are left to the proof
                pairs = []
                self.notes.append(failure_reason("coupling the sizes one integer attribute holds", error))
            if not collapsed and not pairs:
                break
            self.paired |= collapsed
            self._attr_pairs += pairs

    def _propagate(self, max_passes: int) -> None:
        self.atoms = _Atoms()
        self._slide_extent: dict[tuple[str, int], int] = {}  # (conv, dim) of a slide site -> its width
        self.producer_atoms: dict[str, np.ndarray] = {}
        self.producer_order: list[str] = []
        self._grouped: dict[str, np.ndarray] = {}  # grouped convs (whole groups as units): their atoms
        # atoms an operator merged into one unit, and which (over all passes: a later pass sees them merged)
        self._merge_notes: list[tuple[np.ndarray, str]] = []
        # (parameter, dim) -> {view node: (owners, its shape argument, the dim, offset)}
        self._param_views: dict[tuple[str, int], dict[str, tuple[list[str], tuple[Any, ...], int, int]]] = {}
        # optimistic passes (parameters along a unit dim do not fix it yet) until no atoms merge, then one
        # strict pass that records sites, slices and fixes
        self.strict = False
        # couplings of a size with a dim of a block over several dims wait until no other atoms merge (their
        # projection merges along the other dims, which a later contraction may make constant anyway: a
        # rotary embedding's pairs within a head before ``q @ k`` merges the head)
        self._defer = True
        for _ in range(max_passes):
            self.atoms.changed = False
            self._deferred = 0
            self.records = _Records()
            self._run()
            self.passes += 1
            if not self.atoms.changed:
                if not (self._defer and self._deferred):
                    break
                self._defer = False
        self._defer = False
        self.strict = True
        self.records = _Records()
        self._run()
        self.passes += 1
        # grouped convs whose units the operators merged into one (before the fixes apply)
        self._collapsed = {m for m, ids in self._grouped.items()
                           if len(np.unique(self.atoms.roots(ids))) <= 1}
        # why each producer's channels stay: the fix that reached its units (a unit merged with those a fix
        # names before the fixes apply), a reason other than the model's output first
        by_root: dict[int, str] = {}
        for arr, why in sorted(self.records.fixes, key=lambda f: f[1] == _OUTPUT):
            for r in np.unique(self.atoms.roots(np.asarray(arr).ravel())).tolist():
                if r != FIXED:
                    by_root.setdefault(int(r), why)
        # a unit the model's output holds that an operator merged from many channels: that operator is why
        merged_by_root: dict[int, str] = {}
        for ids, why in self._merge_notes:
            for r in np.unique(self.atoms.roots(ids)).tolist():
                merged_by_root.setdefault(int(r), why)
        self._stay_reason: dict[str, str] = {}
        for key in self.producer_order:
            ids = self.producer_atoms[key]
            roots = [r for r in np.unique(self.atoms.roots(ids)).tolist() if r in by_root]
            whys = [by_root[r] for r in roots]
            if whys and all(w == _OUTPUT for w in whys):
                whys = [f"{merged_by_root[r]}, which reaches the model's output" for r in roots
                        if r in merged_by_root] or whys
            if whys:
                owner = self.atoms.owner[int(ids[0])]
                if self._stay_reason.get(owner, _OUTPUT) == _OUTPUT:
                    self._stay_reason[owner] = next((w for w in whys if w != _OUTPUT), whys[0])
        for arr, _why in self.records.fixes:
            self.atoms.union_all(np.concatenate([arr.ravel(), [FIXED]]))

    # ------------------------------------------------------------------------------------------ walking
    def _run(self) -> None:
        self._producer_seen = 0
        self._walk(self.program.graph, None)
        # one parameter, one set of positions: a module (or parameter) used by several calls loses the same
        # positions in all of them (a shared conv's channels, a shared norm's entries)
        first: dict[tuple[str, str, int], np.ndarray] = {}
        for module, role, dim, arr in self.records.slices:
            seen = first.setdefault((module, role, dim), arr)
            if seen is not arr and seen.shape == arr.shape:
                self.atoms.union_arrays(seen, arr)
        for a, b in self._attr_pairs:
            self.atoms.union_arrays(a, b)

    def _attribute_couplings(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Sizes held by the same integer attribute of the module running the operators (the only attribute
        of that value there) whose positions carry different units: their positions paired in the order of
        their units, as for a size taken from a shape (SHViT's ``pdim``: the width of the attended piece of
        the stream, of ``v`` in the split of ``qkv`` and of the reshape after ``attn @ v``; EfficientViT-M's
        ``val_dim`` shared by the cascaded heads)."""
        uses: dict[tuple[str, str], list[np.ndarray]] = {}
        for owners, alternatives, _what in self.records.sizes:
            module = self.modules.get(owners[0]) if owners else None
            if module is None:
                continue
            ints = {a: v for a, v in vars(module).items()
                    if type(v) is int and v > 1 and not a.startswith("_")}
            for value, per_pos in alternatives:
                pairs = zip(value, per_pos) if isinstance(value, tuple) else [(value, per_pos)]
                found_any = False
                for size, positions in pairs:
                    positions = np.asarray(positions)
                    if not isinstance(size, int) or positions.size == 0 or positions.shape[0] != size:
                        continue  # (a shape tuple's other dims: no positions)
                    found = [a for a, v in ints.items() if v == size]
                    if len(found) == 1:
                        rows = self.atoms.roots(positions.reshape(size, -1))
                        if rows.shape[1] and (rows == rows[:, :1]).all():
                            uses.setdefault((owners[0], found[0]), []).append(np.sort(rows[:, 0]))
                            found_any = True
                if found_any:
                    break
        pairs_out = []
        for arrays in uses.values():
            for other in arrays[1:]:
                if len(other) == len(arrays[0]) and not np.array_equal(other, arrays[0]):
                    pairs_out.append((arrays[0], other))
        return pairs_out

    def _walk(self, graph: Any, inputs: list[Any] | None) -> Any:
        """Labels through ``graph``; ``inputs``: the labels of a subgraph's placeholders (None: the
        exported program's own). Returns the labels of the subgraph's outputs."""
        labs: dict[Any, Any] = {}
        k = 0
        for i, node in enumerate(graph.nodes):
            if i % 64 == 0:
                self.check()
            if node.op == "placeholder":
                if inputs is None:
                    labs[node] = self._placeholder(node)
                else:
                    labs[node] = inputs[k] if k < len(inputs) else None
                    k += 1
            elif node.op == "call_function":
                try:
                    sub = self._subgraph(node)
                    if sub is not None:
                        out = self._walk(sub[0], [labs.get(a) for a in sub[1]])
                        labs[node] = out if isinstance(out, list) else [out]
                    else:
                        labs[node] = self._call(node, labs)
                except _Fix as why:
                    self._fix_inputs(node, labs, str(why))
                    labs[node] = self._opaque_output(node, labs)
                except Exception as err:  # noqa: BLE001 - an operator we mis-handle: conservative
                    self._fix_inputs(node, labs, f"{op_name(node.target)} ({type(err).__name__})")
                    labs[node] = self._opaque_output(node, labs)
            elif node.op == "output":
                if inputs is not None:
                    args = node.args[0]
                    return [labs.get(a) for a in args] if isinstance(args, (list, tuple)) else labs.get(args)
                for arg in _flatten_args(node.args):
                    lab = labs.get(arg)
                    for lab_ in (lab if isinstance(lab, list) else [lab]):
                        if isinstance(lab_, _Lab):
                            for _, arr in lab_.blocks:
                                self.records.fixes.append((arr, _OUTPUT))
            else:  # get_attr (submodules of higher-order ops): unlabelled
                labs[node] = None
        return None

    def _subgraph(self, node: Any) -> tuple[Any, list[Any]] | None:
        """A higher-order op (autocast, grad-mode regions): its body graph and the nodes it is called with."""
        if not isinstance(node.target, torch._ops.HigherOrderOperator):
            return None
        for i, arg in enumerate(node.args):
            if getattr(arg, "op", None) == "get_attr":
                body = getattr(self.program.graph_module, arg.target, None)
                if isinstance(body, torch.fx.GraphModule):
                    return body.graph, list(node.args[i + 1:])
        raise _Fix(f"{getattr(node.target, '__name__', node.target)}")

    def _placeholder(self, node: Any) -> _Lab | None:
        shape = _shape_of(node.meta.get("val"))
        if shape is None:
            return None
        lab = _plain(shape)
        kind = self.placeholders.get(node.name)
        if kind is not None:
            lab.derived = frozenset(d for d in range(len(shape)) if shape[d] > 1)
            if kind[0] in ("param", "buffer"):
                lab.origins = [(kind[1], {d: (d, 0) for d in range(len(shape))})]
        return lab

    def _unlabelled_output(self, node: Any) -> Any:
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            return [_plain(s) if (s := _shape_of(v)) is not None else None for v in val]
        shape = _shape_of(val)
        return _plain(shape) if shape is not None else None

    def _opaque_output(self, node: Any, labs: dict) -> Any:
        """The output of an operator not followed: if it read parameters, its values vary with them."""
        out = self._unlabelled_output(node)
        derived = any(isinstance(x, _Lab) and x.derived
                      for a in _flatten_args((node.args, tuple(node.kwargs.values())))
                      for x in (labs.get(a) if isinstance(labs.get(a), list) else [labs.get(a)]))
        if derived:
            for lab in (out if isinstance(out, list) else [out]):
                if isinstance(lab, _Lab):
                    lab.derived = frozenset(d for d, s in enumerate(lab.shape) if s > 1)
        return out

    def _fix_inputs(self, node: Any, labs: dict, why: str) -> None:
        for arg in _flatten_args((node.args, tuple(node.kwargs.values()))):
            lab = labs.get(arg)
            for lab_ in (lab if isinstance(lab, list) else [lab]):
                if isinstance(lab_, _Lab):
                    for dims, arr in lab_.blocks:
                        self.records.fixes.append((arr, f"{why} on dim(s) {', '.join(map(str, dims))}"
                                                   if dims else why))

    def _owner(self, node: Any) -> str | None:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None
        path = _clean_path(list(stack.values())[-1][0])
        return self._canon.get(path, path)

    def _owners(self, node: Any) -> list[str]:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [_clean_path(v[0]) for v in reversed(list(stack.values()))]
        return [self._canon.get(p, p) for p in paths]

    # ------------------------------------------------------------------------------------------ labels
    def canon(self, lab: _Lab) -> _Lab:
        """Blocks with current roots, constant dims dropped, fixed-only blocks dropped."""
        blocks = []
        for dims, arr in lab.blocks:
            arr = self.atoms.roots(arr)
            keep_dims = []
            for axis in range(len(dims)):
                first = arr.take([0], axis=axis)
                if arr.shape[axis] > 1 and not np.array_equal(np.broadcast_to(first, arr.shape), arr):
                    keep_dims.append(axis)
            drop = tuple(a for a in range(arr.ndim) if a not in keep_dims)
            if drop:
                arr = arr[tuple(0 if a in drop else slice(None) for a in range(arr.ndim))]
            if (arr == FIXED).all():
                continue
            blocks.append((tuple(dims[a] for a in keep_dims), arr))
        return _Lab(lab.shape, blocks, lab.origins, lab.derived)

    def _merge(self, blocks: list[tuple[tuple[Any, ...], np.ndarray]], sizes: dict[Any, int]
               ) -> list[tuple[tuple[Any, ...], np.ndarray]]:
        """Blocks over shared letters merged, atoms at each position coupled."""
        out: list[tuple[tuple[Any, ...], np.ndarray]] = []
        for letters, arr in blocks:
            joined = [(letters, arr)]
            rest = []
            for other in out:
                if set(other[0]) & set(letters) or (not other[0] and not letters):
                    joined.append(other)
                else:
                    rest.append(other)
            if len(joined) == 1:
                out.append((letters, arr))
                continue
            union = sorted({x for ls, _ in joined for x in ls}, key=_letter_key)
            shape = tuple(sizes[x] for x in union)
            if math.prod(shape) > _MAX_BLOCK:
                raise _Fix("a label block too large to follow")
            expanded = [np.broadcast_to(_expand_to(a, ls, union), shape) for ls, a in joined]
            for e in expanded[1:]:
                self.atoms.union_arrays(expanded[0], e)
            rest.append((tuple(union), np.ascontiguousarray(expanded[0])))
            out = rest
        return out

    def _collapse(self, letters: tuple[Any, ...], arr: np.ndarray, along: set[Any], why: str = ""
                  ) -> tuple[tuple[Any, ...], np.ndarray]:
        """Merge the atoms along the ``along`` letters (a contraction mixes them); drop those letters.
        ``why``: the note that says so, should the merged atoms end up as a group of one unit (otherwise
        reported as the model's output)."""
        axes = [i for i, x in enumerate(letters) if x in along]
        if not axes:
            return letters, arr
        keep = [i for i in range(len(letters)) if i not in axes]
        moved = np.moveaxis(arr, axes, list(range(len(letters) - len(axes), len(letters))))
        flat = moved.reshape(*[arr.shape[i] for i in keep], -1)
        if why and flat.shape[-1] > 1 and len(self._merge_notes) < _MAX_MERGE_NOTES:
            ids = np.unique(arr)
            if ids.size > 1:
                self._merge_notes.append((ids, why))
        for j in range(1, flat.shape[-1]):
            self.atoms.union_arrays(flat[..., 0], flat[..., j])
        return tuple(letters[i] for i in keep), np.ascontiguousarray(flat[..., 0])

    def combine(self, operands: list[tuple[_Lab, list[Any]]], out_letters: list[Any], sizes: dict[Any, int],
                what: str) -> _Lab:
        """The einsum-like rule: operands' dims named by letters (same letter = same index), letters not in
        ``out_letters`` contracted. Parameters along a labelled letter are sliced with it."""
        blocks = []
        for lab, letters in operands:
            for dims, arr in lab.blocks:
                ls = tuple(letters[d] for d in dims)
                # a broadcast (size-1) dim of this operand: its atoms stretch over the letter
                blocks.append((ls, arr))
        merged = self._merge(blocks, sizes)
        contracted = {x for x in sizes if x not in out_letters}
        result = []
        for letters, arr in merged:
            if set(letters) & contracted:
                letters, arr = self._collapse(letters, arr, contracted,
                                              f"aten.{what} contracts these channels into one unit")
            result.append((letters, arr))
        labelled = {x for ls, _ in result for x in ls}
        # parameters along labelled letters: sliced with them (or, if not followed, the letter is fixed)
        origins_out: list[tuple[str, dict[int, tuple[int, int]]]] = []
        for lab, letters in operands:
            if not lab.derived:
                continue
            for d, x in enumerate(letters):
                if x not in labelled or lab.shape[d] == 1 or d not in lab.derived:
                    continue
                followed = [(name, m[d]) for name, m in lab.origins if d in m]
                if not self.strict:  # a parameter along a dim that may not stay a unit dim: no merging yet
                    continue
                if not lab.origins or len(followed) != len(lab.origins):
                    raise _Fix(f"{what}: a tensor computed from parameters along a unit dim")
                block = next((ls, a) for ls, a in result if x in ls)
                atoms = self._project(block[0], block[1], x)
                for name, (pdim, offset) in followed:
                    self._slice_param(name, pdim, atoms[offset:offset + self._psize(name, pdim)])
        out_index = {x: i for i, x in enumerate(out_letters)}
        blocks_out = []
        for letters, arr in result:
            order = sorted(range(len(letters)), key=lambda i: out_index[letters[i]])
            arr = np.transpose(arr, order) if order else arr
            blocks_out.append((tuple(out_index[letters[i]] for i in order), arr))
        for lab, letters in operands:  # a view of parameters stays one through elementwise ops
            for name, m in lab.origins:
                mapped = {out_index[letters[d]]: v for d, v in m.items()
                          if letters[d] in out_index and lab.shape[d] == sizes[letters[d]]}
                origins_out.append((name, mapped))
        # along a unit dim the parameters were sliced (recorded above): the values vary with units only
        derived_out = frozenset(out_index[letters[d]] for lab, letters in operands for d in lab.derived
                                if letters[d] in out_index and letters[d] not in labelled)
        shape = tuple(sizes[x] for x in out_letters)
        return self.canon(_Lab(shape, blocks_out, origins_out, derived_out))

    def _slice_param(self, name: str, pdim: int, atoms: np.ndarray) -> None:
        """Parameter ``name`` loses the units along ``pdim``; so do the sizes its views were written with."""
        self.records.slices.append((name, "param", pdim, atoms))
        for owners, shape_arg, d, offset in self._param_views.get((name, pdim), {}).values():
            if offset or not isinstance(shape_arg[d], int) or shape_arg[d] != len(atoms):
                continue
            per_pos = atoms.reshape(-1, 1)
            pieces = [per_pos if i == d else per_pos[:0] for i in range(len(shape_arg))]
            # the module holding the parameter holds its view shape (MaxViT's ``rel_pos.bias_shape``, read by
            # ``self.rel_pos.get_bias()`` in the attention's own forward); a whole shape in an attribute
            # before an int of the same value (its ``window_area`` equals the 16 heads)
            owner = name.rpartition(".")[0]
            self.records.sizes.append(([owner] + [o for o in owners if o != owner],
                                       [(tuple(shape_arg), pieces), (shape_arg[d], per_pos)],
                                       "aten.view of a parameter"))

    def _psize(self, name: str, dim: int) -> int:
        tensor = self.params.get(name)
        if tensor is None:
            tensor = self.buffers.get(name)
        return int(tensor.shape[dim]) if tensor is not None else 0

    def _project(self, letters: tuple[Any, ...], arr: np.ndarray, x: Any) -> np.ndarray:
        """One atom per position along letter ``x``: atoms along the other letters are merged."""
        axis = letters.index(x)
        moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
        for j in range(1, moved.shape[1]):
            self.atoms.union_arrays(moved[:, 0], moved[:, j])
        return self.atoms.roots(moved[:, 0].copy())

    def _batch_rows(self, lab: _Lab) -> tuple[tuple[int, ...], np.ndarray] | None:
        """Where the channels' units also vary along the batch dim (heads folded into it: ``reshape(B *
        heads, C, H, W)``, MViTv2's pooling) and a layer's weight is shared by the batch: each batch
        position's channels made one unit (a head goes whole and the weight keeps its channels; pairing
        channel ``c`` across the heads instead would merge every head, once their channels are contracted as
        attention does). The block over the batch and channel dims, or None where the units do not vary
        along the batch."""
        for dims, arr in lab.blocks:
            if set(dims) == {0, 1} and arr.shape[dims.index(0)] > 1:
                axis = dims.index(0)
                for i in range(arr.shape[axis]):
                    self.atoms.union_all(np.take(arr, i, axis=axis).ravel())
                return dims, arr
        return None

    def dim_atoms(self, lab: _Lab, dim: int) -> np.ndarray | None:
        """Atoms per position of ``dim`` (merged along the block's other dims), or None if unlabelled."""
        for dims, arr in lab.blocks:
            if dim in dims:
                return self._project(dims, arr, dim)
        return None

    def elementwise(self, node: Any, labs: dict, tensors: list[Any]) -> _Lab:
        out_shape = _shape_of(node.meta.get("val"))
        n = len(out_shape)
        operands = []
        for t in tensors:
            lab = labs.get(t) if hasattr(t, "op") else None
            if not isinstance(lab, _Lab):
                continue
            lab = self.canon(lab)
            offset = n - len(lab.shape)
            operands.append((lab, [offset + d for d in range(len(lab.shape))]))
        sizes = {d: out_shape[d] for d in range(n)}
        return self.combine(operands, list(range(n)), sizes, op_name(node.target))

    # ------------------------------------------------------------------------------------------ operators
    def _call(self, node: Any, labs: dict) -> Any:
        target = node.target
        if target is operator.getitem:
            src, index = node.args
            value = labs.get(src)
            return value[index] if isinstance(value, list) else None
        name = op_name(target)
        val = node.meta.get("val")
        tensors_in = [a for a in _flatten_args((node.args, tuple(node.kwargs.values()))) if hasattr(a, "op")]
        in_labs = [labs.get(a) for a in tensors_in]
        if not any(isinstance(x, _Lab) and (x.blocks or x.derived) for x in in_labs) and name not in (
                "linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                "conv_transpose3d", "_convolution"):
            return self._unlabelled_output(node)  # nothing followed: nothing to do
        if name in _NEW or val is None:
            return self._unlabelled_output(node)
        args = node.args
        get = lambda i, key, default=None: (args[i] if len(args) > i  # noqa: E731
                                             else node.kwargs.get(key, default))
        x_lab = self.canon(labs[args[0]]) if args and isinstance(labs.get(args[0]), _Lab) else None
        if name in ("linear",):
            return self._linear(node, labs)
        if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d") or (
                name in ("convolution", "_convolution") and args[6]):  # (``transposed``)
            return self._conv_transpose(node, name, labs)
        if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution"):
            return self._conv(node, labs)
        along = self.modules.get(self._owner(node) or "")
        if name == "index_copy" and isinstance(along, ALONG_TYPES):
            return self._along_scatter(node, labs, along)
        if name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
            return self._recurrent(node, name, labs)
        if name in _PASS or name.rstrip("_") in _PASS or _pointwise(target) or name in (
                "add", "sub", "mul", "div", "where", "maximum", "minimum", "addcmul", "addcdiv", "lerp",
                "masked_fill", "pow", "rsub", "true_divide", "floor_divide", "remainder", "fmod", "eq", "ne",
                "lt", "le", "gt", "ge", "neg", "exp", "log", "sqrt", "rsqrt", "abs", "erf", "reciprocal",
                "square", "sign", "cos", "sin", "expm1", "log1p", "sgn", "bitwise_and", "logical_and"):
            if name.endswith("_") and name not in ("relu_",) and False:  # pragma: no cover
                pass
            if name in ("dropout", "native_dropout", "feature_dropout", "alpha_dropout"):
                tensors = [args[0]]
            else:
                tensors = [a for a in _flatten_args((args, tuple(node.kwargs.values()))) if hasattr(a, "op")]
            if isinstance(val, (list, tuple)):
                first = self.elementwise_like(node, labs, tensors, _shape_of(val[0]))
                return [first] + [_plain(_shape_of(v) or ()) for v in val[1:]]
            return self.elementwise(node, labs, tensors)
        if name == "native_dropout":
            return [self._same(x_lab), _plain(x_lab.shape)]
        if name in VIEW_OPS or name in ("expand", "expand_as", "broadcast_to", "view_copy", "_unsafe_view"):
            return self._view(node, x_lab, _shape_of(val), labs)
        if name in ("permute", "transpose", "t", "movedim", "swapaxes", "numpy_T", "swapdims", "mT",
                    "adjoint"):
            return self._permute(node, x_lab, _shape_of(val))
        if name in ("slice", "narrow", "select", "index_select", "index", "split", "split_with_sizes",
                    "chunk", "unbind", "tensor_split"):
            return self._slicing(node, name, x_lab, labs)
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            return self._cat(node, name, labs)
        if name in ("matmul", "bmm", "mm", "einsum", "scaled_dot_product_attention", "baddbmm", "addmm",
                    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention"):
            return self._contract(node, name, labs)
        if name in ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "batch_norm",
                    "_native_batch_norm_legit_no_training", "native_batch_norm", "rms_norm",
                    "instance_norm", "_batch_norm_impl_index", "_native_batch_norm_legit"):
            return self._norm(node, name, labs)
        if name in _REDUCE:
            return self._reduce(node, name, x_lab, labs)
        if name in ("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "sort",
                    "topk", "argsort"):
            dim = get(1, "dim")
            dim = dim % len(x_lab.shape)
            lab = self._mix_dims(x_lab, {dim}, name)
            if isinstance(val, (list, tuple)):
                return [lab] + [_plain(_shape_of(v) or ()) for v in val[1:]]
            return lab
        if name in _POOL:
            spatial = set(range(2 if len(x_lab.shape) > 2 else 1, len(x_lab.shape)))
            if "adaptive" not in name and len(x_lab.shape) == 3 and name.endswith(("2d",)):
                spatial = {1, 2}
            lab = self._mix_dims(x_lab, spatial, name)
            out_shape = _shape_of(val[0] if isinstance(val, (list, tuple)) else val)
            lab = _resize(lab, out_shape)
            if isinstance(val, (list, tuple)):
                return [lab] + [_plain(_shape_of(v) or ()) for v in val[1:]]
            return lab
        if name == "unfold":  # windows along one dim (halo attention's blocks): the other dims' labels stay
            return self._unfold(x_lab, get(1, "dimension"), _shape_of(val))
        if name in ("constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d", "roll", "flip",
                    "rot90", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "repeat",
                    "repeat_interleave", "tile"):
            return self._positional(node, name, x_lab, _shape_of(val))
        raise _Fix(f"aten.{name}")

    def elementwise_like(self, node: Any, labs: dict, tensors: list[Any], shape: tuple[int, ...]) -> _Lab:
        n = len(shape)
        operands = []
        for t in tensors:
            lab = labs.get(t)
            if isinstance(lab, _Lab):
                lab = self.canon(lab)
                offset = n - len(lab.shape)
                operands.append((lab, [offset + d for d in range(len(lab.shape))]))
        return self.combine(operands, list(range(n)), {d: shape[d] for d in range(n)}, op_name(node.target))

    def _same(self, lab: _Lab) -> _Lab:
        return _Lab(lab.shape, list(lab.blocks), list(lab.origins), lab.derived)

    def _mix_dims(self, lab: _Lab, dims: set[int], what: str) -> _Lab:
        """Every position along ``dims`` depends on all of them: atoms merged along them (labels kept)."""
        blocks = []
        for bdims, arr in lab.blocks:
            if set(bdims) & dims:
                letters, arr2 = self._collapse(bdims, arr, dims, f"aten.{what} over these channels makes"
                                                                 " them one unit")
                # keep the (now constant) dims out; broadcast back is implicit
                blocks.append((letters, arr2))
            else:
                blocks.append((bdims, arr))
        origins = [(n, {d: v for d, v in m.items() if d not in dims}) for n, m in lab.origins]
        return self.canon(_Lab(lab.shape, blocks, origins, lab.derived))

    def _unfold(self, lab: _Lab, dim: int, out_shape: tuple[int, ...]) -> _Lab:
        """``x.unfold(dim, size, step)``: ``dim`` becomes the window index, a new last dim the position in
        the window; labels along other dims stay where they are."""
        dim %= len(lab.shape)
        if any(dim in dims for dims, _ in lab.blocks):
            raise _Fix("aten.unfold along a unit dim")
        origins = [(p, {d: v for d, v in m.items() if d != dim}) for p, m in lab.origins]
        derived = {d for d in lab.derived if d != dim} | ({len(lab.shape)} if dim in lab.derived else set())
        return _Lab(tuple(out_shape), list(lab.blocks), origins, frozenset(derived))

    def _positional(self, node: Any, name: str, lab: _Lab, out_shape: tuple[int, ...]) -> _Lab:
        """Ops that move positions along some dims (padding, rolls, flips, repeats): fine on unlabelled
        dims."""
        n = len(lab.shape)
        args = node.args
        if name in ("constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d"):
            pads = list(args[1])
            touched = {n - 1 - i // 2 for i in range(len(pads)) if pads[i]}
        elif name in ("roll", "flip"):
            dims = args[2] if name == "roll" and len(args) > 2 else (args[1] if name == "flip" else [])
            dims = [dims] if isinstance(dims, int) else list(dims or range(n))
            touched = {d % n for d in dims}
        elif name in ("repeat", "tile"):
            reps = list(args[1])
            offset = len(out_shape) - n
            touched = {d for d in range(n) if reps[offset + d] != 1}
            if offset:
                lab = _Lab(lab.shape, lab.blocks, [], lab.derived)
                lab = _shift(lab, offset, out_shape)
        elif name == "repeat_interleave" and isinstance(rdim := args[2] if len(args) > 2 else node.kwargs.get(
                "dim"), int):
            touched = {rdim % n}  # along one dim (GCViT's global query along the batch)
        else:
            touched = set(range(n))
        for dims, _ in lab.blocks:
            if set(dims) & touched:
                raise _Fix(f"aten.{name} along a unit dim")
        origins = [(o, m) for o, m in lab.origins if not (set(m) & touched)]
        return _Lab(tuple(out_shape), list(lab.blocks), origins, lab.derived)

    # ---- producers and readers
    def _module_of(self, weight_node: Any) -> tuple[str, nn.Module] | tuple[None, None]:
        kind = self.placeholders.get(getattr(weight_node, "name", ""))
        if kind is None or kind[0] != "param" or not kind[1].endswith(".weight"):
            return None, None
        mname = kind[1][: -len(".weight")]
        return mname, self.modules.get(mname)

    def _new_producer(self, name: str, count: int) -> np.ndarray:
        """The same atoms on every pass (producers are met in the same order)."""
        key = f"{name}#{self._producer_seen}"
        self._producer_seen += 1
        if key not in self.producer_atoms:
            self.producer_atoms[key] = self.atoms.new(count, name)
            self.producer_order.append(key)
        return self.producer_atoms[key]

    def _read(self, node: Any, lab: _Lab, dim: int, module_name: str | None, module: nn.Module | None,
              role_in: bool = True) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """A Conv/Linear reads ``dim`` of ``lab``: an input site (or, without a module called here, a
        contraction that merges the dim). Returns the blocks that pass through (other dims)."""
        rest = []
        for dims, arr in lab.blocks:
            if dim not in dims:
                rest.append((dims, arr))
                continue
            called = module is not None and self._owner(node) == module_name
            outer = None if called or module is None else self._outer_site(node)
            if outer is not None:
                atoms = self._project(dims, arr, dim)
                self.records.sites.append((outer, "input", -1 if isinstance(module, nn.Linear) else 1, atoms,
                                           f"{module_name}.weight"))
                self.records.slices.append((module_name, "in", 1, atoms))
                continue
            if not called:
                letters, arr2 = self._collapse(dims, arr, {dim})
                self.records.notes.append((arr, f"{op_name(node.target)} with a weight outside a module"
                                                " called here"))
                rest.append((letters, arr2))
                continue
            atoms = self._project(dims, arr, dim)
            if role_in:
                self.records.sites.append((module_name, "input", channel_dim(module), atoms))
                self.records.slices.append((module_name, "in", 1, atoms))
        return rest

    def _outer_site(self, node: Any) -> str | None:
        """A Conv/Linear weight used by the forward of the module ``node`` runs in, on that module's own
        input: the module whose input a gate can multiply (its only readers of that input are such layers)."""
        owner = self._owner(node)
        x = node.args[0]
        if owner is None or owner in self._owners(x) or getattr(x, "op", None) != "call_function" and \
                getattr(x, "op", None) != "placeholder":
            return None
        for user in x.users:
            if owner in self._owners(user) and op_name(user.target) not in ("linear", "conv1d", "conv2d"):
                return None
        return owner

    def _linear(self, node: Any, labs: dict) -> _Lab:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        out_shape = _shape_of(node.meta["val"])
        x_lab = self.canon(labs[x])
        mname, module = self._module_of(w)
        n = len(x_lab.shape)
        if not isinstance(module, nn.Linear):
            w_lab = labs.get(w)
            owner = self._owner(node)
            if (isinstance(w_lab, _Lab) and w_lab.derived and owner is not None
                    and isinstance(self.modules.get(owner), nn.Linear)
                    and self._freeze_reason(owner) is None):
                # a Linear computing its weight (weight_norm): frozen into a plain Linear before a removal
                mname, module = owner, self.modules[owner]
                self.records.frozen[mname] = {"in", "out"}
            elif isinstance(w_lab, _Lab) and w_lab.derived:
                # a functional linear with a computed weight: the input dim is mixed, the output unlabelled
                rest = [(d, a) for d, a in x_lab.blocks if n - 1 not in d]
                mixed = [(d, a) for d, a in x_lab.blocks if n - 1 in d]
                for _, a in mixed:
                    self.records.fixes.append((a, "aten.linear with a weight computed from parameters"))
                return self.canon(_Lab(out_shape, rest))
            else:
                raise _Fix("aten.linear with an input weight")
        rest = self._read(node, x_lab, n - 1, mname, module)
        atoms = self._new_producer(mname, out_shape[-1])
        self.records.slices.append((mname, "out", 0, atoms))
        blocks = rest + [((n - 1,), atoms)]
        lab = self.canon(_Lab(out_shape, blocks))
        if bias is not None and self.placeholders.get(bias.name, ("", ""))[1] != f"{mname}.bias":
            lab = self.combine([(lab, list(range(n))), (self.canon(labs[bias]), [n - 1])], list(range(n)),
                               {d: out_shape[d] for d in range(n)}, "linear bias")
        return lab

    def _recurrent(self, node: Any, name: str, labs: dict) -> list[_Lab]:
        """An LSTM/GRU/RNN module reading a labelled feature dim: an input site (one per direction) whose
        first layer's input weights (every gate) lose the units' columns, its ``input_size`` with them. Its
        hidden units are no producer (a unit taken out of the recurrence is not a zero at its readers)."""
        x, hx, params = node.args[0], node.args[1], node.args[2]
        x_lab = self.canon(labs[x])
        n = len(x_lab.shape)
        outs = [_plain(_shape_of(v) or ()) for v in node.meta["val"]]
        if any(isinstance(labs.get(h), _Lab) and self.canon(labs[h]).blocks for h in _flatten_args(hx)):
            raise _Fix(f"aten.{name} with a labelled initial state")
        if not x_lab.blocks:
            return outs
        kind = self.placeholders.get(getattr(params[0], "name", ""), ("", ""))
        mname = kind[1][: -len(".weight_ih_l0")] if kind[0] == "param" and kind[1].endswith(
            ".weight_ih_l0") else None
        module = self.modules.get(mname) if mname is not None else None
        if not isinstance(module, nn.RNNBase) or self._owner(node) != mname:
            raise _Fix(f"aten.{name} outside an RNN module called here")
        if any(set(dims) != {n - 1} for dims, _ in x_lab.blocks):
            raise _Fix(f"aten.{name} along the sequence")
        atoms = self.dim_atoms(x_lab, n - 1)
        for suffix in ("", "_reverse") if module.bidirectional else ("",):
            weight = f"{mname}.weight_ih_l0{suffix}"
            self.records.sites.append((mname, "input", -1, atoms, weight))
            self.records.slices.append((weight, "param", 1, atoms))
        self.records.attrs.append((mname, "input_size", atoms.reshape(-1, 1)))
        return outs

    def _conv(self, node: Any, labs: dict) -> _Lab:
        args = node.args
        name = op_name(node.target)
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        groups = _conv_groups(node, name)  # (a transposed one went to _conv_transpose)
        out_shape = _shape_of(node.meta["val"])
        x_lab = self.canon(labs[x])
        mname, module = self._module_of(w)
        w_lab = labs.get(w)
        if not isinstance(module, CONV_TYPES):
            std = None
            if isinstance(w_lab, _Lab) and w_lab.derived:
                # a computed weight (weight standardisation): which module's weight is it?
                owner = self._owner(node)
                if owner is not None and isinstance(self.modules.get(owner), CONV_TYPES):
                    std = owner
            if std is None:
                if groups == x_lab.shape[1] == out_shape[1] and isinstance(w_lab, _Lab):
                    return self._depthwise_with_tensors(node, labs, x_lab, w, bias, groups, out_shape)
                raise _Fix("a convolution whose weight is not a Conv module's")
            mname, module = std, self.modules[std]
            computed = True
            if not isinstance(module.__dict__.get("_parameters", {}).get("weight"), torch.Tensor) and \
                    self._freeze_reason(mname) is None:  # no weight parameter to slice (weight_norm): frozen
                self.records.frozen.setdefault(mname, set()).update(("in", "out", "group", "channel"))
        else:
            computed = False
        n = len(x_lab.shape)
        spatial = set(range(2, n))
        cin = x_lab.shape[1]
        cout = out_shape[1]
        if groups == cin == cout and not computed:
            rows = self._batch_rows(x_lab)
            if rows is not None:  # units folded into the batch (heads): each goes whole, the weight stays
                return self.canon(_Lab(out_shape, [b for b in x_lab.blocks if b[0] != rows[0]] + [rows]))
        other = [(d, a) for d, a in x_lab.blocks if not (set(d) & ({1} | spatial))]
        other += self._conv_along(node, x_lab, out_shape, mname, module, computed)
        chan = self.dim_atoms(x_lab, 1)
        if groups == 1:
            if chan is not None:
                self._conv_input(node, mname, chan, computed)
            atoms = self._new_producer(mname, cout)
            self.records.slices.append((mname, "out", 0, atoms))
            return self.canon(_Lab(out_shape, other + [((1,), atoms)]))
        if groups == cin == cout:  # depthwise: channel by channel
            if chan is None:
                return self.canon(_Lab(out_shape, other))
            self.records.slices.append((mname, "channel", 0, chan))
            if bias is not None and self.placeholders.get(bias.name, ("", ""))[1] != f"{mname}.bias":
                raise _Fix("a depthwise conv with a computed bias")
            return self.canon(_Lab(out_shape, other + [((1,), chan)]))
        ipg, opg = cin // groups, cout // groups
        atoms = self._new_producer(mname, cout)
        if mname in self.paired:  # the j-th filter of every group is one unit, the i-th input of each another
            grid = atoms.reshape(groups, opg)
            for g in range(1, groups):
                self.atoms.union_arrays(grid[0], grid[g])
            self.records.slices.append((mname, "out", 0, atoms))
            if chan is not None:
                cgrid = chan.reshape(groups, ipg)
                for g in range(1, groups):
                    self.atoms.union_arrays(cgrid[0], cgrid[g])
                # input channel c is weight column c % ipg: the site keeps both (hooks index the tensor)
                self._conv_input(node, mname, chan, computed, np.tile(np.arange(ipg), groups))
            return self.canon(_Lab(out_shape, other + [((1,), atoms)]))
        # grouped: whole conv groups (input channels of group g, its filters) are one unit
        if opg > 1 or ipg > 1:
            self._grouped[mname] = atoms
        if chan is None:
            chan = np.zeros(cin, dtype=np.int64)  # fixed input: the groups cannot go
        for g in range(groups):
            self.atoms.union_all(np.concatenate([chan[g * ipg:(g + 1) * ipg], atoms[g * opg:(g + 1) * opg]]))
        self.records.slices.append((mname, "group", 0, atoms))
        return self.canon(_Lab(out_shape, other + [((1,), atoms)]))

    def _conv_transpose(self, node: Any, name: str, labs: dict) -> _Lab:
        """A transposed convolution: followed where it is a depthwise module of its own (``ConvTranspose2d(C,
        C, groups=C)``, LowFormer's upsampling), channel by channel like a depthwise conv; any other keeps the
        channels it reads and makes (its weight's rows are the input channels)."""
        args = node.args
        groups = _conv_groups(node, name)
        bias = args[2] if len(args) > 2 else None
        out_shape = _shape_of(node.meta["val"])
        x_lab = self.canon(labs[args[0]])
        mname, module = self._module_of(args[1])
        if not (isinstance(module, TRANSPOSED_CONV_TYPES) and groups == x_lab.shape[1] == out_shape[1] > 1):
            raise _Fix(f"aten.{name} (not depthwise)")
        if any(set(dims) & set(range(2, len(x_lab.shape))) for dims, _ in x_lab.blocks):
            raise _Fix(f"aten.{name} along a labelled spatial dim")
        if bias is not None and self.placeholders.get(bias.name, ("", ""))[1] != f"{mname}.bias":
            raise _Fix(f"aten.{name} with a computed bias")
        chan = self.dim_atoms(x_lab, 1)
        other = [(d, a) for d, a in x_lab.blocks if 1 not in d]
        if chan is None:
            return self.canon(_Lab(out_shape, other))
        self.records.slices.append((mname, "channel", 0, chan))
        return self.canon(_Lab(out_shape, other + [((1,), chan)]))

    def _depthwise_with_tensors(self, node: Any, labs: dict, x_lab: _Lab, w: Any, bias: Any, groups: int,
                                out_shape: tuple[int, ...]) -> _Lab:
        """A depthwise convolution of a module's own tensors (``F.conv2d(x, self.filt, groups=C)``: timm's
        ``BlurPool2d``, a fixed or computed filter per channel): channel by channel, like an elementwise op;
        the filter (and bias) sliced along their first dim where they vary along it, and ``groups`` -- an
        attribute of the module (``self.channels``) -- shrinks with the units."""
        n = len(x_lab.shape)
        if any(set(dims) & set(range(2, n)) for dims, _ in x_lab.blocks):
            raise _Fix("a convolution whose weight is not a Conv module's, along a labelled spatial dim")
        chan = self.dim_atoms(x_lab, 1)
        other = [(d, a) for d, a in x_lab.blocks if 1 not in d]
        if chan is None:
            return self.canon(_Lab(out_shape, other))
        what = "a depthwise convolution of a module's tensors"
        for tensor in (w, bias):
            lab = labs.get(tensor) if tensor is not None else None
            if isinstance(lab, _Lab) and 0 in lab.derived:
                self._param_along(labs, tensor, 0, chan, what)
        self.records.sizes.append((self._owners(node), [(groups, chan.reshape(-1, 1))], "aten.conv groups"))
        return self.canon(_Lab(out_shape, other + [((1,), chan)]))

    def _conv_along(self, node: Any, x_lab: _Lab, out_shape: tuple[int, ...], mname: str, module: nn.Module,
                    computed: bool) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """The labelled spatial dims of a convolution's input (a unit dim the conv slides along): the blocks
        its output carries there. A kernel of 1 with stride 1 and no padding along the dim mixes nothing: the
        units pass through. A kernel sliding along them with stride 1 and the same size out is a **slide
        site**: the removed units are zeros in its input, and once sliced it runs at the dense width
        (:mod:`lightning_prune.graph.along`); its output keeps the positions (and units) of its input."""
        n = len(x_lab.shape)
        blocks = [(d, a) for d, a in x_lab.blocks if set(d) & set(range(2, n))]
        if not blocks:
            return []
        args = node.args
        stride_arg = args[3] if len(args) > 3 else node.kwargs.get("stride", 1)
        stride = [stride_arg] * (n - 2) if isinstance(stride_arg, int) else list(stride_arg)
        if len(stride) == 1:
            stride = stride * (n - 2)
        kernel = _shape_of(args[1].meta.get("val"))
        slid = {dims[0] for dims, _ in blocks if len(dims) == 1
                and not (kernel is not None and kernel[dims[0]] == 1 and int(stride[dims[0] - 2]) == 1
                         and out_shape[dims[0]] == x_lab.shape[dims[0]])}
        if len(slid) > 1:  # (a conv run at the dense width holds the positions of one dim)
            raise _Fix(f"a convolution slides along units in {len(slid)} of its dims at once")
        out = []
        for dims, arr in blocks:
            if len(dims) != 1:
                raise _Fix("a convolution slides along these channels, spread over several of its dims")
            d = dims[0]
            k = kernel[d] if kernel is not None else None
            same = int(stride[d - 2]) == 1 and out_shape[d] == x_lab.shape[d]
            if k == 1 and same:  # (the same size with a kernel of 1: no padding)
                out.append((dims, arr))
                continue
            if not same:
                raise _Fix("a convolution slides along these channels with a stride or a padding that"
                           " changes their number")
            why = along_units_reason(module) if not computed else "it computes its weight"
            if why is None and self._owner(node) != mname:
                why = "its weight is used outside its module"
            if why is not None:
                raise _Fix(f"a convolution slides along these channels (its kernel mixes neighbouring units)"
                           f" and cannot run at the dense width: {why}")
            local = arr
            if isinstance(module, ALONG_TYPES):  # (already at the dense width: its input positions)
                if module.unit_dim % n != d or module.dense_size != arr.shape[0]:
                    raise _Fix("a convolution run at the dense width along another dim")
                local = arr[module.kept_index.cpu().numpy()]
            self.records.sites.append((mname, "slide", d, local))
            self._slide_extent[(mname, d)] = int(local.shape[0])
            out.append((dims, arr))
        return out

    def _along_scatter(self, node: Any, labs: dict, module: nn.Module) -> _Lab:
        """``index_copy`` of a conv run at the dense width (:mod:`lightning_prune.graph.along`): its input
        scattered to the dense positions (the removed ones hold zeros: fixed)."""
        out_shape = _shape_of(node.meta["val"])
        n = len(out_shape)
        d = node.args[1] % n
        if isinstance(labs.get(node.args[0]), _Lab) and self.canon(labs[node.args[0]]).blocks:
            raise _Fix("aten.index_copy into a labelled tensor")
        src = self.canon(labs[node.args[3]])
        blocks = _remap_blocks(src.blocks, d, module.kept_index, "index_copy", dense=out_shape[d])
        return self.canon(_Lab(out_shape, blocks, [], src.derived - {d}))

    def _freeze_reason(self, mname: str) -> str | None:
        """Why layer ``mname``, which computes its weight, cannot be frozen (None: it can), once per layer."""
        cache = self.__dict__.setdefault("_freeze_reasons", {})
        if mname not in cache:
            cache[mname] = freeze_reason(self.modules[mname])
        return cache[mname]

    def _conv_input(self, node: Any, mname: str, chan: np.ndarray, computed: bool,
                    columns: np.ndarray | None = None) -> None:
        """The input side of conv ``mname`` reading the labelled channels ``chan``: a fix (a conv computing
        its weight that cannot be frozen), a collapse (its weight used outside its module), else an input site
        and the slice of its weight columns; ``columns``: the weight column of each channel where it is not
        the channel itself (a grouped conv paired across its groups: channel ``c`` is column ``c % ipg``)."""
        why = self._freeze_reason(mname) if computed else None
        if why is not None:
            why = (f"weight-standardised conv `{mname}` reads these channels (its standardisation over the"
                   f" fan-in changes, and it cannot be frozen: {why})")
            self.records.fixes.append((chan, why))
        elif self._owner(node) != mname:
            self._collapse((1,), chan, {1})
            self.records.notes.append((chan, "a conv weight used outside its module"))
        else:
            if computed:  # frozen into a plain conv before its input channels go
                self.records.frozen.setdefault(mname, set()).add("in")
            if columns is None:
                self.records.sites.append((mname, "input", 1, chan))
                self.records.slices.append((mname, "in", 1, chan))
            else:
                self.records.sites.append((mname, "input", 1, chan, "", columns))
                _, first = np.unique(columns, return_index=True)  # each column's atoms: its first channel's
                self.records.slices.append((mname, "in", 1, chan[first]))

    def _norm(self, node: Any, name: str, labs: dict) -> Any:
        args = node.args
        x_lab = self.canon(labs[args[0]])
        val = node.meta["val"]
        n = len(x_lab.shape)
        owner_name = self._owner(node)
        owner = self.modules.get(owner_name) if owner_name is not None else None

        def wrap(lab: _Lab) -> Any:
            if isinstance(val, (list, tuple)):
                return [lab] + [_plain(_shape_of(v) or ()) for v in val[1:]]
            return lab

        def own(param_node: Any, pname: str) -> bool:
            return param_node is None or self.placeholders.get(getattr(param_node, "name", ""),
                                                               ("", ""))[1] == f"{owner_name}.{pname}"

        if "batch_norm" in name:
            chan = self.dim_atoms(x_lab, 1)
            if chan is not None:
                params = [args[i] for i in range(1, 5)]
                if isinstance(owner, _BatchNorm) and own(params[0], "weight") and own(params[1], "bias"):
                    self.records.slices.append((owner_name, "channel", 0, chan))
                else:
                    for p in params:
                        if p is not None:
                            self._param_along(labs, p, 0, chan, name)
            return wrap(self._same(x_lab))
        if "group_norm" in name:
            groups = args[1]
            chan = self.dim_atoms(x_lab, 1)
            if chan is None:
                return wrap(self._same(x_lab))
            if groups == 1 and isinstance(owner, nn.GroupNorm) and own(args[2], "weight"):
                self.records.sites.append((owner_name, "norm", 1, chan))
                self.records.slices.append((owner_name, "channel", 0, chan))
                return wrap(self._same(x_lab))
            size = x_lab.shape[1] // groups
            for g in range(groups):
                self.atoms.union_all(chan[g * size:(g + 1) * size])
            if (isinstance(owner, nn.GroupNorm) and owner.num_groups == groups and own(args[2], "weight")
                    and own(args[3] if len(args) > 3 else None, "bias")):
                # whole norm groups are units (statistics per group): the affine loses them, num_groups drops
                self.records.slices.append((owner_name, "channel", 0, chan))
                self.records.attrs.append((owner_name, "num_groups", chan.reshape(groups, size)))
            return wrap(self._mix_dims(x_lab, set(range(2, n)), name))
        if name in ("layer_norm", "native_layer_norm", "rms_norm"):
            k = len(args[1])
            dims = set(range(n - k, n))
            labelled = [d for d in dims if any(d in bd for bd, _ in x_lab.blocks)]
            if not labelled:
                return wrap(self._same(x_lab))
            weight = args[2] if len(args) > 2 else None
            block = next(b for b in x_lab.blocks if n - 1 in b[0]) if k == 1 and labelled == [n - 1] else None
            norm_module = is_rms_norm(owner) if name == "rms_norm" else isinstance(owner, nn.LayerNorm)
            if block is not None and norm_module and own(weight, "weight"):
                chan = self._project(block[0], block[1], n - 1)
                self.records.sites.append((owner_name, "norm", channel_dim(owner), chan))
                self.records.slices.append((owner_name, "channel", 0, chan))
                return wrap(self._same(x_lab))
            return wrap(self._mix_dims(x_lab, dims, name))
        raise _Fix(f"aten.{name}")

    def _param_along(self, labs: dict, pnode: Any, pdim_in_tensor: int, atoms: np.ndarray, what: str) -> None:
        lab = labs.get(pnode)
        if not isinstance(lab, _Lab) or not lab.derived or not self.strict:
            return
        followed = [(name, m[pdim_in_tensor]) for name, m in lab.origins if pdim_in_tensor in m]
        if not lab.origins or len(followed) != len(lab.origins):
            if not self.strict:
                return
            raise _Fix(f"{what}: a tensor computed from parameters along a unit dim")
        for name, (pdim, offset) in followed:
            self._slice_param(name, pdim, atoms[offset:offset + self._psize(name, pdim)])

    def _reduce(self, node: Any, name: str, lab: _Lab, labs: dict) -> Any:
        args = node.args
        n = len(lab.shape)
        val = node.meta["val"]
        dims_arg = args[1] if len(args) > 1 else node.kwargs.get("dim")
        if name in ("norm", "linalg_vector_norm"):
            dims_arg = args[2] if len(args) > 2 else node.kwargs.get("dim")
        if isinstance(dims_arg, bool) or (name in ("var", "std") and dims_arg is None):
            dims_arg = None
        if dims_arg is None or (isinstance(dims_arg, (list, tuple)) and len(dims_arg) == 0):
            dims = set(range(n))
        elif isinstance(dims_arg, int):
            dims = {dims_arg % n}
        elif isinstance(dims_arg, (list, tuple)) and all(isinstance(d, int) for d in dims_arg):
            dims = {d % n for d in dims_arg}
        else:
            raise _Fix(f"aten.{name}")
        out_shape = _shape_of(val[0] if isinstance(val, (list, tuple)) else val)
        labelled = {d for bd, _ in lab.blocks for d in bd} & dims
        owner_name = self._owner(node)
        owner = self.modules.get(owner_name) if owner_name else None
        if labelled and owner is not None and is_grn(owner) and labelled == {int(owner.channel_dim) % n}:
            chan = self.dim_atoms(lab, next(iter(labelled)))
            if not any(s[0] == owner_name for s in self.records.sites):
                self.records.sites.append((owner_name, "norm", int(owner.channel_dim), chan))
            kept = [(bd, a) for bd, a in lab.blocks if not (set(bd) & dims)]
            lab = _Lab(lab.shape, kept, [], lab.derived)
        else:
            lab = self._mix_dims(lab, dims, name)
        keepdim = len(out_shape) == n
        if not keepdim:
            lab = _drop_dims(lab, dims, out_shape)
        else:
            lab = _resize(lab, out_shape)
        if isinstance(val, (list, tuple)):
            return [lab] + [_plain(_shape_of(v) or ()) for v in val[1:]]
        return lab

    # ---- shapes
    def _view(self, node: Any, lab: _Lab, out_shape: tuple[int, ...], labs: dict | None = None) -> _Lab:
        in_shape = lab.shape
        name = op_name(node.target)
        if name in ("expand", "expand_as", "broadcast_to"):
            offset = len(out_shape) - len(in_shape)
            return _shift(lab, offset, out_shape)
        groups = _view_groups(in_shape, out_shape)
        if groups is None:
            raise _Fix(f"aten.{name} (shapes not matched)")
        group_of = {}
        for gi, (ins, _) in enumerate(groups):
            for d in ins:
                group_of[d] = gi
        blocks = []
        for dims, arr in lab.blocks:
            touched = sorted({group_of[d] for d in dims})
            in_axes = [d for g in touched for d in groups[g][0]]
            out_axes = [d for g in touched for d in groups[g][1]]
            full = np.broadcast_to(_expand_to(arr, dims, in_axes), tuple(in_shape[d] for d in in_axes))
            new = np.ascontiguousarray(full).reshape(tuple(out_shape[d] for d in out_axes))
            blocks.append((tuple(out_axes), new))
        # parameter views: a dim kept whole keeps its mapping
        origins = []  # a merged or split dim of a parameter is no longer followed (its mapping dropped)
        for pname, m in lab.origins:
            mm = {}
            for d, v in m.items():
                ins, outs = groups[group_of[d]]
                real_in = [i for i in ins if in_shape[i] != 1]
                real_out = [o for o in outs if out_shape[o] != 1]
                if real_in == [d] and len(real_out) == 1:
                    mm[real_out[0]] = v
                    shape_arg = node.args[1] if len(node.args) > 1 else None
                    if isinstance(shape_arg, (list, tuple)) and len(shape_arg) == len(out_shape):
                        # a view of a parameter with its size in the code (MetaFormer's layer scale:
                        # ``self.scale.view(self.shape)``): an event when the parameter is sliced
                        self._param_views.setdefault((pname, v[0]), {})[node.name] = (
                            self._owners(node), tuple(shape_arg), real_out[0], v[1])
            origins.append((pname, mm))
        derived = frozenset(o for ins, outs in groups if set(ins) & lab.derived for o in outs
                            if out_shape[o] > 1)
        out = self.canon(_Lab(tuple(out_shape), blocks, origins, derived))
        taken = self._shape_couplings(node, out, labs) if labs is not None else set()
        if taken:
            out = self.canon(out)
        self._size_constants(node, out, taken, lab)
        return out

    def _shape_couplings(self, node: Any, out: _Lab, labs: dict) -> set[int]:
        """Couple the output dims whose size the model's code took from a tensor's shape
        (:mod:`lightning_prune.graph.shapes`) with that tensor's dim, so that both keep the same number of
        positions: ``C`` of ``reshape(B, N, C)`` with the width ``C`` it was read from; ``C // h`` of
        ``reshape(B, N, h, C // h)`` through the dims it closes (the ``h x C // h`` positions with the ``C``:
        a removed head takes ``C // h`` positions of ``C`` with it); a multiple ``k * C`` with ``k``
        positions per position. Positions are paired in the order of their units (each unit must hold as
        many on both sides). A source whose dim carries no units fixes the output dim's units (the code's
        size cannot shrink). Returns the output dims so derived (no attribute holds them)."""
        taken: set[int] = set()
        fixes: dict[int, np.ndarray] = {}  # dims whose source carries no units: they stay
        labelled: set[int] = set()  # dims with a source that carries units (a size matched to several
        # tensors of equal shape and values, PVT-v2's ``x`` and its transpose when N == C: the one with units)
        derived = self.derived_sizes.get(node.name, ())
        x = node.args[0]
        in_shape = _shape_of(x.meta.get("val")) if derived and hasattr(x, "meta") else None
        groups = _view_groups(in_shape, out.shape) if in_shape is not None else None
        for ds in derived:
            src_lab = labs.get(self._node_by_name.get(ds.source))
            if (not isinstance(src_lab, _Lab) or ds.dim >= len(out.shape)
                    or ds.source_dim >= len(src_lab.shape)):
                continue
            size, extent = src_lab.shape[ds.source_dim], out.shape[ds.dim]
            if size * ds.num != extent * ds.den or size < 2:
                continue
            # the dims of this reshape's piece ending at this one whose positions number the source's (or
            # a multiple of it, on this dim alone)
            piece = next((outs for _, outs in groups if ds.dim in outs), [ds.dim]) if groups else [ds.dim]
            run, count = [ds.dim], extent
            while count < size and run[0] - 1 in piece:
                run.insert(0, run[0] - 1)
                count *= out.shape[run[0]]
            if count % size or (len(run) > 1 and count != size):
                continue
            taken.add(ds.dim)
            src_canon = self.canon(src_lab)
            if self._defer and (any(ds.source_dim in dims and len(dims) > 1 for dims, _ in src_canon.blocks)
                                or any(set(dims) & set(run) and not set(dims) <= set(run)
                                       for dims, _ in out.blocks)):
                self._deferred += 1
                continue
            src_atoms = self.dim_atoms(src_canon, ds.source_dim)
            out_atoms = self._run_atoms(out, run)
            if out_atoms is None:
                continue
            if src_atoms is None:  # (not a multiple ``B * self.num_heads``, nor a parameter's dim: sliced)
                if ds.num == 1 and ds.source_dim not in src_lab.derived:
                    fixes.setdefault(ds.dim, out_atoms)
                continue
            labelled.add(ds.dim)
            # each unit must hold as many positions (times the multiple) on both sides: the positions are
            # paired in the order of their units, a no-op where that holds already (a head-major and a
            # head-minor layout of the same heads)
            src_sorted = np.sort(self.atoms.roots(src_atoms))
            out_sorted = np.sort(self.atoms.roots(out_atoms)).reshape(size, -1)
            for j in range(out_sorted.shape[1]):
                self.atoms.union_arrays(src_sorted, out_sorted[:, j])
        why = f"aten.{op_name(node.target)} with a size taken from the shape of a tensor whose channels stay"
        for dim, out_atoms in fixes.items():
            if dim not in labelled:
                self.records.fixes.append((out_atoms, why))
        return taken

    def _run_atoms(self, lab: _Lab, run: list[int]) -> np.ndarray | None:
        """The atoms over the positions of the consecutive dims ``run`` (flattened), merged along the other
        dims of their block; None when no block varies along them or two blocks share them."""
        blocks = [(dims, arr) for dims, arr in lab.blocks if set(dims) & set(run)]
        if len(blocks) != 1:
            return None
        dims, arr = blocks[0]
        letters, arr = self._collapse(dims, arr, set(dims) - set(run))
        full = np.broadcast_to(_expand_to(arr, letters, run), tuple(lab.shape[d] for d in run))
        return self.atoms.roots(np.ascontiguousarray(full).ravel())

    def _size_constants(self, node: Any, lab: _Lab, taken: set[int] = frozenset(), source: _Lab | None = None
                        ) -> None:
        """Literal sizes in a reshape (output ``lab``, input ``source``) that shrink with the units:
        attributes of the module to update (not the sizes ``taken`` from a tensor's shape: the code computes
        them, but not the multiple of a batch it folds the units into)."""
        shape_arg = node.args[1] if len(node.args) > 1 else None
        if not isinstance(shape_arg, (list, tuple)) or len(shape_arg) != len(lab.shape):
            return
        labelled: dict[int, np.ndarray] = {}
        for d, value in enumerate(shape_arg):
            if not isinstance(value, int) or value <= 1:
                continue
            for dims, arr in lab.blocks:
                if d in dims:
                    axis = dims.index(d)
                    labelled[d] = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
        what = f"aten.{op_name(node.target)}"
        owners = self._owners(node)
        folded = self._folded_multiples(lab, source, labelled) if source is not None else {}
        for d in list(labelled):
            # ``B * self.num_heads``: the literal multiple of the batch is an attribute (a size taken from a
            # tensor's shape is computed by the code; its multiple is not)
            alternatives = [] if d in taken else [(shape_arg[d], labelled[d])]
            if d in folded:
                alternatives.append((folded[d], labelled[d][:folded[d]]))
            if alternatives:
                self.records.sizes.append((owners, alternatives, what))
            if d in taken:
                del labelled[d]
        if not labelled:
            return
        # the code of a submodule called by the owner's forward (not its forward: ``self.rel_pos.get_bias()``,
        # whose ``view(-1, self.num_heads)`` and ``view(self.bias_shape)`` run as the owner's): the
        # submodule that made the viewed tensor holds the sizes too, as ints or the whole shape
        if not owners:
            return
        empty = next(iter(labelled.values()))[:0]
        whole = tuple(shape_arg)
        pieces = [labelled.get(i, empty) for i in range(len(whole))]
        if whole in _int_sizes(self.modules.get(owners[0])):
            self.records.sizes.append(([owners[0]], [(whole, pieces)], what))
        for inner in self._callee_modules(node, owners[0]):
            held = _int_sizes(self.modules.get(inner))
            ints = {d: per_pos for d, per_pos in labelled.items() if shape_arg[d] in held}
            if whole in held:
                self.records.sizes.append(([inner], [(whole, pieces)], what))
            for d, per_pos in ints.items():
                self.records.sizes.append(([inner], [(shape_arg[d], per_pos)], what))
            if ints or whole in held:
                return

    def _folded_multiples(self, lab: _Lab, source: _Lab, labelled: dict[int, np.ndarray]) -> dict[int, int]:
        """The dims of a reshape (``source`` -> ``lab``) that fold an outer dim without units (the batch)
        together with units: heads folded into the batch, ``q.reshape(B * self.num_heads, self.dim_head, -1)``
        (BoTNet, HaloNet). dim -> its positions per position of the outer dim (what shrinks with the units),
        where the labels repeat with that period."""
        groups = _view_groups(source.shape, lab.shape)
        unlabelled = set(range(len(source.shape))) - {d for dims, _ in source.blocks for d in dims}
        out: dict[int, int] = {}
        for ins, outs in groups or ():
            real = [i for i in ins if source.shape[i] > 1]  # (size-1 dims carry nothing)
            d = next((o for o in outs if lab.shape[o] > 1), None)
            if len(real) < 2 or real[0] not in unlabelled or d not in labelled:
                continue
            multiple, rest = divmod(lab.shape[d], source.shape[real[0]])
            if not rest and multiple > 1 and _periodic(labelled[d], multiple):
                out[d] = multiple
        return out

    def _callee_modules(self, node: Any, owner: str, hops: int = 8) -> list[str]:
        """The submodules of ``owner`` with submodules of their own (outermost first) on the way to the
        module that made the tensor ``node`` reads, found back along its first input through the owner's own
        operators (at most ``hops``): a method of such a submodule called by the owner's forward runs as the
        owner's code (its modules' calls are the only trace of it)."""
        x = node.args[0] if node.args else None
        for _ in range(hops):
            if not hasattr(x, "meta"):
                return []
            inside = [p for p in self._owners(x) if p.startswith(owner + ".")]
            if inside:
                parts = inside[0][len(owner) + 1:].split(".")
                paths = [f"{owner}.{'.'.join(parts[:i])}" for i in range(1, len(parts) + 1)]
                return [p for p in paths if p in self.modules
                        and next(iter(self.modules[p].children()), None) is not None]
            x = x.args[0] if getattr(x, "args", None) else None
        return []

    def _permute(self, node: Any, lab: _Lab, out_shape: tuple[int, ...]) -> _Lab:
        n = len(lab.shape)
        name = op_name(node.target)
        args = node.args
        if name == "permute":
            perm = [d % n for d in args[1]]
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = args[1] % n, args[2] % n
            perm = list(range(n))
            perm[a], perm[b] = perm[b], perm[a]
        elif name in ("t", "numpy_T", "mT", "adjoint"):
            perm = list(range(n))
            if n >= 2:
                perm[-1], perm[-2] = perm[-2], perm[-1]
        elif name == "movedim":
            src = [args[1]] if isinstance(args[1], int) else list(args[1])
            dst = [args[2]] if isinstance(args[2], int) else list(args[2])
            perm = [int(i) for i in np.moveaxis(np.arange(n), [s % n for s in src], [d % n for d in dst])]
        else:
            raise _Fix(f"aten.{name}")
        inv = {old: new for new, old in enumerate(perm)}
        blocks = []
        for dims, arr in lab.blocks:
            new_dims = [inv[d] for d in dims]
            order = sorted(range(len(dims)), key=lambda i: new_dims[i])
            blocks.append((tuple(new_dims[i] for i in order), np.transpose(arr, order) if order else arr))
        origins = [(p, {inv[d]: v for d, v in m.items()}) for p, m in lab.origins]
        return _Lab(tuple(out_shape), blocks, origins, frozenset(inv[d] for d in lab.derived))

    def _slicing(self, node: Any, name: str, lab: _Lab, labs: dict) -> Any:
        args = node.args
        n = len(lab.shape)
        val = node.meta["val"]
        if name in ("index", "index_select"):
            if name == "index_select":
                dim, index = args[1] % n, args[2]
                indices = [None] * dim + [index]
            else:
                indices = list(args[1])
            real = [i for i, t in enumerate(indices) if t is not None]
            if len(real) != 1:
                raise _Fix(f"aten.{name} with several index tensors")
            dim = real[0]
            idx_shape = _shape_of(indices[dim].meta.get("val")) or ()
            if name == "index_select":
                idx_shape = (idx_shape[0],) if idx_shape else (1,)
            along = self.modules.get(self._owner(node) or "")
            if name == "index_select" and isinstance(along, ALONG_TYPES) and along.unit_dim % n == dim:
                # a conv run at the dense width gathers its kept positions (lightning_prune.graph.along)
                blocks = _remap_blocks(lab.blocks, dim, along.kept_index, name)
                return self.canon(_Lab(_shape_of(val), blocks, [], lab.derived - {dim}))
            for dims, _ in lab.blocks:
                if dim in dims:
                    raise _Fix(f"aten.{name} along a unit dim")
            k = len(idx_shape)
            remap = {d: (d if d < dim else d + k - 1) for d in range(n) if d != dim}
            blocks = [(tuple(remap[d] for d in dims), arr) for dims, arr in lab.blocks]
            origins = [(p, {remap[d]: v for d, v in m.items() if d != dim}) for p, m in lab.origins]
            derived = {remap[d] for d in lab.derived if d != dim}
            if dim in lab.derived:
                derived |= set(range(dim, dim + k))
            return _Lab(_shape_of(val), blocks, origins, frozenset(derived))
        dim_arg = {"slice": (1, 0), "narrow": (1, 0), "select": (1, 0), "split": (2, 0),
                   "split_with_sizes": (2, 0), "chunk": (2, 0), "unbind": (1, 0), "tensor_split": (2, 0)}
        pos, default = dim_arg[name]
        dim = args[pos] if len(args) > pos else node.kwargs.get("dim", default)
        dim = dim % n
        # the pieces: (start, stop, step) along dim
        if name == "slice":
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            stop = args[3] if len(args) > 3 and args[3] is not None else lab.shape[dim]
            step = args[4] if len(args) > 4 else 1
            start, stop, _ = slice(start, stop, step).indices(lab.shape[dim])
            pieces = [(start, stop, step)]
        elif name == "narrow":
            pieces = [(args[2], args[2] + args[3], 1)]
        elif name == "select":
            i = args[2] % lab.shape[dim]
            pieces = [(i, i + 1, 1)]
        elif name == "unbind":  # (its pieces have no ``dim``)
            pieces = [(i, i + 1, 1) for i in range(lab.shape[dim])]
        else:
            sizes = [_shape_of(v)[dim] for v in val]
            starts = np.cumsum([0] + sizes[:-1]).tolist()
            pieces = [(s, s + z, 1) for s, z in zip(starts, sizes)]
        labelled = next(((dims, arr) for dims, arr in lab.blocks if dim in dims), None)
        if labelled is not None and len(pieces) > 1 and len({b - a for a, b, _ in pieces}) == 1:
            # equal pieces stay equal: their positions are paired
            axis = labelled[0].index(dim)
            parts = [np.take(labelled[1], range(a, b, s), axis=axis) for a, b, s in pieces]
            for p in parts[1:]:
                self.atoms.union_arrays(parts[0], p)
            if name in ("split", "split_with_sizes"):  # the piece size, or the whole, in an attribute
                per_pos = np.moveaxis(parts[0], axis, 0).reshape(parts[0].shape[axis], -1)
                whole = np.moveaxis(labelled[1], axis, 0).reshape(labelled[1].shape[axis], -1)
                piece = pieces[0][1] - pieces[0][0]
                alternatives: list[tuple[Any, Any]] = [(piece, per_pos), (lab.shape[dim], whole)]
                if name == "split_with_sizes":  # the sizes may be a list attribute (MixNet's splits)
                    alternatives.insert(0, (tuple(b - a for a, b, _ in pieces),
                                            [np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1)
                                             for p in parts]))
                self.records.sizes.append((self._owners(node), alternatives, f"aten.{name}"))
        elif labelled is not None and len(pieces) > 1:  # unequal pieces: a list of sizes (MixNet's splits)
            axis = labelled[0].index(dim)
            per_piece = [np.moveaxis(np.take(labelled[1], range(a, b, s), axis=axis), axis, 0)
                         .reshape(len(range(a, b, s)), -1) for a, b, s in pieces]
            self.records.sizes.append((self._owners(node), [(tuple(b - a for a, b, _ in pieces), per_piece)],
                                       f"aten.{name}"))
        elif labelled is not None and name in ("slice", "narrow"):
            a, b, s = pieces[0]
            if (a, b, s) != (0, lab.shape[dim], 1):
                self.records.notes.append((labelled[1], f"aten.{name} [{a}:{b}] of a unit dim"))
                # its bounds shrink by the removed positions before them (DPN's and ReXNet's partial
                # residuals: ``x[:, :self.num_1x1_c]``, ``x[:, 0:self.in_channels] += shortcut``)
                axis = labelled[0].index(dim)
                whole = np.moveaxis(labelled[1], axis, 0).reshape(labelled[1].shape[axis], -1)
                # (a start or stop: the positions before it; a narrow's length: the positions it keeps)
                bounds = [(a, whole[:a]), (b, whole[:b])] if name == "slice" else [(a, whole[:a]),
                                                                                    (b - a, whole[a:b])]
                for value, positions in bounds:
                    if 0 < value < lab.shape[dim] and s == 1:
                        self.records.sizes.append((self._owners(node), [(value, positions)],
                                                   f"aten.{name} bound"))
        outs = []
        for a, b, s in pieces:
            blocks = []
            for dims, arr in lab.blocks:
                if dim in dims:
                    axis = dims.index(dim)
                    arr = np.take(arr, range(a, b, s), axis=axis)
                blocks.append((dims, arr))
            size = len(range(a, b, s))
            shape = list(lab.shape)
            shape[dim] = size
            origins = []
            for p, m in lab.origins:
                mm = dict(m)
                if dim in mm and (a, b, s) != (0, lab.shape[dim], 1):  # part of the dim: not followed
                    del mm[dim]
                origins.append((p, mm))
            piece = _Lab(tuple(shape), blocks, origins, lab.derived)
            if name in ("select", "unbind"):
                piece = _drop_dims(piece, {dim}, tuple(shape[:dim] + shape[dim + 1:]))
            outs.append(self.canon(piece))
        return outs if isinstance(val, (list, tuple)) else outs[0]

    def _cat(self, node: Any, name: str, labs: dict) -> _Lab:
        tensors = list(node.args[0])
        out_shape = _shape_of(node.meta["val"])
        n = len(out_shape)
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % n
        ins = [self.canon(labs[t]) if isinstance(labs.get(t), _Lab) else _plain(_shape_of(t.meta["val"]))
               for t in tensors]
        if name == "stack":  # a new dim of size 1 in each, then cat
            ins = [_insert_dim(lab, dim) for lab in ins]
        sizes = {d: out_shape[d] for d in range(n) if d != dim}
        cat_atoms = []
        labelled_cat = any(dim in dims for lab in ins for dims, _ in lab.blocks)
        operands = []
        origins_out: list[tuple[str, dict[int, tuple[int, int]]]] = []
        offset = 0
        for lab in ins:
            size = lab.shape[dim]
            if labelled_cat:
                atoms = self.dim_atoms(lab, dim)
                cat_atoms.append(atoms if atoms is not None else np.zeros(size, dtype=np.int64))
                lab = self.canon(lab)
            rest = [(dims, arr) for dims, arr in lab.blocks if dim not in dims]
            letters = [d for d in range(n)]
            trimmed = _Lab(tuple(1 if d == dim else s for d, s in enumerate(lab.shape)), rest,
                           [(p, {d: v for d, v in m.items() if d != dim}) for p, m in lab.origins],
                           frozenset(d for d in lab.derived if d != dim))
            operands.append((trimmed, letters))
            for p, m in lab.origins:
                if dim in m and m[dim][1] == 0:
                    origins_out.append((p, {dim: (m[dim][0], offset)}))
            offset += size
        sizes[dim] = 1
        combined = self.combine(operands, list(range(n)), sizes, f"aten.{name}")
        blocks = [(dims, arr) for dims, arr in combined.blocks if dim not in dims]
        if labelled_cat:
            blocks.append(((dim,), np.concatenate(cat_atoms)))
        origins = [(p, dict(m)) for p, m in combined.origins]
        by_name = {p: m for p, m in origins}
        for p, m in origins_out:
            by_name.setdefault(p, {}).update(m)
        derived = combined.derived | ({dim} if any(dim in lab.derived for lab in ins) else set())
        return self.canon(_Lab(out_shape, blocks, list(by_name.items()) if origins_out else origins,
                               frozenset(derived)))

    def _contract(self, node: Any, name: str, labs: dict) -> _Lab:
        args = node.args
        out_val = node.meta["val"]
        out_shape = _shape_of(out_val[0] if isinstance(out_val, (list, tuple)) else out_val)

        def lab_of(t: Any) -> _Lab:
            lab = labs.get(t)
            return self.canon(lab) if isinstance(lab, _Lab) else _plain(_shape_of(t.meta["val"]))

        if name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                    "_scaled_dot_product_efficient_attention"):
            q, k, v = (lab_of(t) for t in args[:3])
            mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
            nb = len(q.shape) - 2
            if k.shape[:nb] != q.shape[:nb] or v.shape[:nb] != q.shape[:nb]:
                raise _Fix("grouped-query attention")
            b = [("b", i) for i in range(nb)]
            sizes = {("b", i): q.shape[i] for i in range(nb)}
            sizes.update({"n": q.shape[-2], "s": k.shape[-2], "e": q.shape[-1], "f": v.shape[-1]})
            scores = self.combine([(q, b + ["n", "e"]), (k, b + ["s", "e"])], b + ["n", "s"], sizes, name)
            ops = [(scores, b + ["n", "s"])]
            if hasattr(mask, "op"):
                m = lab_of(mask)
                off = nb + 2 - len(m.shape)
                ops.append((m, (b + ["n", "s"])[off:]))
            scores = self.combine(ops, b + ["n", "s"], sizes, name)
            scores = self._mix_dims(scores, {nb + 1}, "softmax")
            out = self.combine([(scores, b + ["n", "s"]), (v, b + ["s", "f"])], b + ["n", "f"], sizes, name)
            if isinstance(out_val, (list, tuple)):
                return [out] + [_plain(_shape_of(x) or ()) for x in out_val[1:]]
            return out
        if name == "einsum":
            eq = args[0].replace(" ", "")
            ins_s, out_s = eq.split("->") if "->" in eq else (eq, None)
            parts = ins_s.split(",")
            if "." in eq or out_s is None:
                raise _Fix("aten.einsum with ellipsis or implicit output")
            ops = [(lab_of(t), list(p)) for t, p in zip(args[1], parts)]
            sizes = {}
            for lab, letters in ops:
                for d, x in enumerate(letters):
                    sizes[x] = max(sizes.get(x, 1), lab.shape[d])
            return self.combine(ops, list(out_s), sizes, name)
        if name in ("baddbmm", "addmm"):
            bias, a, bb = args[0], args[1], args[2]
        else:
            bias, a, bb = None, args[0], args[1]
        A, B = lab_of(a), lab_of(bb)
        if len(A.shape) == 1 or len(B.shape) == 1:
            la = ["k"] if len(A.shape) == 1 else [("a", i) for i in range(len(A.shape) - 2)] + ["n", "k"]
            lb = ["k"] if len(B.shape) == 1 else [("bb", i) for i in range(len(B.shape) - 2)] + ["k", "m"]
            sizes = {}
            for lab, ls in ((A, la), (B, lb)):
                for d, x in enumerate(ls):
                    sizes[x] = lab.shape[d]
            out_letters = [x for x in la if x != "k"] + [x for x in lb if x != "k"]
            return self.combine([(A, la), (B, lb)], out_letters, sizes, name)
        nbatch = len(out_shape) - 2
        batch = [("b", i) for i in range(nbatch)]
        la = batch[nbatch - (len(A.shape) - 2):] + ["n", "k"]
        lb = batch[nbatch - (len(B.shape) - 2):] + ["k", "m"]
        sizes = {("b", i): out_shape[i] for i in range(nbatch)}
        sizes.update({"n": A.shape[-2], "k": A.shape[-1], "m": B.shape[-1]})
        ops = [(A, la), (B, lb)]
        if bias is not None:
            C = lab_of(bias)
            full = batch + ["n", "m"]
            ops.append((C, full[len(full) - len(C.shape):]))
        return self.combine(ops, batch + ["n", "m"], sizes, name)

    # ------------------------------------------------------------------------------------------ groups
    def groups(self, prefix: str = "", outputs: set[str] | frozenset[str] = frozenset()
               ) -> tuple[list[ChannelGroup], dict[str, str]]:
        """Candidate groups (before the proof) and the reasons the other producers' channels stay."""
        full = functools.partial(prefixed_name, prefix)
        atoms = self.atoms
        # atoms -> unit roots; groups: units connected through a producer
        gparent: dict[str, str] = {}

        def gfind(x: str) -> str:
            while gparent.setdefault(x, x) != x:
                gparent[x] = gparent[gparent[x]]
                x = gparent[x]
            return x

        first_of_root: dict[int, str] = {}
        for key in self.producer_order:
            ids = self.producer_atoms[key]
            owner = atoms.owner[int(ids[0])]
            gfind(owner)
            for root in np.unique(atoms.roots(ids)).tolist():
                if root == FIXED:
                    continue
                if root in first_of_root:
                    a, b = gfind(first_of_root[root]), gfind(owner)
                    if a != b:
                        gparent[b] = a
                else:
                    first_of_root[root] = owner
        order = {}
        for key in self.producer_order:
            order.setdefault(atoms.owner[int(self.producer_atoms[key][0])], len(order))
        members: dict[str, list[str]] = {}
        for owner in order:
            members.setdefault(gfind(owner), []).append(owner)
        group_of_root = {root: gfind(owner) for root, owner in first_of_root.items()}
        reasons: dict[str, str] = {}
        for arr, why in self.records.fixes + self.records.notes:
            owners = {atoms.owner[int(a)] for a in np.unique(np.asarray(arr).ravel()).tolist() if a != FIXED}
            for o in owners:
                g = gfind(o)
                if reasons.get(g, _OUTPUT) == _OUTPUT:
                    reasons[g] = why
        for owner, why in self._stay_reason.items():  # (a producer whose units a fix reached through others)
            g = gfind(owner)
            if reasons.get(g, _OUTPUT) == _OUTPUT:
                reasons[g] = why
        units: dict[str, dict[int, int]] = {}
        for root, g in sorted(group_of_root.items(), key=lambda kv: kv[0]):
            units.setdefault(g, {})[root] = len(units.get(g, {}))

        def entries(arr: np.ndarray) -> dict[str, tuple[list[int], list[int]]]:
            roots = atoms.roots(np.asarray(arr))
            by_group: dict[str, tuple[list[int], list[int]]] = {}
            for c, r in enumerate(roots.tolist()):
                g = group_of_root.get(r)
                if g is None:
                    continue
                chans, us = by_group.setdefault(g, ([], []))
                chans.append(c)
                us.append(units[g][r])
            return by_group

        slices: dict[str, dict[tuple[str, str, int], dict[int, int]]] = {}
        for module, role, dim, arr in self.records.slices:
            for g, (chans, us) in entries(arr).items():
                slices.setdefault(g, {}).setdefault((module, role, dim), {}).update(zip(chans, us))
        # channel -> (unit, weight column)
        sites: dict[str, dict[tuple[str, str, int, str], dict[int, tuple[int, int]]]] = {}
        for module, kind, dim, arr, *extra in self.records.sites:
            weight = extra[0] if extra else ""
            columns = extra[1].tolist() if len(extra) > 1 else None  # (the weight column of each channel)
            for g, (chans, us) in entries(arr).items():
                cols = [columns[c] for c in chans] if columns is not None else chans
                sites.setdefault(g, {}).setdefault((module, kind, dim, weight), {}).update(
                    zip(chans, zip(us, cols)))
        attrs: dict[str, set[tuple[str, str, Any]]] = {}
        self.hints: dict[str, str] = {}
        self.choices: dict[str, list[list[tuple[str, str, Any]]]] = {}
        for owners, alternatives, what in self.records.sizes:
            self._attr_event(owners, alternatives, what, group_of_root, units, attrs, full)
        for module, attr, per_pos in self.records.attrs:
            for g, k in (self._unit_weights(per_pos, group_of_root, units) or {}).items():
                attrs.setdefault(g, set()).add((module, attr, k))
        return self._finish_groups(members, order, units, slices, sites, attrs, reasons, outputs, full)

    def _unit_weights(self, per_pos: np.ndarray, group_of_root: dict[int, str],
                      units: dict[str, dict[int, int]]) -> dict[str, int | tuple[int, ...]] | None:
        """Per group, how many positions of a size each of its units holds (``per_pos``: one row per position;
        a row must carry one atom): an int when every unit holds the same number, else one count per unit.
        None when a position mixes atoms. Groups holding no position are absent."""
        roots = self.atoms.roots(per_pos)
        roots = roots.reshape(roots.shape[0], -1) if roots.ndim != 2 else roots
        if roots.shape[0] == 0:
            return {}
        first = roots[:, 0]
        if roots.shape[1] and not (roots == first[:, None]).all():
            return None
        held: dict[str, dict[int, int]] = {}
        for r, n in zip(*np.unique(first, return_counts=True)):
            g = group_of_root.get(int(r))
            if int(r) == FIXED or g is None:
                continue
            held.setdefault(g, {})[units[g][int(r)]] = int(n)
        weights: dict[str, int | tuple[int, ...]] = {}
        for g, per in held.items():
            counts = [per.get(u, 0) for u in range(len(units[g]))]
            weights[g] = counts[0] if len(set(counts)) == 1 else tuple(counts)
        return weights

    def _attr_event(self, owners: list[str], alternatives: list[tuple[Any, Any]], what: str,
                    group_of_root: dict[int, str], units: dict[str, dict[int, int]],
                    attrs: dict[str, set[tuple[str, str, Any]]], full: Callable[[str], str]) -> bool:
        """Integer attributes of the owning modules (innermost first) equal to a size that shrinks with the
        units: ``num_heads`` of a reshape, a split width, a slice bound; or an attribute holding a list of
        split sizes (``value`` a tuple, ``per_pos`` one array per piece: ``name[i]`` is updated). Each is
        recorded with how many positions of the size each unit holds (see :meth:`_unit_weights`).

        Only the module whose own code runs the operator is searched: a size the code takes from a tensor's
        shape (SKNet's ``C // self.num_paths``) is a constant in the traced graph that needs no update, and an
        enclosing module's attribute of the same value (its ``in_channels``) is another size."""
        owners = owners[:1]
        gs_seen: set[str] = set()
        for value, per_pos in alternatives:
            if isinstance(value, tuple):  # a list of sizes: one event per piece, the attribute is the list
                pieces = [self._unit_weights(p, group_of_root, units) for p in per_pos]
                if any(w is None for w in pieces):
                    continue
                gs = {g for w in pieces for g in w}
                gs_seen |= gs
                for owner in owners:
                    module = self.modules.get(owner)
                    found = [a for a, v in vars(module).items() if isinstance(v, (list, tuple))
                             and len(v) == len(value) and all(type(x) is int for x in v)
                             and tuple(v) == value and not a.startswith("_")] if module is not None else []
                    if found:
                        for i, w in enumerate(pieces):
                            for g, k in w.items():
                                for a in found:
                                    attrs.setdefault(g, set()).add((owner, f"{a}[{i}]", k))
                        return True
                if owners and self._piece_attributes(owners[0], value, per_pos, pieces, group_of_root, units,
                                                     attrs, full):
                    return True
                continue
            weights = self._unit_weights(per_pos, group_of_root, units)
            if not weights:
                continue
            gs_seen |= set(weights)
            for owner in owners:
                module = self.modules.get(owner)
                found = [a for a, v in vars(module).items() if type(v) is int and v == value
                         and not a.startswith("_") and a not in ("training",)] if module is not None else []
                if found:
                    for g, k in weights.items():
                        for a in found:
                            attrs.setdefault(g, set()).add((owner, a, k))
                        if len(found) > 1:  # the same value in several attributes: all, or one of them
                            self.choices.setdefault(full(g), []).append(
                                [(full(owner), a, k) for a in found])
                    return True
        for g in gs_seen:
            owner = owners[0] if owners else ""
            value = alternatives[0][0]
            shown = list(value) if isinstance(value, tuple) else value
            self.hints.setdefault(full(g), f"{what} with the size {shown} written in the model's"
                                           f" code (no attribute of `{owner}` holds it)")
        return False

    def _piece_attributes(self, owner: str, sizes: tuple[int, ...], per_pos: list[np.ndarray],
                          pieces: list[dict[str, Any]], group_of_root: dict[int, str],
                          units: dict[str, dict[int, int]], attrs: dict[str, set[tuple[str, str, Any]]],
                          full: Callable[[str], str]) -> bool:
        """Split sizes held by integer attributes of ``owner``, one per piece (FasterNet's ``[self.dim_conv3,
        self.dim_untouched]``, EfficientViT-M's ``[self.key_dim, self.key_dim, self.val_dim]``), one piece at
        most computed from the whole (SHViT's ``[self.pdim, self.dim - self.pdim]``: the attribute holding
        the whole is updated by all the removed positions instead). Only the pieces that hold units' positions
        need one; a size of 1 is no attribute's. False (nothing recorded) where a piece has none."""
        module = self.modules.get(owner)
        if module is None:
            return False
        ints = {a: v for a, v in vars(module).items() if type(v) is int and v > 1 and not a.startswith("_")}
        picks: list[tuple[list[str], dict[str, Any]]] = []
        rest = False
        for size, weights in zip(sizes, pieces):
            if not weights:
                continue
            found = [a for a, v in ints.items() if v == size]
            if found:
                picks.append((found, weights))
            elif rest:
                return False
            else:
                rest = True
        if rest:
            found = [a for a, v in ints.items() if v == sum(sizes)]
            rows = [np.asarray(p).reshape(len(p), -1) for p in per_pos if np.asarray(p).size]
            whole = self._unit_weights(np.concatenate(rows), group_of_root, units) if rows else None
            if not found or not whole:
                return False
            picks.append((found, whole))
        for found, weights in picks:
            for g, k in weights.items():
                for a in found:
                    attrs.setdefault(g, set()).add((owner, a, k))
                if len(found) > 1:  # the same value in several attributes: all, or one of them
                    self.choices.setdefault(full(g), []).append([(full(owner), a, k) for a in found])
        return bool(picks)

    def _finish_groups(self, members: dict, order: dict, units: dict, slices: dict, sites: dict, attrs: dict,
                       reasons: dict, outputs: frozenset[str] | set[str], full: Callable[[str], str]
                       ) -> tuple[list[ChannelGroup], dict[str, str]]:
        groups: list[ChannelGroup] = []
        skipped: dict[str, str] = {}
        for g in sorted(members, key=lambda x: order[x]):
            producers = [m for m in members[g] if m not in outputs]
            if not units.get(g):
                skipped[full(g)] = reasons.get(g, "no layer reads these channels (model output)")
                continue
            n_units = len(units[g])
            group_slices = []
            # a parameter sliced by its module's own role is not sliced twice
            module_roles = {(m, r) for (m, r, _d) in slices.get(g, {})}
            for (module, role, dim), chans in sorted(slices.get(g, {}).items()):
                if role == "param":
                    owner, _, pname = module.rpartition(".")
                    if pname in ("weight", "bias", "running_mean", "running_var", "gain") and any(
                            (owner, r) in module_roles for r in ("out", "channel", "group")) and dim == 0:
                        continue
                    if pname == "weight" and (owner, "in") in module_roles and dim == 1:
                        continue
                items = sorted(chans.items())
                group_slices.append(Slice(full(module), role, tuple(c for c, _ in items),
                                          tuple(u for _, u in items), dim=dim))
            group_sites = []
            for (module, kind, dim, weight), chans in sorted(sites.get(g, {}).items()):
                items = sorted(chans.items())
                columns = tuple(col for _, (_, col) in items)
                group_sites.append(Site(full(module), kind, dim, tuple(c for c, _ in items),
                                        tuple(u for _, (u, _) in items), full(weight) if weight else "",
                                        columns if columns != tuple(c for c, _ in items) else (),
                                        self._slide_extent.get((module, dim), 0) if kind == "slide" else 0))
            io_slices = [s for s in group_slices if s.role in ("out", "group", "in")]
            width = min((len(s.channels) // max(len(set(s.units)), 1) for s in io_slices), default=1)
            kind = ("conv group" if any(s.role == "group" for s in group_slices)
                    else "norm group" if width > 1 and any(a == "num_groups" for _, a, _ in attrs.get(g, ()))
                    else "head" if width > 1 else "channel")
            if not group_sites:
                skipped[full(g)] = reasons.get(g, "no layer reads these channels (model output)")
                continue
            if n_units < 2:
                skipped[full(g)] = reasons.get(g, "a single unit")
                continue
            grouped = [s.module for s in group_slices if s.role == "group"]
            gname = grouped[0] if grouped else full(g)  # a grouped conv names its group (as before)
            # units that hold every channel of a module dim (not all the group's): one of them must stay
            floors: set[tuple[int, ...]] = set()
            for (module, role, dim), chans in slices.get(g, {}).items():
                held = tuple(sorted(set(chans.values())))
                if len(held) < n_units and len(chans) == self._extent(module, role, dim):
                    floors.add(held)
            floors = {f for f in floors if not any(set(o) < set(f) for o in floors)}
            groups.append(ChannelGroup(gname, n_units, kind, width, tuple(group_sites), tuple(group_slices),
                                       tuple(full(p) for p in producers if any(
                                           s.module == full(p) and s.role in ("out", "group")
                                           for s in group_slices)),
                                       len(producers) > 1,
                                       tuple(sorted(((full(m), a, k) for m, a, k in attrs.get(g, ())),
                                                    key=lambda t: (t[0], t[1], str(t[2])))),
                                       tuple(sorted(floors)),
                                       tuple(sorted(full(m) for m, roles in self.records.frozen.items()
                                                    if any((m, r) in module_roles for r in roles)))))
        return groups, skipped

    def _extent(self, module: str, role: str, dim: int) -> int | None:
        """The size of the dim a slice cuts (None where it is not one dim of one tensor)."""
        tensor = self.params.get(module, self.buffers.get(module))
        return slice_extent(tensor if role == "param" else self.modules.get(module), role, dim)

    def reason(self, group: ChannelGroup) -> str | None:
        """A note on what the exactness proof may have caught (a slice with fixed bounds...)."""
        return None


# ---------------------------------------------------------------------------------------------- helpers
def _int_sizes(module: nn.Module | None) -> set[int | tuple[int, ...]]:
    """The values of ``module``'s public int attributes and lists/tuples of ints (the latter as tuples)."""
    if module is None:
        return set()
    held: set[int | tuple[int, ...]] = set()
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if type(value) is int:
            held.add(value)
        elif isinstance(value, (list, tuple)) and all(type(x) is int for x in value):
            held.add(tuple(value))
    return held


def _letter_key(x: Any) -> tuple[str, str]:
    return (type(x).__name__, str(x))


def _expand_to(arr: np.ndarray, letters: tuple[Any, ...], union: list[Any]) -> np.ndarray:
    """``arr`` (axes = ``letters``) with axes in ``union`` order, size 1 where it has none."""
    order = [letters.index(x) for x in union if x in letters]
    arr = np.transpose(arr, order) if order else arr
    shape = []
    it = iter(arr.shape)
    for x in union:
        shape.append(next(it) if x in letters else 1)
    return arr.reshape(shape)


def _conv_groups(node: Any, name: str) -> int:
    """The ``groups`` of a convolution node: ``aten.convolution``'s ninth argument, the seventh of
    ``conv1d``-``conv3d`` and ``conv_transpose1d``-``conv_transpose3d``."""
    args = node.args
    if name in ("convolution", "_convolution"):
        return args[8]
    return args[6] if len(args) > 6 else node.kwargs.get("groups", 1)


def _periodic(per_pos: np.ndarray, period: int) -> bool:
    """The rows of ``per_pos`` (positions of a dim) repeat every ``period`` rows: the outer factor of the dim
    (the batch) carries no units of its own."""
    if period <= 0 or len(per_pos) % period:
        return False
    blocks = per_pos.reshape(len(per_pos) // period, period, -1)
    return bool((blocks == blocks[:1]).all())


def _view_groups(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n, m = len(ins), len(outs)
    while i < n or j < m:
        if i < n and ins[i] == 1 and (j >= m or outs[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < m and outs[j] == 1 and (i >= n or ins[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n or j >= m:
            return None
        gi, gj, pi, pj = [i], [j], ins[i], outs[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= n:
                    return None
                gi.append(i)
                pi *= ins[i]
                i += 1
            else:
                if j >= m:
                    return None
                gj.append(j)
                pj *= outs[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _remap_blocks(blocks: Iterable[tuple[tuple[int, ...], np.ndarray]], dim: int, kept_index: torch.Tensor,
                  op: str, dense: int | None = None) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """The blocks of a tensor around a conv run at the dense width (:mod:`lightning_prune.graph.along`),
    their unit dim ``dim`` remapped through its ``kept_index``: gathered (its ``index_select``), or scattered
    to the ``dense`` positions (its ``index_copy``: the removed ones hold zeros, fixed)."""
    kept = kept_index.cpu().numpy()
    out = []
    for dims, arr in blocks:
        if dim in dims:
            if dims != (dim,):
                raise _Fix(f"aten.{op} along a unit dim spread over several dims")
            if dense is None:
                arr = arr[kept]
            else:
                full = np.full(dense, FIXED, dtype=np.int64)
                full[kept] = arr
                arr = full
        out.append((dims, arr))
    return out


def _shift(lab: _Lab, offset: int, out_shape: tuple[int, ...]) -> _Lab:
    blocks = [(tuple(d + offset for d in dims), arr) for dims, arr in lab.blocks]
    origins = [(p, {d + offset: v for d, v in m.items() if out_shape[d + offset] == lab.shape[d]})
               for p, m in lab.origins]
    return _Lab(tuple(out_shape), blocks, origins, frozenset(d + offset for d in lab.derived))


def _resize(lab: _Lab, out_shape: tuple[int, ...]) -> _Lab:
    """Same dims, some sizes changed (pooling): labels of unchanged dims kept, others must be constant."""
    blocks = []
    for dims, arr in lab.blocks:
        if any(lab.shape[d] != out_shape[d] for d in dims):
            raise _Fix("a resized unit dim")
        blocks.append((dims, arr))
    origins = [(p, {d: v for d, v in m.items() if lab.shape[d] == out_shape[d]}) for p, m in lab.origins]
    return _Lab(tuple(out_shape), blocks, origins, lab.derived)


def _drop_dims(lab: _Lab, dims: set[int], out_shape: tuple[int, ...]) -> _Lab:
    remap = {}
    k = 0
    for d in range(len(lab.shape)):
        if d in dims:
            continue
        remap[d] = k
        k += 1
    blocks = []
    for bdims, arr in lab.blocks:
        if set(bdims) & dims:
            keep = [i for i, d in enumerate(bdims) if d not in dims]
            index = tuple(slice(None) if i in keep else 0 for i in range(len(bdims)))
            arr = arr[index]
            bdims = tuple(bdims[i] for i in keep)
        blocks.append((tuple(remap[d] for d in bdims), arr))
    origins = [(p, {remap[d]: v for d, v in m.items() if d in remap}) for p, m in lab.origins]
    return _Lab(tuple(out_shape), blocks, origins, frozenset(remap[d] for d in lab.derived if d in remap))


def _insert_dim(lab: _Lab, dim: int) -> _Lab:
    remap = {d: (d if d < dim else d + 1) for d in range(len(lab.shape))}
    shape = list(lab.shape)
    shape.insert(dim, 1)
    return _Lab(tuple(shape), [(tuple(remap[d] for d in dims), arr) for dims, arr in lab.blocks],
                [(p, {remap[d]: v for d, v in m.items()}) for p, m in lab.origins],
                frozenset(remap[d] for d in lab.derived))


def _flatten_args(args: Any) -> list[Any]:
    out = []
    if isinstance(args, (list, tuple)):
        for a in args:
            out.extend(_flatten_args(a))
    elif isinstance(args, dict):
        for a in args.values():
            out.extend(_flatten_args(a))
    elif hasattr(args, "op"):
        out.append(args)
    return out


def _pointwise(target: Any) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


def _first_names(named: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Every name of each object -> the first name it was met under."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(obj), name) for name, obj in named}


def _clean_path(path: str) -> str:
    """``nn_module_stack`` paths look like ``L['self'].blocks[0].attn`` or ``blocks.0.attn``."""
    path = path.replace("L['self']", "").replace("L__self__", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        part = part.strip("'\"")
        if part:
            out.append(part)
    return ".".join(out)


def _export(model: nn.Module, example: Any) -> Any:
    args, kwargs = example_arguments(example)
    with torch.no_grad(), evaluating(model):
        return torch.export.export(model, args, kwargs, strict=False)


def trace_labels(model: nn.Module, example: Any, prefix: str = "", outputs: Iterable[str] = (),
                 check: Callable[[], None] = lambda: None
                 ) -> tuple[list[ChannelGroup], dict[str, str], dict[str, str],
                            dict[str, list[ChannelGroup]]]:
    """Candidate groups of ``model`` (not yet proven), the skipped producers with reasons, per group a hint
    of what may make it fail the proof (a size written in the model's code), and per group the variants to
    try when it fails: where one size sits in several attributes of the module (LeViT's ``num_heads ==
    key_dim``), each variant updates one of them only."""
    graph = LabelGraph(model, example, check)
    groups, skipped = graph.groups(prefix, frozenset(outputs))
    for note in dict.fromkeys(graph.notes):  # (a step that failed: every group failing the proof names it)
        for group in groups:
            hint = graph.hints.get(group.name)
            graph.hints[group.name] = f"{hint}; {note}" if hint else note
    variants: dict[str, list[ChannelGroup]] = {}
    for group in groups:
        events = graph.choices.get(group.name)
        if not events:
            continue
        for picks in itertools.islice(itertools.product(*events), _MAX_VARIANTS):
            dropped = {t for event, pick in zip(events, picks) for t in event if t != pick}
            attrs = tuple(t for t in group.attrs if t not in dropped)
            variants.setdefault(group.name, []).append(dataclasses.replace(group, attrs=attrs))
    return groups, skipped, graph.hints, variants
