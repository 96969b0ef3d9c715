"""Vega-Lite specs (built with altair) of the HTML report's figures, one function per figure.

Each function takes the plain numbers of ``html_data`` and returns the spec as a dict; the
page (``html``) embeds the dicts and the Vega bundle. Large series travel as one record of
parallel arrays that Vega-Lite's ``flatten`` transform unrolls (about half the bytes of one
record per point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np

from .html_data import ChannelErrors, ChannelRanges, Heatmap, Histogram, WaterfallRow, rounded

Spec = dict[str, Any]

RED, BLUE, GREEN, GREY, LIGHT, ORANGE = ("#c0392b", "#2e6da4", "#27ae60", "#7f8c8d",
                                         "#d5d8dc", "#e67e22")
WIDTH = 560
#: Waterfall bar colours by what the stage does to the error.
STAGE_STATES = {"raises the error": RED, "lowers the error": GREEN, "exact": GREY,
                "n/a": LIGHT}


def _spec(chart: alt.TopLevelMixin, datasets: dict[str, Any] | None = None) -> Spec:
    """The chart's Vega-Lite dict, with ``datasets`` (from ``_columns``) joined in after
    altair has built it (altair walks every value of its data, one by one). Not validated
    here (a second of jsonschema per page): tests/render/test_html.py validates every figure's spec
    against the Vega-Lite schema, and the browser test draws them."""
    spec: Spec = chart.to_dict(validate=False)
    spec.pop("$schema", None)  # a URL: nothing is fetched at view time, so say none
    if datasets:
        spec.setdefault("datasets", {}).update(datasets)
    return spec


def _columns(name: str, **arrays: Any) -> tuple[alt.Data, dict[str, Any]]:
    """A named dataset of one record of parallel arrays (``flatten`` unrolls them) plus
    scalar fields: the chart's data reference, and the dataset for ``_spec``."""
    record = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
    return alt.Data(name=name), {name: [record]}


def _state(row: WaterfallRow) -> str:
    if not row.applies:
        return "n/a"
    if row.exact or row.end == row.start:
        return "exact"
    return "raises the error" if row.end > row.start else "lowers the error"


def waterfall_chart(rows: Sequence[WaterfallRow], title: str) -> Spec:
    """Each stage a bar from the error before it to the error after it (cumulative RMSE), so
    the bars build up to the total; a diamond marks the stage's isolated effect (the effect
    alone on the float output), a dashed line the total."""
    data = [{"order": i, "stage": r.id, "start": r.start, "end": r.end, "state": _state(r),
             "adds": r.delta_rmse, "adds_max": r.delta_max, "isolated": r.isolated_rmse,
             "share": r.share, "floor": r.floor, "reason": r.reason or "",
             "mark": "isolated effect (alone on the float output)"}
            for i, r in enumerate(rows)]
    total = next((r.end for r in reversed(rows) if r.applies), 0.0)
    base = alt.Chart(alt.Data(values=data)).encode(
        y=alt.Y("stage:N", sort=alt.EncodingSortField("order"), title=None))
    tooltip = [alt.Tooltip("stage:N"), alt.Tooltip("start:Q", title="RMSE before", format=".4g"),
               alt.Tooltip("end:Q", title="RMSE after", format=".4g"),
               alt.Tooltip("adds:Q", title="adds (RMSE)", format=".4g"),
               alt.Tooltip("adds_max:Q", title="adds (max |error|)", format=".4g"),
               alt.Tooltip("isolated:Q", title="isolated (RMSE)", format=".4g"),
               alt.Tooltip("share:Q", title="share of error energy", format=".0%"),
               alt.Tooltip("floor:Q", title="floor (RMSE)", format=".4g"),
               alt.Tooltip("reason:N", title="why n/a")]
    bars = base.mark_bar(height={"band": 0.6}, minBandSize=2).encode(
        x=alt.X("start:Q", title="RMSE of the output error (float units)"), x2="end:Q",
        color=alt.Color("state:N", title="stage", scale=alt.Scale(
            domain=list(STAGE_STATES), range=list(STAGE_STATES.values()))),
        tooltip=tooltip)
    isolated = base.transform_filter("datum.isolated > 0").mark_point(
        filled=True, size=80, color="black", opacity=1).encode(
        x="isolated:Q", tooltip=tooltip, shape=alt.Shape("mark:N", title=None, scale=alt.Scale(
            range=["diamond"]), legend=alt.Legend(labelLimit=320)))
    na = base.transform_filter("datum.state == 'n/a'").mark_text(
        align="left", dx=4, color=GREY).encode(x="start:Q", text=alt.value("n/a"),
                                               tooltip=tooltip)
    line = alt.Chart(alt.Data(values=[{"total": total}])).mark_rule(
        strokeDash=[4, 3], color="black").encode(x="total:Q", tooltip=[
            alt.Tooltip("total:Q", title="total RMSE", format=".4g")])
    chart = alt.layer(bars, isolated, na, line).properties(
        width=WIDTH, height=26 * len(rows), title=title)
    return _spec(chart)


