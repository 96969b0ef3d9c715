"""Convs whose output qparams are shared: the inputs of an FX graph's cat, or a PT2E graph's.

``convert_fx`` gives every input of a ``torch.cat`` one observer (the backend config shares the
cat's observer with its inputs, so the cat needs no requantization): each conv feeding it writes
its output at qparams fitted to all the cat's inputs together, and a branch whose own range is
narrower gets a coarser step than that range needs, by design. Judged on its own range, such a
conv got QCD052 on a correctly quantized model, and its fix (the conv's scale fitted to its own
range) cut the model's SQNR from 29.2 to 14.8 dB on an Inception block: torch's quantized cat
takes its first input's qparams, so the other branches clipped.

X86InductorQuantizer does the same in the PT2E flow: it annotates a cat's inputs with one
shared quantization spec, so the quantize nodes after the convs feeding it hold one scale and
zero point (helper-64's SqueezeNet-like Fire modules: QCD052 on each 1x1 expand conv, whose
fix left the model's accuracy where it was).

A conv belongs to such a group where its output reaches the cat through single-input ops, and
its output qparams are another such conv's exactly (observers of their own do not give the same
float scale). Its output range is then judged over the group's (``LayerCapture.shared_range``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..quantization.qparams import clip_bounds
from .bundle import LayerCapture, with_model_range

#: Nodes followed back from a cat's input to the conv that wrote it.
DEPTH = 8
#: A shared conv's note (its layer's notes).
SHARED_NOTE = ("its output qparams are shared with {others} (the inputs of one {cat}: one "
               "observer for all): judged on their range together")
#: What shares the qparams, in SHARED_NOTE, by flow.
FX_CAT, PT2E_CAT = "FX cat", "cat, as X86InductorQuantizer annotates it"


#: One group: its convs in model order, whether one of its cats takes another input too, and
#: the other modules' paths sharing its qparams.
Group = tuple[tuple[str, ...], bool, tuple[str, ...]]
#: A cat's inputs: each one's source (the path of the module that wrote it) and the output
#: qparams it was written at, or None where no such module wrote it.
CatInputs = list[tuple[str, tuple[float, int]] | None]


def shared_groups(quantized_model: Any, convs: dict[str, Any]) -> list[Group]:
    """The groups of captured convs (``convs``: path -> quantized module) that feed the cats
    of an FX GraphModule at the same output qparams as another input of the cat (a captured
    conv, or another quantized module: a ConvTranspose, a Linear), each with whether one of its
    cats takes another input too (a pool branch, or such a module: its values, at these or
    other qparams, are the cat's as well) and the other modules' paths; none for another model.
    A conv that feeds two cats joins their groups: convert_fx shares the observer across
    both."""
    import torch

    if not isinstance(quantized_model, torch.fx.GraphModule):
        return []
    modules = dict(quantized_model.named_modules())
    cats: list[CatInputs] = []
    for node in quantized_model.graph.nodes:
        if not _is_cat(node):
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        if not isinstance(tensors, (list, tuple)):
            continue
        sources = [_source_module(t, modules) for t in tensors]
        cats.append([None if source is None else (source, (
            float(modules[source].scale), int(modules[source].zero_point)))
            for source in sources])
    return grouped(cats, list(convs))


def pt2e_shared_groups(converted: Any, outputs: dict[Any, tuple[str, tuple[float, int]]],
                       convs: list[str]) -> list[Group]:
    """``shared_groups`` of a convert_pt2e graph: ``outputs`` maps each conv pattern's output
    node (its quantize_per_tensor) to its path and output qparams; ``convs`` are the patterns'
    paths in graph order. A cat's input reaches back to such a node through single-input nodes
    (its dequantize, a ReLU, a pool and the pool's own quantize and dequantize)."""
    cats: list[CatInputs] = []
    for node in converted.graph.nodes:
        if not _is_cat(node):
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        if isinstance(tensors, (list, tuple)):
            cats.append([_source_pattern(t, outputs) for t in tensors])
    return grouped(cats, convs)


def _source_pattern(node: Any, outputs: dict[Any, tuple[str, tuple[float, int]]]
                    ) -> tuple[str, tuple[float, int]] | None:
    """The conv pattern (``outputs``) whose output node reaches ``node`` through single-input
    nodes, if any."""
    import torch

    for _ in range(DEPTH):
        if not isinstance(node, torch.fx.Node):
            return None
        if node in outputs:
            return outputs[node]
        inputs = node.all_input_nodes
        if len(inputs) != 1 or node.op in ("placeholder", "get_attr"):
            return None
        node = inputs[0]
    return None


def grouped(cats: list[CatInputs], convs: list[str]) -> list[Group]:
    """The groups of ``shared_groups`` from each cat's inputs (``convs``: the captured convs'
    paths, in model order)."""
    found: list[tuple[set[str], bool, set[str]]] = []
    for sources in cats:
        by_qparams: dict[tuple[float, int], list[str]] = {}
        for source in sources:
            if source is not None:
                by_qparams.setdefault(source[1], []).append(source[0])
        for sharing in by_qparams.values():
            mine = {c for c in sharing if c in convs}
            others = set(sharing) - mine
            if mine and len(set(sharing)) >= 2:
                # open: the cat takes another input too (a pool branch, a module no capture
                # holds, or a conv's output at other qparams), whose values the shared
                # observer saw as well
                found.append((mine, len(mine) < len(sources), others))
    merged: list[tuple[set[str], bool, set[str]]] = []
    for members, open_, others in found:  # groups that share a conv are one observer's
        for other in [g for g in merged if g[0] & members]:
            merged.remove(other)
            members, open_, others = members | other[0], open_ or other[1], others | other[2]
        merged.append((members, open_, others))
    return [(tuple(sorted(m, key=convs.index)), open_, tuple(sorted(others)))
            for m, open_, others in merged]


def with_shared_ranges(layers: Sequence[LayerCapture], groups: list[Group],
                       cat: str = FX_CAT) -> list[LayerCapture]:
    """``layers`` with each grouped conv's output range widened to its group's (the union of
    its members' ranges: samples and calibration batches; where a cat also takes an input no
    captured conv wrote, whose float range is not known, the range the shared qparams
    represent), and a note naming the others (convs and other modules)."""
    by_name = {lay.name: lay for lay in layers}
    widened: dict[str, LayerCapture] = {}
    for group, open_, modules in groups:
        members = [by_name[c] for c in group if c in by_name and by_name[c].case.output_range]
        if len(members) + len(modules) < 2:
            continue
        ranges = [lay.case.output_range for lay in members if lay.case.output_range]
        if open_:
            ranges.append(_representable(members[0]))
        union = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        for lay in members:
            others = ", ".join([*(m.name for m in members if m is not lay), *modules])
            widened[lay.name] = dataclasses.replace(
                lay, shared_range=union,
                case=with_model_range(lay.case, lay.float_output, lay.calibration_range,
                                      shared_range=union),
                notes=(*lay.notes, SHARED_NOTE.format(others=others, cat=cat)))
    return [widened.get(lay.name, lay) for lay in layers]


def _representable(lay: LayerCapture) -> tuple[float, float]:
    """The range a conv's output qparams represent."""
    lo, hi = clip_bounds(lay.quantized_output_qparams)
    return float(lo.min()), float(hi.max())


def _is_cat(node: Any) -> bool:
    import torch

    return ((node.op == "call_function"
             and node.target in (torch.cat, torch.concat, torch.ops.aten.cat.default))
            or (node.op == "call_method" and node.target == "cat"))


def _writes_codes(module: Any) -> bool:
    """A quantized module with output qparams of its own (a conv, a ConvTranspose, a Linear)."""
    return module is not None and all(
        isinstance(getattr(module, a, None), (int, float)) for a in ("scale", "zero_point"))


def _source_module(node: Any, modules: dict[str, Any]) -> str | None:
    """The module with output qparams of its own (``_writes_codes``) whose output reaches
    ``node`` through single-input ops (a ReLU, a pool, a reshape), if any: its path."""
    import torch

    for _ in range(DEPTH):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "call_module" and _writes_codes(modules.get(str(node.target))):
            return str(node.target)
        inputs = node.all_input_nodes
        if len(inputs) != 1 or node.op in ("placeholder", "get_attr") or "quantize" in str(
                node.target):
            return None
        node = inputs[0]
    return None
