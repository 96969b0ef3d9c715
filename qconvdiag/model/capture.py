"""``capture_model``: run a float model and its quantized twin once, with hooks, and keep for
every quantized conv what the model walk needs (see bundle.py).

The quantized twin comes from torch.ao's eager flow (``prepare``/``convert``, fused ConvReLU
and ConvBn included), FX (``convert_fx``), or torchao's PT2E flow (``convert_pt2e``: see
pt2e_capture.py, which reuses the steps here). The first two keep each conv's module path,
so the float conv is the float model's module of the same name. A BatchNorm that consumed the
float conv's output (the same tensor) and is gone from the quantized model was folded into
the conv: the float weight and bias are folded the same way (``torch.nn.utils.fusion``), and
the report says so. The float model's output at that point is what it computed there: the
conv's output, or its BatchNorm's when folded, then the fused activation (applied here when
the quantized conv fused it).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..case import (
    PADDING_MODES,
    PERSISTED_NOTES,
    QAT_NOTE,
    REFLECT_NOTE,
    FoldedBatchNorm,
    ModuleState,
    QuantSetup,
    build_case,
    reflect_padded,
)
from ..errors import CaseError
from ..measure.budget import SAMPLE_RANGE
from ..parallel import two_at_a_time
from ..quantization.qparams import QParams, dequantize32, dtype_name, make_qparams
from .after import LostAfter
from .bundle import (
    FLOAT32_NOTE,
    MODEL_INPUT_NOTE,
    LayerCapture,
    ModelBundle,
    judged_ranges,
    save_bundle,
    with_model_range,
)
from .compiled import CompiledWith
from .hooks import Seen, forward_or_refuse, run_both, samples_within
from .ops import OpRange
from .refold import SharedFold
from .reuse import ReusedActivation, reused_activations
from .stale import StaleRequantization, stale_requantization

Progress = Callable[[str], None]


def capture_model(float_model: Any, quantized_model: Any, inputs: Any,
                  path: str | os.PathLike[str] | None = None, *,
                  calibration: Any = None, max_elements: int | None = None,
                  progress: Progress | None = None) -> ModelBundle:
    """Capture every quantized conv of ``quantized_model`` with its float twin in
    ``float_model`` (eval mode), both run on ``inputs`` (a tensor or a list of batches), and
    write the bundle to ``path`` (unless None). ``calibration``: the batches the quantized
    model was calibrated on (or like them): the float model runs on them once more to record
    each conv's output range, against which its output scale is judged (without them, the
    range of ``inputs`` only, judged leniently: ``budget.SAMPLE_RANGE``). ``quantized_model``
    may be a ``convert_pt2e`` GraphModule (torchao's PT2E flow; pt2e_capture.py): its convs
    then run on engine ``x86_inductor``. It may be what ``torch.compile`` returned: the model
    it wraps is captured, and how it was compiled kept (compiled.py). Example::

        qconvdiag.capture_model(model, quantized, [x1, x2], path="model.pt",
                                calibration=calibration_batches)
        # then: qconvdiag explain model.pt
    """
    import torch

    from ..io import MAX_ELEMENTS

    limit = MAX_ELEMENTS if max_elements is None else max_elements
    say = progress or (lambda _msg: None)
    for label, model in (("float_model", float_model), ("quantized_model", quantized_model)):
        if not isinstance(model, torch.nn.Module):
            raise CaseError(f"capture_model: {label} must be a torch.nn.Module")
    _refuse_prepared_graph(float_model)
    if float_model.training:
        raise CaseError("capture_model: the float model is in training mode (BatchNorm would "
                        "update its statistics): call float_model.eval() first")
    batches = _batches(inputs)
    from .compiled import eager_calls, observed, unwrap
    from .pt2e_capture import is_pt2e_graph

    given = quantized_model
    quantized_model, compiled = unwrap(quantized_model)
    float_model, _ = unwrap(float_model)  # its module names, not '_orig_mod.'-prefixed ones
    float_model, twin_notes, qat = float_twin_of_qat(float_model)
    _refuse_several_inputs(float_model)
    if compiled is not None and is_pt2e_graph(quantized_model):
        say("running the compiled model once on the first batch (torch.compile compiles it "
            "then, if not yet): which conv ops it runs")
        compiled = observed(compiled, given, batches[0])
    # a module compiled in place (module.compile()) runs as it is here: hooks and all
    with eager_calls(quantized_model), eager_calls(float_model):
        return _capture(float_model, quantized_model, batches, limit, path, calibration, say,
                        compiled, twin_notes, qat)


def _refuse_prepared_graph(float_model: Any) -> None:
    """A float model that is torchao's prepared graph (``prepare_pt2e`` or
    ``prepare_qat_pt2e``: an exported GraphModule holding observers or fake quantization; not
    a ``prepare_fx`` model, whose conv modules capture hooks) is refused
    in one line: its convs are calls of the graph, no modules to hook, and it cannot be put in
    eval mode with ``.eval()``. The model exported is the float model: export shares its
    parameters, so after QAT it holds what training changed (unless a copy was exported)."""
    import torch

    if not isinstance(float_model, torch.fx.GraphModule):
        return
    # an exported graph calls aten's convs (a prepare_fx model calls its conv modules, which
    # capture hooks as any float model's)
    exported = any(n.op == "call_function" and "aten.conv" in str(n.target)
                   for n in float_model.graph.nodes)
    kinds = {type(m).__name__ for m in float_model.modules()}
    if exported and any("FakeQuantize" in k or k.endswith("Observer") for k in kinds):
        raise CaseError("capture_model: the float model is a prepared PT2E graph "
                        "(prepare_pt2e or prepare_qat_pt2e: it holds observers); pass the "
                        "model you exported, in eval mode (export shares its parameters: after "
                        "QAT it holds the trained weights, unless you exported a copy)")


#: A QAT conv's weight qparams as its fake quantization last applied them (its ``scale`` and
#: ``zero_point`` buffers), per channel.
TrainedQParams = tuple[tuple[float, ...], tuple[int, ...]]


def float_twin_of_qat(float_model: Any) -> tuple[
        Any, tuple[str, ...], dict[str, tuple[TrainedQParams | None, TrainedQParams | None]]]:
    """The float model itself, or, where it holds QAT modules (``prepare_qat``: the model
    convert was called on, as users pass it), its float twin, a note saying so, and those
    modules' paths, each with the weight and output qparams its fake quantizations last
    applied (``TrainedQParams``; None where it holds none): a copy whose QAT convs are their
    ``to_float()`` (a ConvBn's BatchNorm folded into its conv, as convert folds it), its fake
    quantization and observers off (identities that record nothing). Compared as it was, its
    ConvBn's weight was the conv's before its BatchNorm: every conv of a healthy QAT model read
    broken (a helper's). A QAT conv whose ``to_float()`` fails is refused in one line."""
    import copy

    import torch
    from torch.ao.quantization import disable_fake_quant, disable_observer

    qat = [name for name, m in float_model.named_modules()
           if name and hasattr(m, "weight_fake_quant") and callable(getattr(m, "to_float", None))
           and isinstance(m, torch.nn.modules.conv._ConvNd)]
    if not qat:
        return float_model, (), {}
    trained = {name: _trained_qparams(float_model, name) for name in qat}
    twin = copy.deepcopy(float_model)
    twin.apply(disable_fake_quant)
    twin.apply(disable_observer)
    for name in qat:
        parent, _, child = name.rpartition(".")
        owner = twin.get_submodule(parent) if parent else twin
        module = getattr(owner, child)
        try:
            floated = module.to_float()
        except Exception as exc:  # noqa: BLE001 - a module's own to_float: refused in a line
            raise CaseError(f"capture_model: the float model's QAT conv {name!r} "
                            f"({type(module).__name__}) fails its to_float() ({exc}): pass a "
                            "float model with the QAT-trained weights (each conv with its "
                            "BatchNorm folded as convert folds it)") from None
        setattr(owner, child, floated.eval())
    return twin.eval(), (f"the float model holds QAT modules ({len(qat)}, as {qat[0]}): its "
                         "float twin was captured (each one's to_float(), fake quantization "
                         "and observers off)",), trained


#: How far convert's qparams may lie from the ones the fake quantization last applied and
#: still be those: convert runs the weight's once more (one more step of its moving average)
#: and its observer computes them over another range of levels (measured 0.39% to 0.66% on
#: x86's QAT qconfig); a model run after convert with its observers on moves them further
#: (10 passes on a batch beyond its ranges: 7%, a zero point 1 off; 50: 30%, past this, and
#: the note is lost: the tutorial's disable_observer before evaluating avoids it). A range cut
#: by hand by 1.5x lies 51% away, an output scale written at 0.8 of its own 25%.
TRAINED_RTOL = 0.1
TRAINED_ZERO_POINTS = 2


def _trained_qparams(model: Any, name: str) -> tuple[TrainedQParams | None,
                                                    TrainedQParams | None]:
    """A QAT conv's weight and output qparams as its fake quantizations last applied them:
    its output's is its own ``activation_post_process`` (eager), or, in a prepare_qat_fx
    graph, the fake quantization module its call feeds alone."""
    import torch

    module = model.get_submodule(name)
    output = getattr(module, "activation_post_process", None)
    if output is None and isinstance(model, torch.fx.GraphModule):
        node = next((n for n in model.graph.nodes
                     if n.op == "call_module" and n.target == name), None)
        users = [] if node is None else list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            after = model.get_submodule(str(users[0].target))
            output = after if "FakeQuantize" in type(after).__name__ else None
    return (_applied_qparams(getattr(module, "weight_fake_quant", None)),
            _applied_qparams(output))


def _applied_qparams(fake_quant: Any) -> TrainedQParams | None:
    """The scale and zero point a fake quantization module last applied (its buffers), or
    None where it keeps none."""
    scale, zero_point = (getattr(fake_quant, "scale", None),
                         getattr(fake_quant, "zero_point", None))
    if scale is None or zero_point is None:
        return None
    return (tuple(float(v) for v in scale.detach().double().reshape(-1)),
            tuple(int(v) for v in zero_point.detach().reshape(-1)))


def trained_through(trained: TrainedQParams | None, qp: QParams) -> bool:
    """The converted qparams ``qp`` (a weight's or an output's) are the ones QAT's fake
    quantization last applied (``trained``): training saw what they clip. Not where they were
    set or recomputed after it (an observer's range edited, a scale written by hand)."""
    if trained is None:
        return False
    scales, zero_points = trained
    if len(scales) == 1 and len(qp.scale) > 1:  # a per-tensor fake quantization's
        scales, zero_points = scales * len(qp.scale), zero_points * len(qp.scale)
    return len(scales) == len(qp.scale) and all(
        _same_grid(s, z, float(c), int(zc))
        for s, z, c, zc in zip(scales, zero_points, qp.scale, qp.zero_point))


def _same_grid(scale: float, zero_point: int, converted: float, converted_zp: int) -> bool:
    """One channel's applied qparams are convert's (``TRAINED_RTOL``, ``TRAINED_ZERO_POINTS``),
    or the one-sided grid torch's fused fake quantization applies to a symmetric channel whose
    weights all lie on one side (half convert's scale, zero point +-127 or 128, against 0:
    measured on helper-63's QAT models, where it cost a conv its note)."""
    if abs(scale - converted) <= TRAINED_RTOL * converted and \
            abs(zero_point - converted_zp) <= TRAINED_ZERO_POINTS:
        return True
    return (converted_zp == 0 and abs(zero_point) >= 127
            and abs(2 * scale - converted) <= TRAINED_RTOL * converted)


def _capture(float_model: Any, quantized_model: Any, batches: list[Any], limit: int,
             path: str | os.PathLike[str] | None, calibration: Any, say: Progress,
             compiled: CompiledWith | None, twin_notes: tuple[str, ...] = (),
             qat: dict[str, tuple[TrainedQParams | None, TrainedQParams | None]] | None = None
             ) -> ModelBundle:
    """``capture_model`` of the models as they are (not compiled)."""
    import torch

    from .pt2e_capture import capture_pt2e, is_pt2e_graph

    if is_pt2e_graph(quantized_model):
        return capture_pt2e(float_model, quantized_model, batches, limit, path, calibration,
                            say, compiled)
    pairs = _conv_pairs(float_model, quantized_model)
    if not pairs:
        raise CaseError(_no_quantized_conv(quantized_model))
    say(f"running both models on {len(batches)} batch(es), {len(pairs)} quantized convs")
    activations: dict[str, list[tuple[str, str, bool]]] = {}
    writers: dict[str, tuple[str, tuple[str, ...]]] = {}
    from .after import HeadRecorder, head_steps
    from .ops import OpRecorder

    returned: list[bool] = []  # per forward: the quantized model returned a quantized tensor
    outputs: dict[str, list[Any]] = {"quantized": [], "float": []}  # the models' outputs

    def kept(which: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            if which == "quantized":
                returned.append(_quantized_output(out))
            outputs[which].append(out)
        return hook

    handles = [quantized_model.register_forward_hook(kept("quantized")),
               float_model.register_forward_hook(kept("float"))]
    recorder: OpRecorder | None = None
    head: HeadRecorder | None = None
    try:  # every hook comes off, whatever fails, a recorder's registration included
        recorder = OpRecorder(float_model, quantized_model,
                              {name: qconv for name, (_f, qconv) in pairs.items()})
        # an eager model's modules after its last conv, for QCD071 to say where a loss is
        if not isinstance(quantized_model, torch.fx.GraphModule):
            head = HeadRecorder(float_model, quantized_model, set(pairs))
        seen = _run_with_hooks(float_model, quantized_model, pairs, batches, limit, activations,
                               writers)
        pairs = {name: pairs[name] for name in seen}  # in the order the model runs them
    except RuntimeError as exc:
        if "ScriptModule" not in str(exc):
            raise
        raise CaseError("capture_model: a module the capture hooks is a TorchScript module "
                        "(torch.jit.script), which takes no hooks; capture the models before "
                        "scripting them") from None
    finally:
        for h in handles:
            h.remove()
        for part in (recorder, head):
            if part is not None:
                part.remove()
    assert recorder is not None
    reused = reused_activations(activations, float_model, quantized_model,
                                {name: qconv for name, (_f, qconv) in pairs.items()},
                                {name: s.bn for name, s in seen.items() if s.bn})
    keep, notes = sample_notes(seen, batches, limit)
    notes[:0] = twin_notes
    transposed = [(kind, names) for kind, names in _quantized_others(quantized_model).items()
                  if "ConvTranspose" in kind]
    if transposed:  # between convs: a loss there shows as the next conv's input loss only
        notes.append("not walked (qconvdiag diagnoses Conv1d/2d/3d): " + "; ".join(
            f"{kind} {', '.join(names)}" for kind, names in transposed)
            + "; a loss there shows as the input lost before the conv after it (QCD065)")
    if any(returned):
        notes.append("the quantized model returns a quantized tensor: is a DeQuantStub missing "
                     "at its end? Float code after it (argmax, softmax, a loss) refuses one")
    points = {}
    for name, (fconv, qconv) in pairs.items():
        bn = folded_bn(seen[name], quantized_model)
        points[name] = (fconv if bn is None else float_model.get_submodule(bn),
                        "ReLU" in type(qconv).__name__)
    ranges = output_ranges(float_model, {**points, **{
        name: (point, False) for name, point in recorder.float_points.items()}},
        calibration, notes, say)
    say(f"capturing {len(pairs)} convs")

    # convs whose quantized module fused an activation the float model does not apply after
    # them (QCD064): their float output is compared as the float model gives it
    misfused = {c for r in reused for c in r.misfused}
    # the ReLU module the float model applies to each conv's BatchNorm's output (QCD072's
    # fuse group, for a BatchNorm the quantized model kept)
    # (a module called elsewhere too is left out: fusing it would remove it there)
    relu_after_bn = {conv: act for act, calls in activations.items() for conv, _l, direct in calls
                     if conv and not direct and len(calls) == 1
                     and type(float_model.get_submodule(act)).__name__ == "ReLU"}
    eager = not isinstance(quantized_model, torch.fx.GraphModule)
    # the ReLU module the float model applies to a conv's own output, or to the output of
    # the BatchNorm the quantized conv folded, called there alone, where an eager model's
    # quantized conv fused none (QCD075)
    relu_unfused = {conv: act for act, calls in activations.items() for conv, _l, direct in calls
                    if eager and conv in pairs and len(calls) == 1
                    and (direct or folded_bn(seen[conv], quantized_model) is not None)
                    and type(float_model.get_submodule(act)).__name__ == "ReLU"
                    and "ReLU" not in type(pairs[conv][1]).__name__}
    unfused_at = [name for name in pairs if seen[name].bn is not None
                  and folded_bn(seen[name], quantized_model) is None] if eager else []
    from .batchnorm import sole_readers

    alone = sole_readers(float_model, {name: pairs[name][0] for name in unfused_at},
                         batches[0]) if unfused_at else {}
    if relu_unfused:  # fusing a ReLU whose conv's output another op reads changes the model
        # (the output the ReLU reads: the conv's, or its folded BatchNorm's)
        read = {c: pairs[c][0] if folded_bn(seen[c], quantized_model) is None
                else float_model.get_submodule(seen[c].bn) for c in relu_unfused}
        relu_alone = sole_readers(float_model, read, batches[0],
                                  {c: float_model.get_submodule(act)
                                   for c, act in relu_unfused.items()})
        relu_unfused = {c: act for c, act in relu_unfused.items() if relu_alone[c]}

    def one(item: tuple[str, tuple[Any, Any]]) -> LayerCapture:
        name, (fconv, qconv) = item
        lay = _layer(name, fconv, qconv, seen[name], keep, float_model, quantized_model,
                     ranges.get(name), name in misfused, (qat or {}).get(name, (None, None)))
        bn = seen[name].bn
        if eager and bn is not None and lay.bn_folded is None:
            from .batchnorm import kept_batchnorm

            record = kept_batchnorm(bn, float_model.get_submodule(bn),
                                    relu_after_bn.get(name, ""), alone.get(name, True))
            lay = dataclasses.replace(lay, bn_kept=record)
        if name in relu_unfused:
            lay = dataclasses.replace(lay, unfused_relu=relu_unfused[name])
        return lay

    layers = two_at_a_time(one, list(pairs.items()))  # a layer's copies: single-threaded
    from .constant import with_writers
    from .shared import shared_groups, with_shared_ranges

    layers = with_writers(layers, writers, float_model,
                          {name: fconv for name, (fconv, _q) in pairs.items()}, batches[0])

    layers = with_shared_ranges(layers, shared_groups(
        quantized_model, {name: qconv for name, (_f, qconv) in pairs.items()}))
    from ..torch_calls import capture_warnings

    with capture_warnings():
        engine = torch.backends.quantized.engine
        stale = [] if engine != "qnnpack" else [  # QCD068: a requantization kept from before
            s for s in (stale_requantization(name, qconv, *_first_sample(seen[name]))
                        for name, (_f, qconv) in pairs.items()) if s is not None]
    if compiled is not None:
        notes.append(f"captured the model torch.compile wraps (backend {compiled.backend}), "
                     "as its eager run computes it")
    from ..arithmetic.cpu import isa_flags

    ops = recorder.results(None if calibration is None else ranges)
    last = recorder.ran_last
    after = _lost_after(layers, last, outputs, keep,
                        tuple(o.name for o in ops if last in o.after))
    if after is not None and head is not None:
        after = dataclasses.replace(after, steps=head_steps(head, float_model, quantized_model,
                                                            keep))
    # the CPU's flags, for QCD067 (engine.py: which engine's kernels ran an eager model's convs)
    return finish_bundle(layers, engine, path, notes, compiled, reused, ops,
                         isa_flags() or None, tuple(stale), after,
                         "fx" if isinstance(quantized_model, torch.fx.GraphModule) else "eager")


def _lost_after(layers: list[LayerCapture], last: str, outputs: dict[str, list[Any]],
                keep: int, after: tuple[str, ...]) -> LostAfter | None:
    """The models' outputs against each other (one tensor each, or a tuple, list or dict of
    them: each leaf against its twin, the worst one kept), and the conv the quantized model ran
    last against the float model's output there (its propagated SQNR), on the kept samples:
    the loss after the last conv (after.py), if any."""
    from ..measure.metrics import difference
    from .after import MIN_VALUES, lost_after

    lay = next((lay for lay in layers if lay.name == last), None)
    q_out, f_out = outputs["quantized"], outputs["float"]
    if lay is None or lay.output_float32 or not q_out or len(q_out) != len(f_out):
        return None
    leaves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for q, f in zip(q_out, f_out):
        pairs = _leaf_pairs(q, f)
        if pairs is None:
            return None  # not the same structure of float tensors: nothing this compares
        for key, pair in pairs:
            leaves.setdefault(key, []).append(pair)
    worst: tuple[float, str] | None = None  # (output SQNR, leaf); -inf: no signal left
    for key, batches in leaves.items():
        got = np.concatenate([q for q, _ in batches])[:keep]
        want = np.concatenate([f for _, f in batches])[:keep]
        if got.size == 0 or not (np.isfinite(got).all() and np.isfinite(want).all()):
            continue
        d = difference(got, want)
        # exact: +inf; a reference all zero with an error: no signal left (-inf)
        value = math.inf if d.rmse == 0 else -math.inf if d.sqnr_db is None else d.sqnr_db
        if value > -math.inf and got.size < MIN_VALUES:
            continue  # a few values with some signal: no evidence (after.MIN_VALUES)
        if worst is None or value < worst[0]:
            worst = (value, key)
    if worst is None:
        return None
    last_q = dequantize32(lay.quantized_output, lay.quantized_output_qparams)
    last_sqnr = difference(last_q, lay.float_output).sqnr_db
    output_sqnr = None if worst[0] == -math.inf else worst[0]
    if output_sqnr == math.inf:
        return None  # exact
    return lost_after(last, last_sqnr, output_sqnr, after, worst[1])


Leaves = list[tuple[str, tuple[np.ndarray, np.ndarray]]]


def _leaf_pairs(q: Any, f: Any, key: str = "") -> Leaves | None:
    """The float tensors of two models' outputs, leaf by leaf (a tuple's or list's items by
    index, a dict's by key, a module-path-like name each: ``logits``, ``1.out``), as float32
    arrays; None where the two are not the same structure. Leaves that carry no signal to
    compare are left out: not float tensors of one shape (None, an argmax's integers), 0-d
    (a score), or discrete (``_discrete``: a mask's decisions, whose flips a dB does not
    measure)."""
    import torch

    from .names import is_path

    if isinstance(q, torch.Tensor) and isinstance(f, torch.Tensor):
        q = q.dequantize() if q.is_quantized else q
        if tuple(q.shape) != tuple(f.shape) or q.dim() == 0 or not q.is_floating_point() \
                or not f.is_floating_point():
            return []
        want = f.detach().float().numpy()
        return [] if _discrete(want) else [(key, (q.detach().float().numpy(), want))]
    if isinstance(q, (tuple, list)) and isinstance(f, (tuple, list)) and len(q) == len(f):
        items = [(str(i), a, b) for i, (a, b) in enumerate(zip(q, f))]
    elif isinstance(q, dict) and isinstance(f, dict) and list(q) == list(f):
        items = [(str(k), q[k], f[k]) for k in q]
    elif not isinstance(q, (torch.Tensor, tuple, list, dict)) \
            and not isinstance(f, (torch.Tensor, tuple, list, dict)):
        return []  # None, a number, a string: nothing to compare
    else:
        return None
    out: Leaves = []
    for name, a, b in items:
        name = f"{key}.{name}" if key else name
        if not is_path(name):
            return None  # a key a report could not print safely
        pairs = _leaf_pairs(a, b, name)
        if pairs is None:
            return None
        out += pairs
    return out


#: A float output of at most this many distinct values, each taken 4 times on average or
#: more, is discrete (a mask, a class id as float): one flipped decision moves its SQNR by dB
#: a healthy model's output does not lose (helper-52: a mask at 17.5 dB beside 32 dB logits).
DISCRETE_VALUES = 16


def _discrete(values: np.ndarray) -> bool:
    distinct = np.unique(values).size
    return distinct <= DISCRETE_VALUES and values.size >= 4 * distinct


def _quantized_output(out: Any) -> bool:
    """A model's output is, or holds, a quantized tensor."""
    if isinstance(out, (tuple, list)):
        return any(_quantized_output(o) for o in out)
    if isinstance(out, dict):
        return any(_quantized_output(o) for o in out.values())
    return bool(getattr(out, "is_quantized", False))


def _first_sample(s: Seen) -> tuple[Any, np.ndarray]:
    """A conv's first captured sample: its input as the quantized tensor it received, and the
    output codes the model computed from it."""
    from ..arithmetic.torch_ref import quantized_tensor

    x, y = s.qinput[0], s.qoutput[0]
    return quantized_tensor(x.codes[:1], x.qparams), y.codes[:1]


def _no_quantized_conv(model: Any) -> str:
    """Why ``model`` holds no quantized conv, and what to pass instead."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):  # its convs are not torch.ao modules
        return ("capture_model: the quantized model is a TorchScript module (torch.jit.script, "
                "trace or load), whose quantized convs are no torch.ao modules and take no "
                "hooks; pass the eager model convert returned, before scripting it")
    observers = [m for m in model.modules()
                 if type(m).__name__.endswith(("Observer", "FakeQuantize"))]
    if observers:
        return ("capture_model: the quantized model is a prepared one, not converted yet (its "
                f"{type(observers[0]).__name__} modules still observe): calibrate it, then "
                "pass what convert_pt2e, convert_fx or convert returns")
    others = _quantized_others(model)
    if others:  # quantized layers, none of them a conv qconvdiag walks
        listed = "; ".join(f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                           for kind, names in others.items())
        return (f"capture_model: the quantized model holds no quantized conv; its quantized "
                f"layers are {listed}: qconvdiag diagnoses Conv1d/2d/3d (and ConvReLU), not "
                "Linear or ConvTranspose layers")
    # convert_fx marks the graph it returns (torch.ao's quantize_fx: meta
    # '_user_preserved_attributes'); a symbolic_trace of the float model has the same nodes
    if isinstance(model, torch.fx.GraphModule) and "_user_preserved_attributes" in getattr(
            model, "meta", {}) and any(
            n.op == "call_module" and any(  # a conv, or a fused ConvReLU2d around one
                isinstance(m, torch.nn.modules.conv._ConvNd)
                for m in model.get_submodule(str(n.target)).modules())
            for n in model.graph.nodes):
        return ("capture_model: the quantized model is convert_fx's graph with every conv left "
                "in float: convert_fx quantizes only what the backend supports, and its qconfig "
                "asked for something else (activations must be quint8 and weights qint8: a "
                "qint8 activation observer leaves the conv in float); prepare_fx with "
                "get_default_qconfig_mapping(torch.backends.quantized.engine)")
    if isinstance(model, torch.fx.GraphModule):
        return ("capture_model: the quantized model is a graph without quantize or dequantize "
                "nodes: a float graph (pass what convert_pt2e or convert_fx returns), or its "
                "quantizer left every conv in float (X86InductorQuantizer quantizes conv1d and "
                "conv2d, not conv3d)")
    if any(_dynamic(m) for m in model.modules()):
        return ("capture_model: the quantized model holds no quantized conv: quantize_dynamic "
                "quantizes Linear and recurrent layers and leaves convs in float; quantize the "
                "model with prepare, calibration batches and convert")
    return ("capture_model: the quantized model holds no quantized conv (torch.ao.nn.quantized "
            "Conv1d/2d/3d, ConvReLU)")


def _quantized_others(model: Any) -> dict[str, list[str]]:
    """The statically quantized modules of ``model`` that are not convs qconvdiag walks
    (Linear, ConvTranspose: torch.ao.nn.quantized's, with output qparams), by kind."""
    found: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        kind = type(m).__name__
        if name and type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic"
                                                    ".quantized")) and not _dynamic(m) \
                and not _is_quantized_conv(m) and isinstance(getattr(m, "scale", None), float) \
                and ("Linear" in kind or "ConvTranspose" in kind):
            found.setdefault(kind, []).append(name)
    return found


def _dynamic(module: Any) -> bool:
    """A module of torch.ao's dynamic quantization (``quantize_dynamic``: torch.ao.nn.quantized
    .dynamic, or a dynamic module of an older namespace)."""
    return ".dynamic." in type(module).__module__ + "."


def _kind(module: Any) -> str:
    return f"torch.ao.nn.quantized.dynamic.{type(module).__name__}"


def sample_notes(seen: dict[str, Seen], batches: list[Any], limit: int
                 ) -> tuple[int, list[str]]:
    """How many samples every layer keeps, and the bundle's note when that drops some."""
    notes: list[str] = []
    keep = samples_within(seen, limit)
    total = sum(int(b.shape[0]) for b in batches)
    if keep < total:
        notes.append(f"captured the first {keep} of {total} samples: a layer's tensors would "
                     f"exceed --max-elements ({limit:,} elements)")
    return keep, notes


def output_ranges(float_model: Any, points: dict[str, tuple[Any, bool]], calibration: Any,
                  notes: list[str], say: Progress) -> dict[str, tuple[float, float]]:
    """The float model's output range at each conv over the calibration batches (``points``:
    see ``_calibration_ranges``); without them, none, and a note in ``notes``."""
    if calibration is None:
        notes.append("capture_model was not given the batches the model was calibrated on "
                     "(calibration=...): "
                     "output scales are judged on the captured samples' range, which is "
                     "narrower than the observers saw, so only scales over "
                     f"{SAMPLE_RANGE:g}x too coarse for it are named")
        return {}
    cal_batches = _batches(calibration)
    say(f"the float model on {len(cal_batches)} calibration batch(es): output ranges")
    return _calibration_ranges(float_model, points, cal_batches)


def finish_bundle(layers: list[LayerCapture], engine: str,
                  path: str | os.PathLike[str] | None, notes: list[str],
                  compiled: CompiledWith | None = None,
                  reused: tuple[ReusedActivation, ...] = (),
                  ops: tuple[OpRange, ...] = (),
                  cpu_flags: tuple[str, ...] | None = None,
                  stale: tuple[StaleRequantization, ...] = (),
                  lost_after: LostAfter | None = None, flow: str = "eager",
                  bn_training: tuple[str, ...] = (),
                  shared_folds: tuple[SharedFold, ...] = ()) -> ModelBundle:
    """The bundle of ``layers``, written to ``path`` unless None."""
    bundle = ModelBundle(judged_ranges(layers), engine, "" if path is None else str(path),
                         tuple(notes),
                         compiled, reused, cpu_flags, ops, stale, lost_after, flow,
                         bn_training, shared_folds)
    if path is not None:
        save_bundle(bundle, path)
    return bundle


def _refuse_several_inputs(model: Any) -> None:
    """Refuse a model whose forward needs more than one argument: the capture runs each
    batch as ``model(batch)``, and an (inputs, labels) pair's second item is taken for labels
    (helper-50: forward(x, d) was refused as 'does the model run on these inputs')."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    needed = [p.name for p in params if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(needed) > 1:
        raise CaseError(f"capture_model: the float model's forward takes {len(needed)} inputs "
                        f"({', '.join(needed)}); capture_model runs models on one input tensor "
                        "per batch: wrap the model in a module whose forward takes the first "
                        "and passes the others as fixed tensors")


def _batches(inputs: Any) -> list[Any]:
    import torch

    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    # a DataLoader's or dataset's (inputs, labels) pairs: the inputs are the first item
    batches = [b[0] if isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor)
               else b for b in batches]
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise CaseError("capture_model: inputs must be a tensor, a list of tensors (batches) or "
                        "of (inputs, labels) pairs, e.g. a DataLoader")
    return [b.detach() for b in batches]


def _is_quantized_conv(module: Any) -> bool:
    from torch.ao.nn.quantized.modules.conv import _ConvNd

    return isinstance(module, _ConvNd) and not getattr(module, "transposed", False)


def _conv_pairs(float_model: Any, quantized_model: Any) -> dict[str, tuple[Any, Any]]:
    """Quantized conv -> its float conv, by module path, in the quantized model's order."""

    pairs = {}
    for name, qconv in quantized_model.named_modules():
        if not _is_quantized_conv(qconv):
            continue
        if _dynamic(qconv):
            raise CaseError(f"capture_model: {name!r} is a dynamically quantized conv "
                            f"({_kind(qconv)}: its input is quantized at run time, from each "
                            "batch's range); qconvdiag diagnoses statically quantized convs: "
                            "quantize the model with prepare, calibration batches and convert")
        fconv = float_conv_at(float_model, name, "the quantized one was made from")
        if (fconv.in_channels, fconv.out_channels) != (qconv.in_channels, qconv.out_channels):
            raise CaseError(f"capture_model: {name!r} has {fconv.in_channels}->"
                            f"{fconv.out_channels} channels in the float model, "
                            f"{qconv.in_channels}->{qconv.out_channels} quantized")
        modes = (getattr(fconv, "padding_mode", "zeros"), getattr(qconv, "padding_mode", "zeros"))
        if modes[0] != modes[1]:
            raise CaseError(f"capture_model: {name!r} pads with padding_mode={modes[0]!r} in "
                            f"the float model, {modes[1]!r} quantized: the quantized model was "
                            "made from another float model (pass the one it was made from)")
        pairs[name] = (fconv, qconv)
    return pairs


def float_conv_at(float_model: Any, name: str, made_from: str) -> Any:
    """The float model's conv at module path ``name`` (a fused ConvReLU/ConvBn's conv), refused
    in one line when it is missing, not a conv, or pads other than with zeros. ``made_from``
    ends the missing-module message ("pass the float model ...")."""
    import torch

    try:
        fconv = float_model.get_submodule(name)
    except AttributeError:
        raise CaseError(f"capture_model: the float model has no module {name!r} for the "
                        f"quantized conv of that name: pass the float model {made_from}"
                        ) from None
    # a float model fused before quantization holds ConvReLU2d / ConvBn2d: its conv is [0]
    if not isinstance(fconv, torch.nn.modules.conv._ConvNd) and len(list(fconv.children())):
        fconv = next(iter(fconv.children()))
    if not isinstance(fconv, torch.nn.modules.conv._ConvNd) or fconv.transposed:
        raise CaseError(f"capture_model: {name!r} is a {type(fconv).__name__} in the float "
                        "model, not a Conv1d/2d/3d")
    if getattr(fconv, "padding_mode", "zeros") not in PADDING_MODES:
        raise CaseError(f"capture_model: {name!r} pads with padding_mode="
                        f"{fconv.padding_mode!r}, which torch's quantized convs do not take "
                        "('zeros' and 'reflect' only)")
    return fconv


def _run_with_hooks(float_model: Any, quantized_model: Any, pairs: dict[str, tuple[Any, Any]],
                    batches: list[Any], limit: int,
                    activations: dict[str, list[tuple[str, str, bool]]],
                    writers: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, Seen]:
    seen = {name: Seen() for name in pairs}
    ran: list[str] = []  # the order the quantized model runs its convs in

    def q_hook(name: str) -> Callable[..., None]:
        # the codes copied now, the tensors not kept: the forward's memory is then reused as
        # it is without hooks (kept tensors made every later layer's memory fault in anew)
        def hook(_module: Any, args: tuple[Any, ...], out: Any) -> None:
            if not seen[name].qinput:
                ran.append(name)
            seen[name].qinput.append(_Codes.of(args[0]))
            seen[name].qoutput.append(_Codes.of(out))
        return hook

    handles = [qconv.register_forward_hook(q_hook(name))
               for name, (_fconv, qconv) in pairs.items()]
    run_both(float_model, lambda batch: quantized_model(batch),
             {name: fconv for name, (fconv, _qconv) in pairs.items()}, seen, batches, limit,
             handles, lambda bn: _gone(quantized_model, bn), activations, quantized_model,
             writers)
    # in the order they ran (a model may register its modules in another: the walk's "before"
    # and "last" are the run's)
    return {name: seen[name] for name in ran}


def _first(arrays: Sequence[np.ndarray], keep: int) -> np.ndarray:
    """The first ``keep`` samples of a conv's batches, as one array."""
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays))[:keep]


