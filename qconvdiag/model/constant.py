"""QCD074: constant input channels lost to 8-bit rounding, which a conv amplifies.

A structurally pruned model keeps the channels it pruned: the conv before writes a constant
there (its weights are zero; its bias, BatchNorm shift and activation remain), and the next
conv's response to it varies only at the zero-padded border. After fine-tuning, that conv's
folded weights on those channels can be very large (their BatchNorm's running variance
collapsed on a constant input), and the border response is what those channels carry. 8-bit
activations round the constant by up to half a step, and a constant below half a step reads 0,
like the padding: the response is gone, while each conv is at its floor on what it received
(helper-64's pruned MobileNetV2: 98.5% float, 10.3% quantized, no finding; at blocks.0.dw
constants of 0.020 to 0.041 on a step of 0.079, weights up to 79 against a median of 1.2).
Each chain from the writing conv through the amplifying one, kept in float with no
quantization inside, gave the float model's 98.5%.

The capture records which conv writes such an input and the modules between (hooks.py: the
first forward's tensors, through BatchNorms and modules that return a tensor or their input
only), whether any other op reads their outputs, and which convs first read what the
amplifying conv's output becomes, through any op (``chain_reads``: one more forward with every
torch function watched, only where a conv's input has such channels and amplifies them). The
walk names a conv only on all of this evidence:

- its input has channels constant in the float model over MIN_VALUES values or more each
  (samples times positions: a pooled feature of one sample is no evidence), nonzero, that
  rounding moves by MOVED of their value or more;
- its weights on them reach AMPLIFIED times the median of its other input channels' largest;
- that rounding alone, through the conv, leaves its output below LOST_DB from the float
  model's, and its output in the quantized model is below LOST_DB too;
- the loss shows where its output is read: a conv that reads what it becomes receives an
  input below LOST_DB, or SHOWS_DB or more below the input the amplifying conv received (an
  activation after it may clip the lost response away in the float model too: a review's
  ReLU6 did).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arithmetic.float_conv import conv64
from ..findings.fixes import CALIBRATE_EAGER, CALIBRATE_FX, comment
from ..report import Finding
from .bundle import LayerCapture, WriterChain
from .lost import LOST_DB
from .screen import Screen

CODE = "QCD074"
#: A channel is constant where its values span at most this share of its magnitude.
FLAT = 1e-6
#: ... over this many values or more (samples times positions).
MIN_VALUES = 16
#: Rounding moves a constant by this share of its value or more.
MOVED = 0.25
#: A conv reading what its output becomes receives an input this many dB below the input
#: the amplifying conv received, or more: the loss shows there (as QCD065 judges a conv's
#: input against the convs before it).
SHOWS_DB = 10.0
#: The conv's largest |weight| on those channels is this many times the median of its other
#: input channels' largest or more: it amplifies them.
AMPLIFIED = 10.0


def moved_constants(float_input: np.ndarray, received: np.ndarray,
                    codes: np.ndarray | None = None) -> np.ndarray:
    """The input channels constant in the float model (FLAT, over MIN_VALUES values or more,
    nonzero) that 8-bit rounding moves by MOVED of their value or more (``received``: the
    input the quantized conv received, dequantized). ``codes``: that input's codes, which
    rule most channels out at a quarter of the memory (a constant's codes are constant)."""
    if float_input.ndim < 3 or float_input.shape != received.shape:
        return np.empty(0, dtype=np.int64)
    n, c = float_input.shape[:2]
    if n * (float_input.size // max(n * c, 1)) < MIN_VALUES:
        return np.empty(0, dtype=np.int64)
    axes = (0, *range(2, float_input.ndim))
    if codes is not None and codes.shape == float_input.shape:
        candidates = np.flatnonzero(codes.min(axis=axes) == codes.max(axis=axes))
    else:
        candidates = np.arange(c)
    if not candidates.size:
        return candidates
    x = float_input[:, candidates].astype(np.float64)
    low, high = x.min(axis=axes), x.max(axis=axes)
    size = np.maximum(np.abs(low), np.abs(high))
    flat = (high - low <= FLAT * size) & (size > 0)
    k = x.reshape(n, len(candidates), -1)[0, :, 0]
    kq = received[:, candidates].reshape(n, len(candidates), -1)[0, :, 0].astype(np.float64)
    return candidates[flat & (np.abs(kq - k) >= MOVED * np.abs(k))]


def chain_reads(float_model: Any, chains: dict[str, tuple[str, tuple[str, ...]]],
                convs: dict[str, Any], batch: Any
                ) -> tuple[dict[str, bool], dict[str, tuple[str, ...]]]:
    """In one more forward of ``batch``, per reading conv of ``chains`` (its writer and the
    modules between): whether no op but those modules, the reading conv and the writer's other
    reading convs of ``chains`` (which a fix keeps in float with it) reads the writer's output,
    or theirs; and which convs of ``convs`` (name -> the float model's module) first read
    what its own output becomes, through any op (a residual add, a pool): where a loss it
    causes shows. Every torch function called on a tensor is seen (a TorchFunctionMode); a
    read that returns no tensor (``x.shape``) is not counted. A chain module's output is
    watched only where it continues the chain (the writer's output, or a watched input): an
    activation module called elsewhere too adds nothing."""
    import weakref

    import torch
    from torch.overrides import TorchFunctionMode

    from .batchnorm import flat_args, forward_watched

    watched: dict[int, set[str]] = {}  # a chain's tensor -> the readers whose chain it is
    held: list[Any] = []  # kept alive for the forward: their ids stay theirs
    inside: dict[str, set[str]] = {}
    for reader, (writer, _path) in chains.items():
        group = [r for r, (w, _p) in chains.items() if w == writer]
        inside[reader] = {n for r in group for n in (r, *chains[r][1])}
    running: list[str] = []  # the chains' modules whose forward runs now
    other = dict.fromkeys(chains, 0)
    heads: dict[str, set[str]] = {}  # writer -> the readers whose chain starts there
    steps: dict[str, set[str]] = {}  # module between -> the readers whose chain it is on
    for reader, (writer, path) in chains.items():
        heads.setdefault(writer, set()).add(reader)
        for module in path:
            steps.setdefault(module, set()).add(reader)
    # what each reading conv's output becomes, weakly held (a freed tensor's id is reused)
    derived: dict[int, tuple[Any, set[str]]] = {}
    found: dict[str, list[str]] = {reader: [] for reader in chains}

    def derived_of(t: Any) -> set[str]:
        hit = derived.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else set()

    def derive(t: Any, readers: set[str]) -> None:
        try:
            ref = weakref.ref(t)
        except TypeError:
            return
        old = derived_of(t)
        derived[id(t)] = (ref, old | readers)

    modules = dict(float_model.named_modules())

    def enter(name: str) -> Any:
        def hook(_m: Any, _a: Any) -> None:
            running.append(name)
        return hook

    def leave(name: str) -> Any:
        def hook(_m: Any, args: Any, out: Any) -> None:
            running.pop()
            if not isinstance(out, torch.Tensor):
                return
            readers = set(heads.get(name, ()))
            if name in steps and args:
                readers |= steps[name] & watched.get(id(args[0]), set())
            if readers:
                watched.setdefault(id(out), set()).update(readers)
                held.append(out)
        return hook

    def conv_reads(name: str) -> Any:
        def hook(_m: Any, args: Any) -> None:
            for reader in derived_of(args[0]) if args else ():
                if name not in found[reader]:
                    found[reader].append(name)
        return hook

    def conv_wrote(name: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            if name in chains and isinstance(out, torch.Tensor):
                derived[id(out)] = (weakref.ref(out), {name})  # its own, nothing before
            elif id(out) in derived:
                del derived[id(out)]  # the first conv that reads it is where it shows
        return hook

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and (watched or derived):
                now = running[-1] if running else None
                carried: set[str] = set()
                for a in flat_args((args, kwargs)):
                    for reader in watched.get(id(a), ()):
                        if now not in inside[reader]:
                            other[reader] += 1
                    carried |= derived_of(a)
                if carried:
                    derive(out, carried)
            return out

    names = {n for r, (w, path) in chains.items() for n in (r, w, *path)}
    handles = []
    for name in names:
        if name in modules:
            handles.append(modules[name].register_forward_pre_hook(enter(name)))
            handles.append(modules[name].register_forward_hook(leave(name)))
    for name, conv in convs.items():
        handles.append(conv.register_forward_pre_hook(conv_reads(name)))
        handles.append(conv.register_forward_hook(conv_wrote(name)))
    forward_watched(float_model, batch, handles, Reads())
    return ({reader: n == 0 for reader, n in other.items()},
            {reader: tuple(names) for reader, names in found.items()})


@dataclass(frozen=True)
class _Hit:
    writer: WriterChain
    lay: LayerCapture
    propagated_db: float
    channels: list[int]
    values: tuple[float, float]
    read: tuple[float, float]
    alone_db: float
    top: tuple[float, float]
    at_floor: bool
    after: tuple[str, float]
    """The conv after it whose input is furthest from the float model's, and that SQNR."""
    received: float
    """The SQNR of the input the amplifying conv received (inf: exact)."""


def qcd074(layers: Sequence[LayerCapture], screens: dict[str, Screen], flow: str
           ) -> Finding | None:
    """QCD074 for the convs of an eager or FX model on the module's evidence above: an error
    (the signal is gone), named with the conv that writes those channels."""
    if flow not in ("eager", "fx"):
        return None
    by_name = {lay.name: lay for lay in layers}
    found = []
    for lay in layers:
        s = screens.get(lay.name)
        if lay.writer is None or s is None or lay.output_float32:
            continue
        out = s.propagated.sqnr_db
        if out is None or out >= LOST_DB:
            continue
        # the loss must show where its output is read: an activation after it may clip the
        # border response away in the float model too (review: a ReLU6 did)
        received = math.inf if s.input.sqnr_db is None else s.input.sqnr_db
        after = [(n, screens[n].input.sqnr_db) for n in lay.writer.readers if n in screens]
        lossy = [(n, db) for n, db in after
                 if db is not None and (db < LOST_DB or db <= received - SHOWS_DB)]
        if not lossy:
            continue
        hit = _evidence(lay)
        if hit is not None:
            found.append(_Hit(lay.writer, lay, out, *hit, at_floor=s.verdict == "at_floor",
                              after=min(lossy, key=lambda a: a[1]), received=received))
    if not found:
        return None
    worst = min(found, key=lambda h: h.alone_db)
    lay = worst.lay
    channels = worst.channels
    shown = ", ".join(str(c) for c in channels[:6]) + (", ..." if len(channels) > 6 else "")
    names = ", ".join(h.lay.name for h in found)
    writer = by_name.get(worst.writer.conv)
    pruned = writer is not None and _zero_weights(writer, channels, lay.case.input.shape[1])
    source = (f"channels pruned in {worst.writer.conv}, its weights zero there, write one value"
              if pruned else f"{worst.writer.conv} writes one value there")
    zero = (", a constant below half the step reading 0"
            + (" like the zero padding" if any(lay.case.geometry.padding) else "")
            if worst.read[0] == 0 or worst.read[1] == 0 else "")
    border = (": their response varies only at the padded border, and that is what those "
              "channels carry" if any(lay.case.geometry.padding) and _taps(lay) > 1 else "")
    floor = (", while it is at its floor on what it received" if worst.at_floor else "")
    others = [h.lay.name for h in found if h.lay is not lay]
    return Finding(
        CODE, "error", f"constant input channels lost to 8-bit rounding, amplified ({names})",
        f"{lay.name}'s input channels {shown} ({len(channels)} of "
        f"{lay.case.input.shape[1]}) are constant in the float model "
        f"({_span(worst.values)}: {source}), and 8-bit rounding reads them as "
        f"{_span(worst.read)}{zero}. Its weights on them reach "
        f"{worst.top[0]:.3g}, {worst.top[0] / worst.top[1]:.0f}x the median of its other "
        f"input channels' largest ({worst.top[1]:.3g}){border}. That rounding alone, through it, "
        f"leaves its output {worst.alone_db:.1f} dB from the float model's; in the quantized "
        f"model it is {worst.propagated_db:.1f} dB{floor}, and {worst.after[0]}'s input, "
        f"after it, {worst.after[1]:.1f} dB, where {lay.name}'s was {_db(worst.received)}"
        + (f" ({', '.join(others)} too)" if others else "") + ".",
        {"convs": [h.lay.name for h in found], "writers": [h.writer.conv for h in found],
         "channels": [int(c) for c in channels], "propagated_sqnr_db": worst.propagated_db,
         "rounding_alone_sqnr_db": worst.alone_db, "weight_ratio": worst.top[0] / worst.top[1],
         "reader": worst.after[0], "reader_input_sqnr_db": worst.after[1]},
        _fix(found, flow))


def _db(value: float) -> str:
    return "exact" if value == math.inf else f"{value:.1f} dB"


def _span(values: tuple[float, float]) -> str:
    low, high = (f"{v:.3g}" for v in values)
    return low if low == high else f"{low} to {high}"


def _taps(lay: LayerCapture) -> int:
    return int(np.prod(lay.case.weight.shape[2:]))


def _zero_weights(writer: LayerCapture, channels: list[int], width: int) -> bool:
    """The writer's weights are zero on those output channels (the reader's input channels:
    the same where the writer's output is the reader's whole input)."""
    w = writer.case.weight
    return w.shape[0] == width and not np.any(w.reshape(w.shape[0], -1)[channels])


def _evidence(lay: LayerCapture) -> tuple[list[int], tuple[float, float],
                                         tuple[float, float], float,
                                         tuple[float, float]] | None:
    """The channels, their float values' range, the values they read, the SQNR their rounding
    alone leaves at the output, and the largest |weight| on them with the median of the other
    input channels' largest; None short of the module's evidence."""
    x, q = lay.float_input, lay.case.input
    channels = [int(c) for c in moved_constants(x, q)]
    if not channels:
        return None
    top = _amplified(lay, channels)
    if top is None:
        return None
    on, median = top
    axes = (0, *range(2, x.ndim))
    delta = np.zeros(x.shape, dtype=np.float64)
    delta[:, channels] = q[:, channels].astype(np.float64) - x[:, channels]
    error = float(np.sum(conv64(delta, lay.case.weight.astype(np.float64), None,
                                lay.case.geometry) ** 2))
    signal = float(np.sum(lay.float_output.astype(np.float64) ** 2))
    alone = 10 * np.log10(signal / error) if error > 0 and signal > 0 else np.inf
    if alone >= LOST_DB:
        return None
    k = x[:, channels].astype(np.float64).mean(axis=axes)
    kq = q[:, channels].astype(np.float64).mean(axis=axes)
    return (channels, (float(k.min()), float(k.max())), (float(kq.min()), float(kq.max())),
            float(alone), (on, median))


def _amplified(lay: LayerCapture, channels: list[int]) -> tuple[float, float] | None:
    """The largest |weight| on ``channels`` and the median of the other input channels'
    largest, where the first is AMPLIFIED times the second or more; else None."""
    w = np.abs(lay.case.weight.astype(np.float64))
    groups = lay.case.geometry.groups
    on = max(_weights_on(w, c, groups) for c in channels)
    rest = [_weights_on(w, c, groups) for c in range(lay.case.input.shape[1])
            if c not in set(channels)]
    median = float(np.median(rest)) if rest else 0.0
    if median <= 0 or on < AMPLIFIED * median:
        return None
    return on, median


def _weights_on(w: np.ndarray, channel: int, groups: int) -> float:
    """The largest |weight| on input ``channel``: of the output channels of its group, at its
    place in the group."""
    per_group_in, per_group_out = w.shape[1], w.shape[0] // groups
    g = channel // per_group_in
    return float(w[g * per_group_out:(g + 1) * per_group_out, channel % per_group_in].max())


def _regions(found: list[_Hit]) -> list[tuple[list[str], list[str], list[str]]]:
    """The float regions a fix keeps: each set of hits joined by a conv (one's reader is
    another's writer, or two share a writer), as its entries (writers that read no such
    channels: a DeQuantStub before each), the modules inside (between convs, and the convs
    that both read and write such channels) and its exits (readers that write none: a
    QuantStub after each), in model order."""
    regions: list[list[_Hit]] = []
    for h in found:
        joined = [r for r in regions if any(
            h.writer.conv in (o.writer.conv, o.lay.name) or h.lay.name == o.writer.conv
            for o in r)]
        merged = sorted([h, *(o for r in joined for o in r)], key=found.index)
        regions = [r for r in regions if r not in joined] + [merged]
    out = []
    for r in regions:
        readers = {h.lay.name for h in r}
        writers = {h.writer.conv for h in r}
        order = list(dict.fromkeys(n for h in r for n in (h.writer.conv, *h.writer.path,
                                                          h.lay.name)))
        entries = [n for n in order if n in writers and n not in readers]
        exits = [n for n in order if n in readers and n not in writers]
        inside = [n for n in order if n not in entries and n not in exits]
        out.append((entries, inside, exits))
    return out


def _fix(found: list[_Hit], flow: str) -> str:
    """Each chain from the writing conv through the amplifying one kept in float, with no
    quantization inside, in the model's flow: qconfig None for its modules (FX quantizes and
    dequantizes where float meets quantized), or a DeQuantStub before it and a QuantStub after
    it (eager: where only the chain reads its tensors; else in words)."""
    regions = _regions(found)
    head = ("# keep each chain from the conv that writes the constant channels through\n"
            "# the convs that amplify them in float, with no quantization inside\n")
    if flow == "fx":
        listed = "".join(f"        {[*e, *i, *x]!r},\n" for e, i, x in regions)
        return (head + "# (qconfig_mapping: the one the model was prepared with)\n"
                "for names in [\n" + listed + "]:\n"
                "    for name in names:\n"
                "        qconfig_mapping.set_module_name(name, None)\n" + CALIBRATE_FX)
    shared = [h for h in found if not h.writer.sole]
    if shared:
        h = shared[0]
        group = [o.lay.name for o in found if o.writer.conv == h.writer.conv]
        modules = ", ".join(dict.fromkeys([h.writer.conv, *h.writer.path, *group]))
        readers = " and ".join(group)
        return comment(
            f"Keep {h.writer.conv} through {readers} in float (qconfig None on {modules}), "
            f"with a DeQuantStub before {h.writer.conv} and a QuantStub after each of "
            f"{readers}. Other ops read {h.writer.conv}'s output too (a residual add, another "
            "branch): each needs a QuantStub of its own before it, since that output is float "
            "then. Then calibrate and convert again.")
    listed = "".join(f"        ({e!r}, {i!r}, {x!r}),\n" for e, i, x in regions)
    return (head + "# (model: the float model, fused and its qconfig set as before)\n"
            "import torch\n"
            "from torch.ao.quantization import DeQuantStub, QuantStub\n"
            "def wrap(name, *parts):\n"
            "    owner, _, attr = name.rpartition('.')\n"
            "    owner = model.get_submodule(owner) if owner else model\n"
            "    seq = [p if p is not None else getattr(owner, attr) for p in parts]\n"
            "    setattr(owner, attr, torch.nn.Sequential(*seq))\n"
            "for entries, inside, exits in [\n" + listed + "]:\n"
            "    for name in [*entries, *inside, *exits]:\n"
            "        model.get_submodule(name).qconfig = None\n"
            "    for name in entries:\n"
            "        wrap(name, DeQuantStub(), None)\n"
            "    for name in exits:\n"
            "        wrap(name, None, QuantStub())\n" + CALIBRATE_EAGER)


def with_writers(layers: list[LayerCapture], writers: dict[str, tuple[str, tuple[str, ...]]],
                 float_model: Any, convs: dict[str, Any], batch: Any) -> list[LayerCapture]:
    """The layers, each whose input has constant channels that rounding moves
    (``moved_constants``), on which its weights reach AMPLIFIED times the other channels',
    with the conv that writes them and the modules between (``writers``, from the first
    forward: hooks.run_both), the convs of ``convs`` (name -> the float model's module) that
    read what its own output becomes, and whether only the chain reads those tensors
    (``chain_reads``: one more forward, only where there is such a layer)."""
    import dataclasses

    def candidate(lay: LayerCapture) -> bool:
        setup = lay.case.setup
        codes = None if setup is None else setup.input_codes
        channels = moved_constants(lay.float_input, lay.case.input, codes)
        return bool(channels.size) and _amplified(lay, [int(c) for c in channels]) is not None

    hit = {lay.name for lay in layers if lay.name in writers and candidate(lay)}
    if not hit:
        return layers
    sole, readers = chain_reads(float_model, {name: writers[name] for name in hit}, convs,
                                batch)
    return [dataclasses.replace(lay, writer=WriterChain(*writers[lay.name], sole[lay.name],
                                                        readers[lay.name]))
            if lay.name in hit else lay for lay in layers]