def histogram_chart(h: Histogram, title: str, subtitle: Sequence[str]) -> Spec:
    """Counts per bin (clipped bins red), the quantization levels as faint lines, the
    clipping bounds dashed and the range beyond them shaded, the zero point in black."""
    bins = alt.Data(values=[
        {"lo": lo, "hi": hi, "count": int(n), "where": "clipped" if c else "kept"}
        for lo, hi, n, c in zip(rounded(h.edges[:-1], 8), rounded(h.edges[1:], 8), h.counts,
                                h.clipped) if n])
    unit = "codes (value / scale + zero point)" if h.codes else "value (float units)"
    x_scale = alt.Scale(domain=[float(h.edges[0]), float(h.edges[-1])], nice=False, zero=False)
    bars = alt.Chart(bins).mark_bar(binSpacing=0).encode(
        x=alt.X("lo:Q", title=unit, scale=x_scale), x2="hi:Q",
        y=alt.Y("count:Q", title="values"), y2=alt.datum(0),
        color=alt.Color("where:N", title=None, scale=alt.Scale(
            domain=["kept", "clipped"], range=[BLUE, RED])),
        tooltip=[alt.Tooltip("lo:Q", title="from", format=".5g"),
                 alt.Tooltip("hi:Q", title="to", format=".5g"), alt.Tooltip("count:Q"),
                 alt.Tooltip("where:N")])
    layers = [_grid_layer(h), _beyond_layer(h, x_scale), bars, _marks_layer(h)]
    chart = alt.layer(*[layer for layer in layers if layer is not None]).properties(
        width=WIDTH, height=180, title=alt.Title(title, subtitle=list(subtitle)))
    return _spec(chart)


def _grid_layer(h: Histogram) -> alt.Chart | None:
    if not h.grid.size:
        return None
    what = "level" if h.grid_every == 1 else f"every {h.grid_every}th level"
    levels = alt.Data(values=[{"level": v, "what": what} for v in rounded(h.grid, 8)])
    return alt.Chart(levels).mark_rule(color=GREY, opacity=0.35, strokeWidth=0.7).encode(
        x="level:Q", tooltip=[alt.Tooltip("level:Q", title="quantization level", format=".5g"),
                              alt.Tooltip("what:N", title="grid")])


def _beyond_layer(h: Histogram, x_scale: alt.Scale) -> alt.Chart | None:
    """Shade the shown range beyond the clipping bounds."""
    lo, hi = float(h.edges[0]), float(h.edges[-1])
    spans = [(lo, h.low), (h.high, hi)]
    data = [{"a": a, "b": b} for a, b in spans if b > a and a < hi and b > lo]
    if not data:
        return None
    return alt.Chart(alt.Data(values=[{"a": max(d["a"], lo), "b": min(d["b"], hi)}
                                      for d in data])).mark_rect(
        color=RED, opacity=0.08).encode(x=alt.X("a:Q", scale=x_scale), x2="b:Q")