def _qparams(t: Any, what: str) -> QParams:
    import torch

    if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return make_qparams([float(t.q_scale())], [float(t.q_zero_point())],
                            dtype_name(t.dtype), None, what, "tensor")
    return make_qparams(t.q_per_channel_scales().tolist(),
                        t.q_per_channel_zero_points().tolist(), dtype_name(t.dtype),
                        int(t.q_per_channel_axis()), what, "tensor")


@dataclass(frozen=True, eq=False)
class _Codes:
    """A quantized tensor's integer codes (in their 8-bit dtype: a quarter of the memory that
    arithmetic's int32 takes) and qparams."""

    codes: np.ndarray
    qparams: QParams

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @staticmethod
    def of(t: Any) -> _Codes:
        from ..torch_calls import int_codes

        return _Codes(int_codes(t.detach()), _qparams(t, "captured"))


def _codes(batches: Sequence[_Codes], keep: int) -> tuple[np.ndarray, QParams]:
    """The codes and qparams of a conv's quantized tensors of every batch (same qparams)."""
    qp = batches[0].qparams
    for b in batches[1:]:
        if (b.qparams.scale, b.qparams.zero_point) != (qp.scale, qp.zero_point):
            raise CaseError("capture_model: a conv's input qparams change between batches")
    return _first([b.codes for b in batches], keep), qp


