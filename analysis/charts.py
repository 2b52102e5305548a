"""Altair charts of sweep and quality frames: each function takes tidy frames, returns a chart.

No I/O here: `analysis.report` saves the charts (PNG through vl-convert) and every chart is rebuilt
from the saved CSVs of `results/sweeps/` (and the quality JSON). The frame helpers (`precision_label`,
`with_native_baseline`, `join_quality`) are pure pandas and are shared with the report's tables.
"""
from __future__ import annotations

import contextlib
import math

import altair as alt
import numpy as np
import pandas as pd

from sim.io import InputError
from sim.precision import PrecisionPolicy, parse_precision

WIDTH, HEIGHT = 260, 200
# one colour per importance signal in every chart
SIGNAL_DOMAIN = ["mass", "freq", "weight", "random", "dynamic", "mass + dynamic"]
SIGNAL_RANGE = ["#d62728", "#ff7f0e", "#bcbd22", "#7f7f7f", "#1f77b4", "#9467bd"]


def _signal_color() -> alt.Color:
    return alt.Color("signal:N", title="importance signal",
                     scale=alt.Scale(domain=SIGNAL_DOMAIN, range=SIGNAL_RANGE))
GROUP_KEYS = ("trace", "gpu", "policy", "protected_share", "partition", "prefetch", "phase", "capacity_bytes")


def precision_label(spec: str) -> str:
    """A short legend label for a precision policy, e.g. `mass 30% → Q2_K`, `dyn 0.6/0.9 → Q2_K`."""
    p = parse_precision(spec)
    parts = []
    if p.is_static:
        parts.append(f"{p.static_signal} {p.static_fraction * 100:g}% → {p.static_format.upper()}")
    if p.is_dynamic:
        parts.append(f"dyn {p.t1:g}/{p.t2:g} → {p.dynamic_format.upper()}")
    if p.low_pool_share is not None:
        parts.append(f"pool {p.low_pool_share:g}")
    return " + ".join(parts) or "native (Q4_K_M)"