def _marks_layer(h: Histogram) -> alt.LayerChart | None:
    """The clipping bounds (dashed red) and the zero point (black), each a fixed colour (not
    on the bars' colour scale)."""
    lo, hi = float(h.edges[0]), float(h.edges[-1])
    bounds = [{"x": v, "what": what} for v, what in
              ((h.low, "lowest level (clipping bound)"), (h.high, "highest level (clipping bound)"))
              if lo <= v <= hi]
    zero = [] if h.zero is None else [{"x": h.zero, "what": "zero point (float 0)"}]
    tooltip = [alt.Tooltip("what:N"), alt.Tooltip("x:Q", title="at", format=".5g")]
    layers = [alt.Chart(alt.Data(values=marks)).mark_rule(
        strokeWidth=2, color=color, strokeDash=dash).encode(x="x:Q", tooltip=tooltip)
        for marks, color, dash in ((bounds, RED, [5, 3]), (zero, "black", [1, 0])) if marks]
    return alt.LayerChart(layer=layers) if layers else None


def channel_ranges_chart(r: ChannelRanges, title: str) -> Spec:
    """Per channel: the representable range (light bar) and the values' range (dark bar, red
    when some values fall outside and are clipped)."""
    data, datasets = _columns("ranges", ch=np.arange(r.low.size), lo=rounded(r.low),
                              hi=rounded(r.high), dmin=rounded(r.data_min),
                              dmax=rounded(r.data_max), clipped=r.clipped.astype(int))
    flat: list[Any] = ["ch", "lo", "hi", "dmin", "dmax", "clipped"]
    base = alt.Chart(data).transform_flatten(flat).transform_calculate(
        where="datum.clipped > 0 ? 'values clipped' : 'values inside'")
    tooltip = [alt.Tooltip("ch:O", title=f"channel (axis {r.axis})"),
               alt.Tooltip("lo:Q", title="lowest level", format=".5g"),
               alt.Tooltip("hi:Q", title="highest level", format=".5g"),
               alt.Tooltip("dmin:Q", title="values min", format=".5g"),
               alt.Tooltip("dmax:Q", title="values max", format=".5g"),
               alt.Tooltip("clipped:Q", title="values clipped")]
    x = _channel_axis(f"channel (axis {r.axis})", r.low.size)
    size = max(1.0, min(14.0, WIDTH / max(r.low.size, 1) * 0.8))
    grid = base.mark_bar(color=LIGHT, size=size * 1.6).encode(
        x=x, y=alt.Y("lo:Q", title="value (float units)"), y2="hi:Q", tooltip=tooltip)
    values = base.mark_bar(size=size).encode(
        x=x, y="dmin:Q", y2="dmax:Q", tooltip=tooltip,
        color=alt.Color("where:N", title=None, scale=alt.Scale(
            domain=["values inside", "values clipped"], range=[BLUE, RED])))
    return _spec(alt.layer(grid, values).properties(width=WIDTH, height=180, title=title),
                 datasets)


def _channel_axis(title: str, count: int) -> alt.X:
    return alt.X("ch:Q", title=title, scale=alt.Scale(domain=[-0.5, count - 0.5], nice=False),
                 axis=alt.Axis(format="d", tickMinStep=1))


def channel_error_chart(ce: ChannelErrors, worst: Sequence[int], title: str) -> Spec:
    """RMSE and largest |error| per output channel, the channels mapped below in orange."""
    data, datasets = _columns("channels", ch=np.arange(ce.rmse.size), rmse=rounded(ce.rmse),
                              max=rounded(ce.max_abs),
                              worst=[int(c in worst) for c in range(ce.rmse.size)])
    base = alt.Chart(data).transform_flatten(["ch", "rmse", "max", "worst"]).transform_calculate(
        shown="datum.worst ? 'mapped below' : 'other channels'")
    x = _channel_axis("output channel", ce.rmse.size)
    size = max(1.0, min(18.0, WIDTH / max(ce.rmse.size, 1) * 0.8))
    color = alt.Color("shown:N", title=None, scale=alt.Scale(
        domain=["other channels", "mapped below"], range=[BLUE, ORANGE]))
    tooltip = [alt.Tooltip("ch:Q", title="channel"),
               alt.Tooltip("rmse:Q", title="RMSE", format=".4g"),
               alt.Tooltip("max:Q", title="max |error|", format=".4g")]
    panels = [base.mark_bar(size=size).encode(x=x, y=alt.Y(f"{field}:Q", title=label),
                                              color=color, tooltip=tooltip)
              .properties(width=WIDTH, height=110)
              for field, label in (("rmse", "RMSE"), ("max", "max |error|"))]
    return _spec(alt.vconcat(*panels).properties(title=title), datasets)