def _folded(fconv: Any, bn: Any | None) -> tuple[Any, Any]:
    """The float conv's weight and bias, BatchNorm folded in as torch's fusion folds it (new
    tensors, not the float model's).

    The weight-sized result is written into memory numpy allocates (it asks the kernel for huge
    pages: measured 6 ms against 20 ms for torch's fresh allocation of a ResNet-18's 11M
    weights, which faults in page by page); its values are torch's: the per-channel factor and
    the bias come from ``fuse_conv_bn_weights`` itself, and the product is its ``conv_w *
    factor``."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    w, b = fconv.weight.detach(), None if fconv.bias is None else fconv.bias.detach()
    float32 = all(t is None or t.dtype == torch.float32
                  for t in (w, b, *([] if bn is None else [bn.running_mean, bn.running_var,
                                                          bn.weight, bn.bias])))
    if not float32:  # torch's own arithmetic: a dtype numpy lacks, or a mixed promotion
        if bn is None:  # copies: the float model's parameters may change after the capture
            return w.clone(), None if b is None else b.clone()
        w, b = fuse_conv_bn_weights(w, b, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        return w.detach(), torch.as_tensor(b).detach()
    out = torch.from_numpy(np.empty(tuple(w.shape), dtype=np.float32))
    if bn is None:
        out.copy_(w)
        return out, None if b is None else b.clone()
    # folding a weight of ones gives the factor itself (1 * f is f), and the bias as torch's
    ones = torch.ones((w.shape[0],) + (1,) * (w.ndim - 1), dtype=w.dtype)
    factor, bias = fuse_conv_bn_weights(ones, b, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
    torch.mul(w, factor.detach(), out=out)
    return out, torch.as_tensor(bias).detach()


def folded_bn(s: Seen, quantized_model: Any) -> str | None:
    """The BatchNorm that consumed the float conv's output and is gone from the quantized
    model (folded into the quantized conv), if any."""

    return s.bn if s.bn is not None and _gone(quantized_model, s.bn) else None


def _gone(quantized_model: Any, bn_name: str) -> bool:
    """The quantized model has no BatchNorm of this name (or an Identity in its place)."""
    import torch

    try:
        still = quantized_model.get_submodule(bn_name)
    except AttributeError:
        return True
    return isinstance(still, torch.nn.Identity)


def _calibration_ranges(float_model: Any, points: dict[str, tuple[Any, bool]],
                        batches: list[Any]) -> dict[str, tuple[float, float]]:
    """The float model's output range at each conv (``points``: the module whose output it is,
    the conv or its folded BatchNorm, and whether a fused ReLU follows) over ``batches``."""
    import torch

    from ..torch_calls import capture_warnings

    ranges: dict[str, tuple[float, float]] = {}

    def hook(name: str, relu: bool) -> Any:
        def record(_module: Any, _args: Any, out: Any) -> None:
            lo, hi = float(out.min()), float(out.max())
            if relu:
                lo, hi = max(lo, 0.0), max(hi, 0.0)
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
        return record

    handles = [module.register_forward_hook(hook(name, relu))
               for name, (module, relu) in points.items()]
    try:
        with torch.no_grad(), capture_warnings():
            for batch in batches:
                # one line, as for the inputs
                forward_or_refuse(float_model, batch, "float", float_model, " on calibration=")
    finally:
        for h in handles:
            h.remove()
    return ranges


def _layer(name: str, fconv: Any, qconv: Any, s: Seen, keep: int, float_model: Any,
           quantized_model: Any, calibration_range: tuple[float, float] | None,
           misfused: bool = False,
           qat: tuple[TrainedQParams | None, TrainedQParams | None] = (None, None)
           ) -> LayerCapture:
    """``misfused``: the quantized conv fused a ReLU the float model does not apply after it
    (QCD064): the float model's output there stays as it is (the propagated error then shows
    what the fused ReLU clips); the case still models the module, its ReLU included. ``qat``:
    a QAT conv's weight and output qparams as its fake quantizations last applied them: where
    the converted module's are those, the layer carries the QAT note (not where either was
    set after training: the forum thread's output scale written by hand)."""
    bn_name = folded_bn(s, quantized_model)
    relu = "ReLU" in type(qconv).__name__
    float_side = float_reference(fconv, s, keep, float_model, bn_name, relu and not misfused)
    x_codes, x_qp = _codes(s.qinput, keep)
    y_codes, y_qp = _codes(s.qoutput, keep)
    try:
        sd_weight, sd_bias = qconv._weight_bias()
    except RuntimeError as exc:  # e.g. qnnpack cannot unpack a conv3d's weight
        import torch

        engine = torch.backends.quantized.engine
        raise CaseError(f"capture_model: {name!r}: torch cannot read back its quantized weight "
                        f"on engine {engine} ({str(exc).splitlines()[0]}); quantize and "
                        "capture the model on another engine (x86, fbgemm or onednn)") from None
    w_qp = _qparams(sd_weight, "qconv.weight").with_source("module")
    from ..torch_calls import int_codes

    out_qp = make_qparams([float(qconv.scale)], [float(qconv.zero_point)], "quint8", None,
                          "qconv", "module")
    if trained_through(qat[0], w_qp) and trained_through(qat[1], out_qp):
        # the model trained through the fake quantizations these qparams come from
        float_side = dataclasses.replace(float_side, notes=(*float_side.notes, QAT_NOTE))
    module = ModuleState(int_codes(sd_weight), w_qp,
                         None if sd_bias is None else sd_bias.detach().float().numpy().copy(),
                         out_qp)
    setup = QuantSetup(input_qparams=x_qp.with_source("user"), input_codes=x_codes,
                       module=module, used_quantized_dtypes=True,
                       apis=("torch.ao.nn.quantized",))
    padding = list(fconv.padding if not isinstance(fconv.padding, str) else qconv.padding)
    if getattr(fconv, "padding_mode", "zeros") == "reflect":
        # the quantized conv pads its input itself (F.pad), then runs with padding 0: the case
        # holds the padded input, as both convs see it
        x_codes = reflect_padded(x_codes, padding)
        float_side = dataclasses.replace(
            float_side, input=reflect_padded(float_side.input, padding),
            notes=(*float_side.notes, REFLECT_NOTE))
        setup = dataclasses.replace(setup, input_codes=x_codes)
        padding = [0] * len(padding)
    return layer_capture(name, fconv, float_side, x_codes, x_qp, setup, padding, relu,
                         y_codes, y_qp, bn_name, calibration_range)