def with_native_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Add tokens_per_s_native, speedup (ratio to native − 1) and delta_tokens_per_s per matching config.

    The baseline is the `native` row with the same trace, GPU, cache policy (and SLRU protected
    share, where the frame has that column), partition, prefetch, phase and capacity; rows without
    one get NaN.
    """
    keys = [k for k in GROUP_KEYS if k in frame.columns]
    base = frame[frame["precision"] == "native"][keys + ["tokens_per_s", "bytes_per_token", "hit_rate"]]
    base = base.drop_duplicates(keys).rename(columns={"tokens_per_s": "tokens_per_s_native",
                                                      "bytes_per_token": "bytes_per_token_native",
                                                      "hit_rate": "hit_rate_native"})
    out = frame.merge(base, on=keys, how="left")
    out["delta_tokens_per_s"] = out["tokens_per_s"] - out["tokens_per_s_native"]
    out["speedup"] = out["tokens_per_s"] / out["tokens_per_s_native"] - 1.0
    out["bytes_saved_fraction"] = 1.0 - out["bytes_per_token"] / out["bytes_per_token_native"]
    return out


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["precision_label"] = [precision_label(p) for p in out["precision"]]
    out["budget_pct"] = out["capacity_fraction"] * 100.0
    return out


def _precision_color(frame: pd.DataFrame) -> alt.Color:
    order = list(dict.fromkeys(frame.sort_values("precision", key=lambda s: s.map(_precision_rank))["precision_label"]))
    return alt.Color("precision_label:N", title="precision", sort=order,
                     legend=alt.Legend(orient="bottom", columns=2, labelLimit=320))


def _precision_rank(spec: str) -> tuple:
    p = parse_precision(spec)
    return (p.is_dynamic, p.is_static, p.static_signal or "", p.static_fraction, p.static_format or "", p.t1 or 0.0)


def _budget_rule(label_top: bool = False) -> alt.LayerChart:
    """A dashed vertical rule and label at the VRAM-derived budget (rows with budget_kind == derived)."""
    derived = alt.Chart().transform_filter(alt.datum.budget_kind == "derived").transform_aggregate(
        budget_pct="mean(budget_pct)")
    rule = derived.mark_rule(strokeDash=[4, 3], color="gray").encode(x="budget_pct:Q")
    text = derived.mark_text(align="right", dx=-3, color="gray", fontSize=10).encode(
        x="budget_pct:Q", y=alt.value(10 if label_top else HEIGHT - 8), text=alt.value("12 GB VRAM budget"))
    return rule + text


def _budget_x() -> alt.X:
    return alt.X("budget_pct:Q", title="expert budget (% of all expert bytes, Q4_K_M)",
                 scale=alt.Scale(domain=[0, 100]))


def _line_by_precision(frame: pd.DataFrame, y: alt.Y, field: str, facet: str, facet_title: str,
                       title: str, independent_y: bool = False, label_top: bool = False) -> alt.FacetChart:
    data = _labelled(frame)
    data["family"] = [_family_of(p) for p in data["precision"]]
    if "budget_kind" not in data.columns:
        data["budget_kind"] = "fraction"
    base = alt.Chart().mark_line(point=True, opacity=0.85).encode(
        x=_budget_x(), y=y, color=_precision_color(data),
        strokeDash=alt.StrokeDash("family:N", title="policy kind",
                                  sort=["native", "static", "dynamic", "static + dynamic"],
                                  legend=alt.Legend(orient="bottom", symbolType="stroke", symbolStrokeWidth=2)),
        tooltip=["precision:N", "policy:N", "gpu:N", alt.Tooltip("budget_pct:Q", format=".0f"),
                 alt.Tooltip(f"{field}:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT)
    layered = alt.layer(base, _budget_rule(label_top), data=data)
    order = list(dict.fromkeys(data[facet]))  # panels in the frame's order (a sweep puts its primary GPU first)
    chart = layered.facet(facet=alt.Facet(f"{facet}:N", title=facet_title, sort=order), columns=2)
    if independent_y:
        chart = chart.resolve_scale(y="independent")
    return chart.properties(title=title)


def hit_rate_vs_budget(frame: pd.DataFrame) -> alt.FacetChart:
    """Decode hit rate vs expert budget, one line per precision policy, one panel per cache policy."""
    y = alt.Y("hit_rate:Q", title="decode hit rate", scale=alt.Scale(zero=False))
    return _line_by_precision(frame, y, "hit_rate", "policy", "cache policy", "Expert-cache hit rate vs budget")


def tokens_per_s_vs_budget(frame: pd.DataFrame) -> alt.FacetChart:
    """Predicted decode tokens/s vs expert budget, one line per precision policy, one panel per GPU (own y scale)."""
    y = alt.Y("tokens_per_s:Q", title="decode tokens/s (simulated)", scale=alt.Scale(zero=False))
    return _line_by_precision(frame, y, "tokens_per_s", "gpu", "GPU profile", "Decode tokens/s vs budget",
                              independent_y=True)


def bytes_per_token_vs_budget(frame: pd.DataFrame) -> alt.FacetChart:
    """PCIe megabytes per decoded token vs expert budget (log y; rows moving 0 bytes are left out), one line
    per precision, one panel per cache policy."""
    data = frame.assign(mb_per_token=frame["bytes_per_token"] / 1e6)
    data = data[data["mb_per_token"] > 0]
    y = alt.Y("mb_per_token:Q", title="PCIe MB per decoded token (log scale)", scale=alt.Scale(type="log"))
    return _line_by_precision(data, y, "mb_per_token", "policy", "cache policy", "Bytes moved per token vs budget",
                              label_top=True)


def hit_rate_vs_budget_by_share(frame: pd.DataFrame) -> alt.FacetChart:
    """SLRU decode hit rate vs expert budget, one line per protected share, one panel per trace.

    `frame`: SLRU rows of one precision (one GPU per trace) with `protected_share`; a `share_label`
    column, when present, names the lines (e.g. marking the default share).
    """
    data = _labelled(frame)
    if "share_label" not in data.columns:
        data["share_label"] = [f"{x:g}" for x in data["protected_share"]]
    if "budget_kind" not in data.columns:
        data["budget_kind"] = "fraction"
    order = list(dict.fromkeys(data.sort_values("protected_share")["share_label"]))
    base = alt.Chart().mark_line(point=True, opacity=0.85).encode(
        x=_budget_x(), y=alt.Y("hit_rate:Q", title="decode hit rate", scale=alt.Scale(zero=False)),
        color=alt.Color("share_label:N", title="SLRU protected share", sort=order,
                        scale=alt.Scale(scheme="tableau10"), legend=alt.Legend(orient="bottom")),
        tooltip=["trace:N", "gpu:N", "share_label:N", alt.Tooltip("budget_pct:Q", format=".0f"),
                 alt.Tooltip("hit_rate:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT)
    layered = alt.layer(base, _budget_rule(), data=data)
    chart = layered.facet(facet=alt.Facet("trace:N", title="trace", sort=list(dict.fromkeys(data["trace"]))), columns=2)
    return chart.properties(title="SLRU hit rate vs budget by protected share")


def low_mass_vs_gain(frame: pd.DataFrame) -> alt.Chart | alt.FacetChart:
    """Tokens/s gain over native vs the share of gate mass served at low precision or skipped.

    `frame` must carry `speedup` (see `with_native_baseline`); native rows are dropped. Colour is the
    importance signal (or `dynamic`), shape the low format; a `budget_name` column, when present,
    gives one panel per budget.
    """
    data = _labelled(frame[frame["precision"] != "native"].dropna(subset=["speedup"]))
    data = data.assign(
        gain_pct=data["speedup"] * 100.0,
        degraded_pct=(data["low_precision_mass"] + data["skipped_mass"]) * 100.0,
        signal=[_signal_of(p) for p in data["precision"]],
        low_format=[_format_of(p) for p in data["precision"]],
    )
    order = {"random": 0, "dynamic": 1, "freq": 2, "weight": 3, "mass": 4}  # drawn last = on top
    data = data.sort_values("signal", key=lambda s: s.map(lambda v: order.get(v, 1.5)), kind="stable")
    pts = alt.Chart().mark_point(filled=True, size=70, opacity=0.85).encode(
        x=alt.X("degraded_pct:Q", title="gate mass served at low precision or skipped (%)"),
        y=alt.Y("gain_pct:Q", title="decode tokens/s gain over native (%)"),
        color=_signal_color(),
        shape=alt.Shape("low_format:N", title="low format"),
        tooltip=["precision:N", "gpu:N", "policy:N", alt.Tooltip("budget_pct:Q", format=".0f"),
                 alt.Tooltip("gain_pct:Q", format=".1f"), alt.Tooltip("degraded_pct:Q", format=".1f")],
    )
    title = "Speed gain vs gate mass served below Q4_K"
    if "budget_name" in data.columns and data["budget_name"].nunique() > 1:
        return pts.properties(width=330, height=260).facet(
            column=alt.Column("budget_name:N", title="expert budget"), data=data
        ).properties(title=title)
    return pts.properties(data=data, width=420, height=280, title=title)


def _family_of(spec: str) -> str:
    p = parse_precision(spec)
    if p.is_static and p.is_dynamic:
        return "static + dynamic"
    return "static" if p.is_static else "dynamic" if p.is_dynamic else "native"


def _signal_of(spec: str) -> str:
    p = parse_precision(spec)
    if p.is_static and p.is_dynamic:
        return f"{p.static_signal} + dynamic"
    return p.static_signal if p.is_static else "dynamic"


def _format_of(spec: str) -> str:
    fmts = parse_precision(spec).low_formats()
    return "+".join(f.upper() for f in fmts) or "native"


# ------------------------------------------------------------------------------------------------
# Quality join
# ------------------------------------------------------------------------------------------------

def _num(v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return math.nan
        pct = s.endswith("%")
        x = float(s[:-1]) if pct else float(s)
        return x / 100 if pct else x
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def quality_precision(row: dict | pd.Series) -> str | None:
    """The canonical precision-policy name of one quality row: its `precision`, else `policy`, else its fields."""
    for key in ("precision", "policy"):
        val = row.get(key)
        if isinstance(val, str) and val.strip():
            with contextlib.suppress(InputError):  # a label such as "static": fall back to the fields
                return parse_precision(val).name
    signal, fmt = row.get("signal"), row.get("format")
    fraction, t1, t2 = _num(row.get("fraction")), _num(row.get("t1")), _num(row.get("t2"))
    if fraction > 1:
        fraction /= 100
    fields: dict = {}
    has_static = isinstance(signal, str) and signal and not math.isnan(fraction)
    has_dyn = not math.isnan(t1) and not math.isnan(t2)
    fmt = fmt.lower() if isinstance(fmt, str) and fmt else None
    if has_static:
        fields.update(static_signal=signal.lower(), static_fraction=fraction, static_format=fmt)
    if has_dyn:
        fields.update(t1=t1, t2=t2)
        if fmt:
            fields["dynamic_format"] = fmt
    if not has_static and not has_dyn:
        return "native"
    return PrecisionPolicy(**fields).name


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def main_quality_rows(quality: pd.DataFrame) -> pd.DataFrame:
    """Quality rows comparable with the simulator: low-bit copies re-quantized from Q4_K, scored against
    the Q4_K model (drops jaxmoe.quality's float-reference and float→low compounding rows)."""
    q = quality
    keep = np.ones(len(q), dtype=bool)
    for col in ("source", "reference"):
        if col in q.columns:
            keep &= np.array([_blank(v) or str(v).lower() == "q4_k" for v in q[col]], dtype=bool)
    if "format" in q.columns and "precision" in q.columns:
        keep &= np.array([not (p == "native" and not _blank(f) and str(f).lower() not in ("q4_k", "q4_k_m"))
                          for p, f in zip(q["precision"], q["format"])], dtype=bool)
    return q[keep]


def join_quality(sim: pd.DataFrame, quality: pd.DataFrame) -> pd.DataFrame:
    """Inner-join simulator rows (with `speedup`) and the main quality rows on the canonical precision."""
    q = quality.copy()
    q["precision"] = [quality_precision(r) for r in q.to_dict("records")]
    q = main_quality_rows(q.dropna(subset=["precision"]))
    q = q.rename(columns={c: f"q_{c}" for c in ("policy", "low_mass", "skipped_mass") if c in q.columns})
    return sim.merge(q, on="precision", how="inner", suffixes=("", "_quality"))


def quality_vs_speed(joined: pd.DataFrame) -> alt.Chart | alt.FacetChart:
    """Δ decode tokens/s (simulator) against KLD to the Q4_K baseline (quality), one point per policy;
    one panel per trace when the joined frame holds several."""
    data = _labelled(joined[joined["precision"] != "native"].dropna(subset=["kld", "delta_tokens_per_s"]))
    data = data.assign(signal=[_signal_of(p) for p in data["precision"]],
                       low_format=[_format_of(p) for p in data["precision"]])
    tips = ["precision:N", "gpu:N", alt.Tooltip("kld:Q", format=".4f"), alt.Tooltip("delta_tokens_per_s:Q", format=".2f")]
    for extra in ("ppl", "top1"):
        if extra in data.columns:
            tips.append(alt.Tooltip(f"{extra}:Q", format=".4f"))
    pts = alt.Chart().mark_point(filled=True, size=70, opacity=0.85).encode(
        x=alt.X("kld:Q", title="KLD vs the Q4_K model (nats/token, small model)"),
        y=alt.Y("delta_tokens_per_s:Q", title="Δ decode tokens/s vs native (simulated)"),
        color=_signal_color(),
        shape=alt.Shape("low_format:N", title="low format"),
        tooltip=tips,
    )
    title = "Quality cost vs speed gain"
    if "trace" in data.columns and data["trace"].nunique() > 1:
        return pts.properties(width=330, height=260).facet(
            column=alt.Column("trace:N", title="trace (simulator)"), data=data).properties(title=title)
    return pts.properties(data=data, width=460, height=300, title=title)


def per_layer_heatmap(layers: pd.DataFrame) -> alt.Chart:
    """Hit rate per MoE layer (x) and expert budget (y): a long frame with layer, budget_pct, hit_rate."""
    return alt.Chart(layers).mark_rect().encode(
        x=alt.X("layer:O", title="MoE layer"),
        y=alt.Y("budget_pct:O", title="budget (% of experts)", sort="descending"),
        color=alt.Color("hit_rate:Q", title="hit rate", scale=alt.Scale(scheme="viridis", domain=[0, 1])),
        tooltip=["layer:O", "budget_pct:O", alt.Tooltip("hit_rate:Q", format=".3f")],
    ).properties(width=520, height=200, title="Per-layer hit rate (SLRU, native)")


__all__ = [
    "bytes_per_token_vs_budget",
    "hit_rate_vs_budget",
    "hit_rate_vs_budget_by_share",
    "join_quality",
    "low_mass_vs_gain",
    "main_quality_rows",
    "per_layer_heatmap",
    "precision_label",
    "quality_precision",
    "quality_vs_speed",
    "tokens_per_s_vs_budget",
    "with_native_baseline",
]