def heatmap_chart(hm: Heatmap, trace: tuple[str, str], peak: float, title: str,
                  subtitle: Sequence[str]) -> Spec:
    """The error of one channel over its output positions (quantized - float, red above,
    blue below, full colour at ``peak``: one scale for every map of a path); each cell's
    tooltip gives its value and the ``qconvdiag trace`` command of that element. ``trace``:
    the command's text before and after the ``--at`` indices."""
    spatial = hm.positions.shape[1] - 2 - (hm.depth is not None)
    fixed = {"n": hm.batch, "c": hm.channel, **({"d": hm.depth} if hm.depth is not None else {})}
    rows_h = {"h": hm.positions[:, -2]} if spatial == 2 else {}  # conv1d: one row
    data, datasets = _columns("cells", **fixed, **rows_h, w=hm.positions[:, -1],
                              e=rounded(hm.error), q=rounded(hm.quantized))
    at = " + ',' + ".join(f"datum.{k}" for k in (*fixed, *rows_h, "w"))
    bh, bw = hm.block
    chart = alt.Chart(data).transform_flatten([*rows_h, "w", "e", "q"]).transform_calculate(
        at=at, row=f"floor({'datum.h' if rows_h else '0'} / {bh})", col=f"floor(datum.w / {bw})",
        float="datum.q - datum.e",
        trace=f"{_js_string(trace[0])} + datum.at + {_js_string(trace[1])}")
    rows, columns = hm.cells
    px = max(3, min(40, (WIDTH + 40) // max(columns, 1)))
    peak = peak or 1.0
    axis = {"h": _cell_axis(rows, bh, "H") if rows_h else None, "w": _cell_axis(columns, bw, "W")}
    chart = chart.mark_rect().encode(
        x=alt.X("col:O", axis=axis["w"]), y=alt.Y("row:O", axis=axis["h"]),
        color=alt.Color("e:Q", title="error", scale=alt.Scale(
            scheme="redblue", reverse=True, domain=[-peak, peak], domainMid=0)),
        tooltip=[alt.Tooltip("at:N", title="output index"),
                 alt.Tooltip("e:Q", title="error (quantized - float)", format=".5g"),
                 alt.Tooltip("q:Q", title="quantized", format=".5g"),
                 alt.Tooltip("float:Q", title="float", format=".5g"),
                 alt.Tooltip("trace:N", title="trace it")])
    chart = chart.properties(width=px * columns, height=max(px * rows, 12),
                             title=alt.Title(title, subtitle=list(subtitle)))
    return _spec(chart, datasets)


def _cell_axis(cells: int, block: int, name: str) -> alt.Axis:
    """Labels in output positions (cell * block), about 8 of them."""
    step = max(1, math.ceil(cells / 8))
    return alt.Axis(title=name if block == 1 else f"{name} (cells of {block})",
                    values=list(range(0, cells, step)), labelExpr=f"datum.value * {block}",
                    labelAngle=0)


def _js_string(text: str) -> str:
    """A Vega expression string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def model_chart(names: Sequence[str], own: Sequence[float | None],
                propagated: Sequence[float | None], title: str) -> Spec:
    """SQNR along the model: each conv's own error and the error it carries (propagated), in
    model order; an exact output (infinite SQNR) is left out."""
    rows = [{"order": i, "layer": n, "error": kind, "sqnr_db": float(f"{v:.4g}")}
            for i, n in enumerate(names)
            for kind, v in (("own", own[i]), ("propagated", propagated[i])) if v is not None]
    chart = alt.Chart(alt.Data(values=rows), title=title, width=WIDTH).mark_line(
        point=True).encode(
        x=alt.X("layer:N", sort=list(names), title="conv, in model order",
                axis=alt.Axis(labelAngle=-45, labelLimit=160)),
        y=alt.Y("sqnr_db:Q", title="SQNR (dB, higher is better)"),
        color=alt.Color("error:N", scale=alt.Scale(domain=["own", "propagated"],
                                                   range=[BLUE, ORANGE]), title=None),
        tooltip=["layer:N", "error:N", alt.Tooltip("sqnr_db:Q", format=".2f")])
    return _spec(chart)