@dataclass(frozen=True, eq=False)
class FloatSide:
    """What the float model gives one captured conv."""

    weight: Any
    """The float conv's weight (torch tensor), its BatchNorm folded in."""
    bias: Any
    input: np.ndarray
    """The float model's input at the conv (the kept samples)."""
    output: np.ndarray
    """The float model's output there: the conv's, or its folded BatchNorm's, then the fused
    ReLU."""
    notes: tuple[str, ...]
    bn: FoldedBatchNorm | None = None
    """The BatchNorm folded in, with its statistics (None: none, or one without running
    statistics)."""


def float_reference(fconv: Any, s: Seen, keep: int, float_model: Any, bn_name: str | None,
                    relu: bool) -> FloatSide:
    """The float side of one conv: its weight and bias with ``bn_name`` folded in (the
    BatchNorm the quantized model folded, if any), its input and output in the float model."""
    bn = None if bn_name is None else float_model.get_submodule(bn_name)
    notes = () if bn_name is None else (
        f"BatchNorm {bn_name} folded into the float weight and bias, as the quantized model "
        "folded it",)
    w, b = _folded(fconv, bn)
    x_float = _first(s.float_input, keep)
    y_float = _first(s.bn_output if bn is not None else s.float_output, keep)
    if relu:
        np.maximum(y_float, 0.0, out=y_float)
    return FloatSide(w, b, x_float, y_float, notes, folded_batchnorm(bn_name, bn))


def folded_batchnorm(name: str | None, bn: Any) -> FoldedBatchNorm | None:
    """The record of the BatchNorm module ``bn`` (``name``) folded into a conv: its eps and
    running variance (None without running statistics)."""
    if name is None or bn is None or getattr(bn, "running_var", None) is None:
        return None
    var = bn.running_var.detach().double().reshape(-1).tolist()
    return FoldedBatchNorm(name, float(bn.eps), tuple(float(v) for v in var))


def layer_capture(name: str, fconv: Any, float_side: FloatSide, x_codes: np.ndarray,
                  x_qp: QParams, setup: QuantSetup, padding: list[int], relu: bool,
                  y_codes: np.ndarray, y_qp: QParams, bn_name: str | None,
                  calibration_range: tuple[float, float] | None, flow: str = "eager",
                  output_float32: bool = False) -> LayerCapture:
    """The captured layer: its case (the float conv fed the quantized input it received,
    ``setup`` what the quantized model ran) and what the model walk compares.
    ``output_float32``: ``y_codes`` are the float32 values the kernel wrote."""
    w, b = float_side.weight, float_side.bias
    case = build_case(dequantize32(x_codes, x_qp), w.float().numpy(),
                      None if b is None else b.float().numpy(),
                      stride=list(fconv.stride), padding=padding,
                      dilation=list(fconv.dilation), groups=fconv.groups, setup=setup,
                      source=name, activation="relu" if relu else None,
                      notes=(MODEL_INPUT_NOTE,
                             *(n for n in float_side.notes if n in PERSISTED_NOTES)), flow=flow)
    if float_side.bn is not None:
        case = dataclasses.replace(case, folded_bn=float_side.bn)
    y_float = float_side.output
    notes = float_side.notes
    if output_float32:
        notes = (FLOAT32_NOTE, *notes)
    return LayerCapture(name, with_model_range(case, y_float, calibration_range),
                        float_side.input, y_float, y_codes, y_qp, bn_name, notes,
                        calibration_range, output_float32)
