"""`python -m analysis.report`: regenerate docs/decision.md and docs/figures/* from saved results.

Inputs (nothing else): `results/sweeps/NAME.csv` with its `NAME.json` provenance and
`NAME.per_layer.csv` (written by `python -m analysis.sweep`), `results/quality*.json` when present
(written by `python -m jaxmoe.quality`), and the hardware profiles in `sim/profiles/`. Every number
in the document is computed here from those files; where quality results are absent the document
says so in a "pending" section. The document's text is the template analysis/templates/decision.md.j2
(its multi-fact sentences are macros in sentences.md.j2); this module computes what it shows. Tables
are built by pure functions of the frames (`precision_table`, `signal_table`, `policy_table`,
`gpu_table`, `slru_share_table`, `quality_*_table`), the sentences' figures by `answer_facts`,
`slru_probation_facts`, `slru_share_facts` and `_trace_facts`; charts come from `analysis.charts` and
are saved as PNG through vl-convert.

Every section but one reads `Inputs.sweeps`: the engine's configurations, i.e. SLRU at its default
protected share (`engine_rows`). The `slru-share` panel's other shares feed only the "SLRU's
protected share" subsection (`slru_share_table`, `slru_share_facts`), from `Inputs.all_sweeps`.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from analysis import charts
from analysis.sweep import DEFAULT_PROTECTED_SHARE, PER_LAYER_COLUMNS, SHARED_POLICY, SWEEP_COLUMNS, VRAM
from analysis.verdict import setting_sentence
from sim.formats import FORMATS
from sim.io import InputError, atomic_path, exit_on_input_error
from sim.precision import parse_precision
from sim.profiles import GIB, PROFILE_DIR, get_model

SWEEP_DIR = Path("results/sweeps")
PRIMARY_SETTING = ("qwen3-30b-a3b Q4_K_M", 12, "gen4x16")  # the engine this project answers for: a 12 GB card
MAP_DIR = Path("results/sweeps/map")  # python -m analysis.mapsweep: the decision map (analysis.decision)
QUALITY48_GLOB = "results/quality-48*.json"  # the 48-layer model's quality (python -m jaxmoe.scale)
OFFLOAD_GLOB = "results/offload/*.json"  # measured executor runs (python -m jaxmoe.offload)
MAP_FIG = "decision-map"
QUALITY_GLOB = "results/quality.json"
DOC = Path("docs/decision.md")
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "decision.md.j2"  # the document's text; this module computes its values, tables and figures
SENTENCES = "sentences.md.j2"  # its sentences made of several computed facts (macros)
FIG_DIR = Path("docs/figures")
REPRO = "python -m analysis.report"
POLICY = "slru"  # the engine's cache policy: the headline tables use it
TIGHT = "30%"  # the second budget of the headline tables (a GPU with less VRAM for experts)
Q2, Q3 = "static:mass:30%:q2_k", "static:mass:30%:q3_k"
DYN = "dynamic:0.6:0.9:q2_k"
QUALITY_COLUMNS = ("ppl", "kld", "top1")
SHARE_FIG = "slru-protected-share"  # the figure shown in the protected-share subsection, not under Figures
SHARE_GAP = 0.005  # hit-rate difference below which two protected shares count as equal in the text


@dataclass
class Inputs:
    """Everything the report reads, already parsed."""

    sweeps: pd.DataFrame  # SWEEP_COLUMNS, all traces; SLRU only at its default protected share
    provenance: dict[str, dict]  # trace name → NAME.json
    layers: pd.DataFrame  # trace, config_id, layer, hit_rate
    quality: pd.DataFrame | None  # one row per quality record (None: no quality file)
    quality_meta: list[dict] = field(default_factory=list)  # one provenance summary per quality file
    profiles: dict[str, dict] = field(default_factory=dict)  # gpu name → profile JSON
    all_sweeps: pd.DataFrame | None = None  # every row, SLRU at every protected share (None: `sweeps`)

    @property
    def every_row(self) -> pd.DataFrame:
        """All sweep rows, whatever SLRU's protected share."""
        return self.sweeps if self.all_sweeps is None else self.all_sweeps


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def load_sweeps(sweep_dir: str | Path) -> tuple[pd.DataFrame, dict[str, dict], pd.DataFrame]:
    """Read every NAME.csv (+ NAME.json, NAME.per_layer.csv) of a folder; bad files → InputError."""
    sweep_dir = Path(sweep_dir)
    frames, provs, layer_frames = [], {}, []
    for path in sorted(sweep_dir.glob("*.csv")):
        if path.name.endswith(".per_layer.csv"):
            continue
        try:
            f = pd.read_csv(path, keep_default_na=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise InputError(path, f"not a readable CSV ({exc})") from None
        if "protected_share" not in f.columns and "policy" in f.columns:  # written before the column existed
            f["protected_share"] = [DEFAULT_PROTECTED_SHARE if p == SHARED_POLICY else math.nan for p in f["policy"]]
        missing = [c for c in SWEEP_COLUMNS if c not in f.columns]
        if missing:
            raise InputError(path, f"missing column(s) {', '.join(missing)} (write it with python -m analysis.sweep)")
        name = path.stem
        f["trace"] = name
        frames.append(f[list(SWEEP_COLUMNS)])
        meta = path.with_suffix(".json")
        if meta.exists():
            try:
                provs[name] = json.loads(meta.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(meta, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        else:
            provs[name] = {}
        lp = sweep_dir / f"{name}.per_layer.csv"
        if lp.exists():
            lf = pd.read_csv(lp)
            if list(lf.columns) != list(PER_LAYER_COLUMNS):
                raise InputError(lp, f"columns must be {', '.join(PER_LAYER_COLUMNS)}")
            layer_frames.append(lf.assign(trace=name))
    if not frames:
        raise InputError(sweep_dir, "no sweep CSVs (run python -m analysis.sweep TRACE --name NAME first)")
    layers = pd.concat(layer_frames, ignore_index=True) if layer_frames else \
        pd.DataFrame(columns=["config_id", "layer", "hit_rate", "trace"])
    return pd.concat(frames, ignore_index=True), provs, layers


def _quality_rows(doc, path: Path) -> tuple[list[dict], dict]:
    """The records of one quality JSON and a summary of its provenance."""
    if isinstance(doc, list):
        rows, meta = doc, {}
    elif isinstance(doc, dict):
        key = next((k for k in ("rows", "records", "results") if isinstance(doc.get(k), list)), None)
        if key is None:
            raise InputError(path, "expected a list of records or an object with a 'rows' list (jaxmoe.quality)")
        rows, meta = doc[key], doc
    else:
        raise InputError(path, "expected a JSON list or object")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(path, f"record {i} is not an object")
        missing = [k for k in ("kld",) if k not in r]
        if missing or not any(k in r for k in ("precision", "policy", "signal", "t1")):
            raise InputError(path, f"record {i} lacks {'kld' if missing else 'precision/policy'}")
        out.append({**r, "source_file": path.name})
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    cfg = model.get("config") if isinstance(model.get("config"), dict) else {}
    ev = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
    setup = meta.get("setup") if isinstance(meta.get("setup"), dict) else {}
    summary = {
        "file": path.name, "command": meta.get("command"), "model_file": model.get("file"),
        "model_name": model.get("name"), "n_layers": cfg.get("n_layers"), "n_experts": cfg.get("n_experts"),
        "top_k": cfg.get("top_k"), "eval_file": ev.get("file"), "eval_tokens": ev.get("tokens"),
        "n_ctx": setup.get("n_ctx"), "n_chunks": setup.get("n_chunks"), "backend": meta.get("backend"),
        "scored_tokens": max((int(r["n_tokens"]) for r in rows if isinstance(r, dict)
                              and isinstance(r.get("n_tokens"), (int, float))), default=None),
    }
    return out, summary


def quality_kind(row: dict) -> str:
    """`main` (re-quantized from Q4_K, scored against Q4_K), `compound` (low copies quantized from float)
    or `float` (rows about the float model)."""
    src, ref, fmt = row.get("source"), row.get("reference"), row.get("format")
    if isinstance(ref, str) and ref.lower() == "float":
        return "float"
    if isinstance(src, str) and src.lower() == "float":
        return "compound"
    if row.get("precision") == "native" and isinstance(fmt, str) and fmt.lower() not in ("q4_k", "q4_k_m"):
        return "float"
    return "main"


def load_quality(paths: list[str | Path]) -> tuple[pd.DataFrame | None, list[dict]]:
    """Read quality JSON files (jaxmoe.quality) into one frame (None when there are none) and their provenance."""
    rows: list[dict] = []
    metas: list[dict] = []
    for p in sorted(map(Path, paths)):
        try:
            doc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(p, f"not valid JSON ({exc})") from None
        r, m = _quality_rows(doc, p)
        rows.extend(r)
        metas.append(m)
    if not rows:
        return None, metas
    q = pd.DataFrame(rows)
    q["precision"] = [charts.quality_precision(r) for r in q.to_dict("records")]
    q["kind"] = [quality_kind(r) for r in q.to_dict("records")]
    for c in ("fraction", "t1", "t2", "kld", "ppl", "ppl_ratio", "top1", "dp", "low_mass", "skipped_mass"):
        if c in q.columns:
            q[c] = pd.to_numeric(q[c], errors="coerce")
    return q, metas


def load_profiles(names) -> dict[str, dict]:
    """The raw JSON of each named hardware profile in sim/profiles (missing ones are skipped)."""
    out = {}
    for n in sorted(set(names)):
        p = PROFILE_DIR / f"{n}.json"
        if p.exists():
            out[n] = json.loads(p.read_text())
    return out


def engine_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the engine's configurations: every other cache policy, SLRU at its default protected share."""
    if "protected_share" not in frame.columns:
        return frame
    share = frame["protected_share"]
    keep = (frame["policy"] != SHARED_POLICY) | share.isna() | ((share - DEFAULT_PROTECTED_SHARE).abs() < 1e-9)
    return frame[keep].reset_index(drop=True)


def load_inputs(sweep_dir: str | Path = SWEEP_DIR, quality_glob: str = QUALITY_GLOB) -> Inputs:
    """Load sweeps, quality files and the hardware profiles they name (plus h200)."""
    sweeps, provs, layers = load_sweeps(sweep_dir)
    quality, qmeta = load_quality(sorted(glob.glob(quality_glob)))
    return Inputs(engine_rows(sweeps), provs, layers, quality, qmeta,
                  load_profiles(list(sweeps["gpu"].unique()) + ["h200"]), all_sweeps=sweeps)


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------

def _isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def f_rate(x) -> str:
    """A hit rate with 3 decimals."""
    return "–" if _isnan(x) else f"{x:.3f}"


def f_pct(x, signed: bool = False, digits: int = 1) -> str:
    """A share as a percentage (0.123 → '12.3 %')."""
    if _isnan(x):
        return "–"
    return f"{x * 100:+.{digits}f} %" if signed else f"{x * 100:.{digits}f} %"


def f_num(x, digits: int = 1) -> str:
    """A plain number with `digits` decimals."""
    return "–" if _isnan(x) else f"{x:.{digits}f}"


def f_mb(nbytes) -> str:
    """Bytes as MB (1e6) with 1 decimal."""
    return "–" if _isnan(nbytes) else f"{nbytes / 1e6:.1f}"


def f_gib(nbytes) -> str:
    """Bytes as GiB with 2 decimals."""
    return "–" if _isnan(nbytes) else f"{nbytes / GIB:.2f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of a frame of strings (left-aligned text, right-aligned numbers)."""
    cols = list(frame.columns)

    def numeric(c):
        vals = [v for v in frame[c] if v not in ("–", "")]
        return bool(vals) and all(_looks_numeric(v) for v in vals)
    align = ["---:" if numeric(c) else "---" for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def _looks_numeric(v) -> bool:
    s = str(v).replace("%", "").replace("+", "").replace("−", "-").replace(",", "").strip()
    try:
        float(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------
# Tables (pure functions of the sweep frame)
# ------------------------------------------------------------------------------------------------

def primary_gpu(frame: pd.DataFrame, prov: dict) -> str:
    """The sweep's primary GPU: the first of its --gpu list, else the most frequent one."""
    gpus = prov.get("gpus") or []
    if gpus and gpus[0] in set(frame["gpu"]):
        return gpus[0]
    return frame["gpu"].value_counts().index[0]


def _budget_order(budget: str) -> float:
    """Sort key of a budget label: "10%" … "90%", then the VRAM-derived one."""
    return 1000.0 if budget == VRAM else float(budget[:-1])


def _budget_name(budget: str, frac: float) -> str:
    return f"12 GB VRAM ({frac * 100:.1f} %)" if budget == VRAM else f"{budget} of experts"


def _is_key_precision(spec: str) -> bool:
    p = parse_precision(spec)
    return (not p.is_static and not p.is_dynamic) or p.is_dynamic or (p.static_signal == "mass" and p.static_fraction == 0.3)


def _rank(spec: str) -> tuple:
    return charts._precision_rank(spec)


def precision_table(frame: pd.DataFrame, gpu: str, policy: str = POLICY, budgets=(VRAM, TIGHT)) -> pd.DataFrame:
    """The headline precision policies at the VRAM-derived and the tight budget, one row each."""
    f = charts.with_native_baseline(frame)
    f = f[(f["gpu"] == gpu) & (f["policy"] == policy) & f["budget"].isin(budgets)]
    f = f[[_is_key_precision(p) for p in f["precision"]]]
    f = f.assign(_b=f["budget"].map({b: i for i, b in enumerate(budgets)}), _r=f["precision"].map(_rank))
    f = f.sort_values(["_b", "_r"])
    return pd.DataFrame({
        "budget": [_budget_name(b, c) for b, c in zip(f["budget"], f["capacity_fraction"])],
        "precision": f["precision"].map(lambda s: f"`{s}`"),
        "hit rate": f["hit_rate"].map(f_rate),
        "MB/token": f["bytes_per_token"].map(f_mb),
        "tok/s": f["tokens_per_s"].map(f_num),
        "Δ tok/s": f["speedup"].map(lambda x: f_pct(x, signed=True)),
        "stall": f["stall_fraction"].map(f_pct),
        "low-prec. mass": f["low_precision_mass"].map(f_pct),
        "skipped mass": f["skipped_mass"].map(f_pct),
    })


def signal_table(frame: pd.DataFrame, gpu: str, policy: str = POLICY, budget: str = VRAM) -> pd.DataFrame:
    """Static policies only: Δ tok/s and low-precision mass per (signal, share) for Q2_K and Q3_K."""
    f = charts.with_native_baseline(frame)
    f = f[(f["gpu"] == gpu) & (f["policy"] == policy) & (f["budget"] == budget)]
    f = f[f["static_signal"].notna() & f["t1"].isna()]
    if f.empty:
        return pd.DataFrame()
    rows = []
    order = {s: i for i, s in enumerate(("mass", "freq", "weight", "random"))}
    keys = sorted({(s, fr) for s, fr in zip(f["static_signal"], f["static_fraction"])},
                  key=lambda k: (order.get(k[0], 9), k[0], k[1]))
    for sig, frac in keys:
        row = {"signal": sig, "share demoted": f_pct(frac, digits=0)}
        for fmt in ("q2_k", "q3_k"):
            r = f[(f["static_signal"] == sig) & (f["static_fraction"] == frac) & (f["static_format"] == fmt)]
            r = r.iloc[0] if len(r) else None
            up = fmt.upper()
            row[f"Δ tok/s {up}"] = "–" if r is None else f_pct(r["speedup"], signed=True)
            row[f"hit rate {up}"] = "–" if r is None else f_rate(r["hit_rate"])
            row[f"low-prec. mass {up}"] = "–" if r is None else f_pct(r["low_precision_mass"])
        rows.append(row)
    return pd.DataFrame(rows)


def policy_table(frame: pd.DataFrame, gpu: str) -> pd.DataFrame:
    """Cache policies × (native, mass 30 % Q2_K/Q3_K): hit rate at each budget they share, tok/s at VRAM."""
    f = frame[(frame["gpu"] == gpu) & frame["precision"].isin(["native", Q2, Q3])]
    pols = [p for p in ("belady", "slru", "lru", "s3fifo") if p in set(f["policy"])] + \
        sorted(set(f["policy"]) - {"belady", "slru", "lru", "s3fifo"})
    shared = set.intersection(*(set(f[f["policy"] == p]["budget"]) for p in pols)) if pols else set()
    budgets = sorted(shared, key=_budget_order)
    if not budgets:
        return pd.DataFrame()
    rows = []
    for pol in pols:
        for prec in ("native", Q2, Q3):
            sub = f[(f["policy"] == pol) & (f["precision"] == prec)]
            if sub.empty:
                continue
            row = {"cache policy": pol, "precision": f"`{prec}`"}
            for b in budgets:
                r = sub[sub["budget"] == b]
                label = "12 GB" if b == VRAM else b
                row[f"hit rate @{label}"] = f_rate(r["hit_rate"].iloc[0]) if len(r) else "–"
            r = sub[sub["budget"] == budgets[-1]]
            row[f"tok/s @{'12 GB' if budgets[-1] == VRAM else budgets[-1]}"] = \
                f_num(r["tokens_per_s"].iloc[0]) if len(r) else "–"
            rows.append(row)
    return pd.DataFrame(rows)


def gpu_table(frame: pd.DataFrame, policy: str = POLICY) -> pd.DataFrame:
    """Per GPU profile at its VRAM-derived budget (or 50 % where the model fits): the key precisions."""
    f = charts.with_native_baseline(frame)
    f = f[(f["policy"] == policy) & f["precision"].isin(["native", Q2, Q3, DYN])]
    rows = []
    for gpu in sorted(set(f["gpu"])):
        g = f[f["gpu"] == gpu]
        budget = VRAM if VRAM in set(g["budget"]) else "50%"
        g = g[g["budget"] == budget].sort_values("precision", key=lambda s: s.map(_rank))
        for r in g.itertuples(index=False):
            rows.append({"GPU": gpu, "budget": _budget_name(budget, r.capacity_fraction),
                         "budget GiB": f_gib(r.capacity_bytes), "precision": f"`{r.precision}`",
                         "hit rate": f_rate(r.hit_rate), "tok/s": f_num(r.tokens_per_s),
                         "Δ tok/s": f_pct(r.speedup, signed=True), "stall": f_pct(r.stall_fraction)})
    return pd.DataFrame(rows)


def headline_sims(inp: Inputs) -> dict[str, pd.DataFrame]:
    """Per trace: its primary GPU's SLRU rows at the 12 GB budget, with the native baseline columns."""
    out = {}
    for t in sorted(set(inp.sweeps["trace"])):
        f = inp.sweeps[inp.sweeps["trace"] == t]
        gpu = primary_gpu(f, inp.provenance.get(t, {}))
        out[t] = charts.with_native_baseline(f[(f["gpu"] == gpu) & (f["policy"] == POLICY) & (f["budget"] == VRAM)])
    return out


def f_ci(x, ci, digits: int = 4, pct: bool = False) -> str:
    """A value with its bootstrap interval: `0.0421 [0.0390, 0.0450]` (or percentages)."""
    fmt = (lambda v: f_pct(v, digits=1)) if pct else (lambda v: f_num(v, digits))
    if _isnan(x):
        return "–"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and not any(_isnan(v) for v in ci):
        return f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]"
    return fmt(x)


def _sim_delta(sims: dict[str, pd.DataFrame], precision: str) -> dict[str, str]:
    out = {}
    for name, sim in sims.items():
        m = sim[sim["precision"] == precision]
        out[f"Δ tok/s {name}"] = f_pct(m["speedup"].iloc[0], signed=True) if len(m) else "–"
    return out


def _main(q: pd.DataFrame) -> pd.DataFrame:
    return q[q["kind"] == "main"] if "kind" in q.columns else q


def quality_share_table(q: pd.DataFrame, sims: dict[str, pd.DataFrame], signal: str = "mass") -> pd.DataFrame:
    """One signal's static rows by (format, share): KLD with CI, same-top-1, PPL ratio, and simulated Δ tok/s."""
    m = _main(q)
    m = m[(m.get("signal") == signal) & m["t1"].isna()] if "signal" in m.columns else m.iloc[:0]
    rows = []
    for r in m.sort_values(["format", "fraction"], ascending=[False, True]).to_dict("records"):
        rows.append({"format": str(r["format"]).upper(), "share demoted": f_pct(r["fraction"], digits=0),
                     "KLD [95 % CI]": f_ci(r["kld"], r.get("kld_ci")),
                     "same top-1": f_ci(r.get("top1"), r.get("top1_ci"), pct=True),
                     "PPL ratio": f_num(r.get("ppl_ratio", math.nan), 4),
                     "low-prec. mass (model)": f_pct(r.get("low_mass", math.nan)),
                     **_sim_delta(sims, r["precision"])})
    return pd.DataFrame(rows)


def quality_signal_table(q: pd.DataFrame, fractions) -> pd.DataFrame:
    """KLD and same-top-1 per (signal, share) at the simulated shares, Q3_K beside Q2_K."""
    m = _main(q)
    if "signal" not in m.columns:
        return pd.DataFrame()
    m = m[m["signal"].notna() & m["t1"].isna()]
    rows = []
    order = {s: i for i, s in enumerate(("mass", "freq", "weight", "random"))}
    for sig in sorted(set(m["signal"]), key=lambda x: order.get(x, 9)):
        for frac in sorted(set(fractions)):
            row = {"signal": sig, "share demoted": f_pct(frac, digits=0)}
            hit = False
            for fmt in ("q3_k", "q2_k"):
                r = m[(m["signal"] == sig) & (m["format"] == fmt) & ((m["fraction"] - frac).abs() < 1e-9)]
                hit |= len(r) > 0
                row[f"KLD {fmt.upper()}"] = f_num(r["kld"].iloc[0], 4) if len(r) else "–"
                row[f"same top-1 {fmt.upper()}"] = f_pct(r["top1"].iloc[0]) if len(r) and "top1" in r else "–"
            if hit:
                rows.append(row)
    return pd.DataFrame(rows)


def quality_dynamic_table(q: pd.DataFrame, sims: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """HOBBIT dynamic rows by (T1, T2): KLD, same-top-1, low/skipped gate mass, simulated Δ tok/s."""
    m = _main(q)
    m = m[m["t1"].notna() & (m["signal"].isna() if "signal" in m.columns else True)]
    rows = []
    for r in m.sort_values(["t1", "t2"]).to_dict("records"):
        rows.append({"T1": f"{r['t1']:g}", "T2": f"{r['t2']:g}", "format": str(r.get("format", "")).upper(),
                     "KLD [95 % CI]": f_ci(r["kld"], r.get("kld_ci")),
                     "same top-1": f_pct(r.get("top1", math.nan)),
                     "low-prec. mass (model)": f_pct(r.get("low_mass", math.nan)),
                     "skipped mass (model)": f_pct(r.get("skipped_mass", math.nan)),
                     **_sim_delta(sims, r["precision"])})
    return pd.DataFrame(rows)


def compounding_table(q: pd.DataFrame) -> pd.DataFrame:
    """Low copies quantized from float vs re-quantized from Q4_K, same demoted experts: KLD side by side."""
    if "kind" not in q.columns:
        return pd.DataFrame()
    comp, main = q[q["kind"] == "compound"], _main(q)
    rows = []
    for r in comp.sort_values(["format", "fraction"], ascending=[False, True]).to_dict("records"):
        m = main[main["precision"] == r["precision"]]
        k4 = m["kld"].iloc[0] if len(m) else math.nan
        rows.append({"precision": f"`{r['precision']}`", "KLD, low copy from float": f_num(r["kld"], 4),
                     "KLD, low copy re-quantized from Q4_K": f_num(k4, 4),
                     "ratio (Q4_K-sourced / float-sourced)": f_num(k4 / r["kld"], 2) if r["kld"] and not _isnan(k4) else "–"})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# SLRU's protected share (the slru-share panel)
# ------------------------------------------------------------------------------------------------

def share_rows(inp: Inputs, precision: str = "native") -> pd.DataFrame:
    """Per trace, its primary GPU's SLRU rows of one precision at every protected share it was swept with
    (only traces with more than one share), sorted by trace, budget and share."""
    out = []
    every = inp.every_row
    if "protected_share" not in every.columns:
        return every.iloc[:0]
    for t in sorted(set(every["trace"])):
        f = every[every["trace"] == t]
        gpu = primary_gpu(f, inp.provenance.get(t, {}))
        f = f[(f["gpu"] == gpu) & (f["policy"] == SHARED_POLICY) & (f["precision"] == precision)]
        f = f[f["protected_share"].notna()]
        if f["protected_share"].nunique() > 1:
            out.append(f)
    if not out:
        return every.iloc[:0]
    f = pd.concat(out, ignore_index=True)
    f = f.assign(_b=[_budget_order(b) for b in f["budget"]])
    return f.sort_values(["trace", "_b", "protected_share"]).drop(columns="_b").reset_index(drop=True)


def _share_name(x: float) -> str:
    if abs(x - DEFAULT_PROTECTED_SHARE) < 1e-9:
        return f"{x:g} (default)"
    return f"{x:g} (= LRU)" if x == 0 else f"{x:g}"


def _best_shares(sub: pd.DataFrame) -> list[float]:
    """The shares whose hit rate (at 3 decimals) is the highest of `sub` (one trace and budget)."""
    top = sub["hit_rate"].round(3).max()
    return sorted(sub[sub["hit_rate"].round(3) == top]["protected_share"])


def slru_share_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Hit rate and tok/s per (trace, budget) for each protected share, and the best share(s) by hit rate."""
    if rows.empty:
        return pd.DataFrame()
    shares = sorted(set(rows["protected_share"]))
    out = []
    for (t, b), sub in rows.groupby(["trace", "budget"], sort=False):
        by = sub.set_index("protected_share")
        frac = sub["capacity_fraction"].iloc[0]
        row = {"trace": t, "budget": f"12 GB ({f_pct(frac)})" if b == VRAM else b}
        for x in shares:
            row[f"hit rate @{x:g}"] = f_rate(by.loc[x, "hit_rate"]) if x in by.index else "–"
        for x in shares:
            row[f"tok/s @{x:g}"] = f_num(by.loc[x, "tokens_per_s"]) if x in by.index else "–"
        best = _best_shares(sub)
        row["best share"] = "all equal" if len(best) == len(sub) else ", ".join(f"{x:g}" for x in best)
        out.append(row)
    return pd.DataFrame(out)


def _share_point(sub: pd.DataFrame, x: float) -> dict:
    """Hit rate and tok/s of share x in `sub` (one trace and budget, indexed by share)."""
    r = sub.loc[x]
    return {"hit_rate": r["hit_rate"], "tokens_per_s": r["tokens_per_s"]}


def _best_point(sub: pd.DataFrame) -> dict:
    """The best share(s) of one trace and budget (`sub` indexed by share): best = the highest hit rate at 3
    decimals, as in the table; `share` is the best one with the most tok/s, `point` its figures."""
    best = _best_shares(sub.reset_index())
    bx = max(best, key=lambda x: (sub.loc[x, "tokens_per_s"], x))
    return {"best": best, "share": bx, "point": _share_point(sub, bx)}


def slru_share_facts(inp: Inputs, gap: float = SHARE_GAP) -> tuple[list[dict], dict | None]:
    """What the share bullets say, per trace: where the default share trails the best one by more than `gap`
    and what it loses at the worst such budget, the best share at the smallest and the 12 GB budget, what the
    default does to the Q2_K gain there; then each share's worst shortfall over every trace and budget."""
    nat = share_rows(inp)
    if nat.empty:
        return [], None
    low = share_rows(inp, Q2)
    d = DEFAULT_PROTECTED_SHARE
    out = []
    shortfall: dict[float, tuple[float, str, str]] = {}
    for t in sorted(set(nat["trace"])):
        f = nat[nat["trace"] == t]
        budgets = sorted(dict.fromkeys(f["budget"]), key=_budget_order)
        subs = {b: f[f["budget"] == b].set_index("protected_share") for b in budgets}
        for b, sub in subs.items():
            top = sub["hit_rate"].max()
            for x, h in sub["hit_rate"].items():
                if top - h > shortfall.get(x, (-1.0, "", ""))[0]:
                    shortfall[x] = (top - h, t, b)
        if any(d not in sub.index for sub in subs.values()):
            continue
        loss = {b: sub["hit_rate"].max() - sub.loc[d, "hit_rate"] for b, sub in subs.items()}
        trailing = [b for b in budgets if loss[b] > gap]
        facts = {"trace": t, "default": d, "gap": gap, "trailing": trailing, "also": []}
        worst = None
        if trailing:
            worst = max(trailing, key=lambda b: loss[b])
            sub = subs[worst]
            best = _best_point(sub)
            bx = best["share"]
            r, rd = sub.loc[bx], sub.loc[d]
            facts.update(worst=worst, best=best, at_default=_share_point(sub, d), hit_change=-loss[worst],
                         tok_change=rd["tokens_per_s"] / r["tokens_per_s"] - 1, low_bit=None)
            lo = low[(low["trace"] == t) & (low["budget"] == worst)].set_index("protected_share")
            if d in lo.index and bx in lo.index:
                g_d = lo.loc[d, "tokens_per_s"] / rd["tokens_per_s"] - 1
                g_b = lo.loc[bx, "tokens_per_s"] / r["tokens_per_s"] - 1
                verdict = "inflates" if g_d > g_b + gap else "shrinks" if g_d < g_b - gap else "same"
                facts["low_bit"] = {"precision": Q2, "gain_default": g_d, "gain_best": g_b, "verdict": verdict}
        for b in dict.fromkeys((budgets[0], VRAM)):
            if b not in subs or (trailing and b == worst):
                continue
            sub = subs[b]
            best = _best_shares(sub.reset_index())
            kind = "all" if len(best) == len(sub) else "default" if best == [d] else "best"
            facts["also"].append({"budget": b, "vram": b == VRAM, "kind": kind, "hit_rate": sub["hit_rate"].iloc[0],
                                  "at_default": _share_point(sub, d), "best": _best_point(sub)})
        out.append(facts)
    worst_case = None
    if len(shortfall) > 1:
        pick = min(shortfall, key=lambda x: (round(shortfall[x][0], 6), -x))
        worst_case = {"pick": pick, "shares": [{"name": _share_name(x), "shortfall": v[0], "trace": v[1], "budget": v[2]}
                                               for x, v in sorted(shortfall.items())]}
    return out, worst_case


def slru_share_bullets(inp: Inputs, gap: float = SHARE_GAP) -> list[str]:
    """The share bullets as text (the template's `share_bullet` / `shortfall_bullet`)."""
    bullets, worst = slru_share_facts(inp, gap)
    mod = _template(SENTENCES).module
    return [mod.share_bullet(b) for b in bullets] + ([mod.shortfall_bullet(worst)] if worst else [])


# ------------------------------------------------------------------------------------------------
# The answer bullets
# ------------------------------------------------------------------------------------------------

def _one(frame: pd.DataFrame, **eq) -> pd.Series | None:
    f = frame
    for k, v in eq.items():
        f = f[f[k] == v]
    return f.iloc[0] if len(f) else None


def slru_probation_facts(inp: Inputs, trace: str, gap: float = 0.05) -> dict | None:
    """Where SLRU (native) hits `gap` or more below LRU at some budget of `trace` (the worst such budget and
    what its probationary segment holds there), else None."""
    share = DEFAULT_PROTECTED_SHARE
    f = inp.sweeps[inp.sweeps["trace"] == trace]
    gpu = primary_gpu(f, inp.provenance.get(trace, {}))
    f = f[(f["gpu"] == gpu) & (f["precision"] == "native")]
    s_ = f[f["policy"] == "slru"].set_index("budget")
    l_ = f[f["policy"] == "lru"].set_index("budget")
    both = [b for b in s_.index if b in l_.index and s_.loc[b, "hit_rate"] < l_.loc[b, "hit_rate"] - gap]
    if not both:
        return None
    worst = max(both, key=lambda b: l_.loc[b, "hit_rate"] - s_.loc[b, "hit_rate"])
    r = s_.loc[worst]
    p = inp.provenance.get(trace, {})
    return {"share": share, "worst": worst, "hit_rate": r["hit_rate"], "lru_hit_rate": l_.loc[worst, "hit_rate"],
            "affected": sorted(both), "probation_experts": (1 - share) * r["capacity_experts"],
            "working": (p.get("n_layers") or 0) * (p.get("top_k") or 0)}


def slru_probation_note(inp: Inputs, trace: str, gap: float = 0.05) -> str | None:
    """The caveat sentence of `slru_probation_facts` (the template's `probation_note`), or None."""
    facts = slru_probation_facts(inp, trace, gap)
    return None if facts is None else _template(SENTENCES).module.probation_note(facts)


def answer_facts(inp: Inputs) -> dict:
    """The measured numbers of the answer bullets (nothing that was not measured): per trace its primary
    GPU's SLRU rows, native and the headline low-bit policies, and the headline quality rows."""
    base = charts.with_native_baseline(inp.sweeps)
    per = {}
    for t in sorted(set(base["trace"])):
        gpu = primary_gpu(base[base["trace"] == t], inp.provenance.get(t, {}))
        per[t] = (gpu, base[(base["trace"] == t) & (base["gpu"] == gpu) & (base["policy"] == POLICY)])
    first_gpu, first = next(iter(per.values()))
    out = {"first_gpu": first_gpu, "first": _one(first, budget=VRAM, precision="native"),
           "baseline": [(t, n) for t, (_, f) in per.items() if (n := _one(f, budget=VRAM, precision="native")) is not None],
           "low_bit": [], "dynamic": [], "quality": None}
    for budget in (VRAM, TIGHT):
        rows = [(t, _one(f, budget=budget, precision=Q2), _one(f, budget=budget, precision=Q3)) for t, (_, f) in per.items()]
        out["low_bit"].append({"budget": budget, "vram": budget == VRAM,
                               "rows": [r for r in rows if r[1] is not None or r[2] is not None]})
    out["dynamic"] = [(t, d) for t, (_, f) in per.items() if (d := _one(f, budget=VRAM, precision=DYN)) is not None]
    if inp.quality is not None:
        q = _main(inp.quality)
        rows = []
        for prec in (Q3, Q2, DYN):
            r = _one(q, precision=prec)
            if r is not None and not _isnan(r.get("kld")):
                top1 = r["top1"] if "top1" in r and not _isnan(r["top1"]) else None
                rows.append((prec, {"kld": r["kld"], "kld_ci": r.get("kld_ci"), "top1": top1}))
        out["quality"] = {"files": [m["file"] for m in inp.quality_meta], "rows": rows}
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def _curves(frame: pd.DataFrame, group: str) -> pd.DataFrame:
    """Rows whose (group, precision) has at least 2 fraction budgets, plus their VRAM-derived point."""
    f = frame
    counts = f[f["budget_kind"] == "fraction"].groupby([group, "precision"])["budget"].nunique()
    keep = {k for k, v in counts.items() if v >= 2}
    return f[[(g, p) in keep for g, p in zip(f[group], f["precision"])]]


def caption(kind: str, **facts) -> str:
    """A figure's caption (the template's `caption` macro)."""
    return _template(SENTENCES).module.caption(kind, facts)


def figures(inp: Inputs) -> list[tuple[str, object, str]]:
    """(file stem, chart, caption) for every figure of the document."""
    out = []
    for t in sorted(set(inp.sweeps["trace"])):
        f = inp.sweeps[inp.sweeps["trace"] == t]
        gpu = primary_gpu(f, inp.provenance.get(t, {}))
        fp = f[f["gpu"] == gpu]
        hr = _curves(fp, "policy")
        if not hr.empty:
            out.append((f"{t}-hit-rate", charts.hit_rate_vs_budget(hr), caption("hit-rate", trace=t, gpu=gpu)))
        ts = _curves(f[f["policy"] == POLICY], "gpu")
        if not ts.empty:
            out.append((f"{t}-tokens-per-s", charts.tokens_per_s_vs_budget(ts),
                        caption("tokens-per-s", trace=t, policy=POLICY)))
        bt = _curves(fp[fp["policy"].isin([POLICY, "lru"])], "policy")
        if not bt.empty:
            out.append((f"{t}-bytes-per-token", charts.bytes_per_token_vs_budget(bt),
                        caption("bytes-per-token", trace=t, gpu=gpu)))
        g = charts.with_native_baseline(fp[(fp["policy"] == POLICY) & fp["budget"].isin([VRAM, TIGHT])])
        g = g.assign(budget_name=[_budget_name(b, c) for b, c in zip(g["budget"], g["capacity_fraction"])])
        if (g["precision"] != "native").any() and g["speedup"].notna().any():
            out.append((f"{t}-gain-vs-mass", charts.low_mass_vs_gain(g),
                        caption("gain-vs-mass", trace=t, gpu=gpu, policy=POLICY)))
        lay = inp.layers[inp.layers["trace"] == t]
        nat = fp[(fp["policy"] == POLICY) & (fp["precision"] == "native") & (fp["budget_kind"] == "fraction")]
        if not lay.empty and not nat.empty:
            hm = lay.merge(nat[["config_id", "capacity_fraction"]], on="config_id")
            hm = hm.assign(budget_pct=(hm["capacity_fraction"] * 100).round().astype(int))
            if not hm.empty:
                out.append((f"{t}-per-layer", charts.per_layer_heatmap(hm), caption("per-layer", trace=t, gpu=gpu)))
    sr = share_rows(inp)
    if not sr.empty:
        sr = sr.assign(share_label=[_share_name(x) for x in sr["protected_share"]])
        out.append((SHARE_FIG, charts.hit_rate_vs_budget_by_share(sr),
                    caption(SHARE_FIG, gpus=list(dict(zip(sr["trace"], sr["gpu"])).items()))))
    if inp.quality is not None:
        joined = [charts.join_quality(sim, inp.quality) for sim in headline_sims(inp).values()]
        j = pd.concat(joined, ignore_index=True) if joined else pd.DataFrame()
        if not j.empty and j["kld"].notna().any():
            out.append(("quality-vs-speed", charts.quality_vs_speed(j), caption("quality-vs-speed")))
    return out


# ------------------------------------------------------------------------------------------------
# The document
# ------------------------------------------------------------------------------------------------

def _trace_rows(inp: Inputs) -> pd.DataFrame:
    rows = []
    for t in sorted(set(inp.sweeps["trace"])):
        p = inp.provenance.get(t, {})
        f = inp.every_row[inp.every_row["trace"] == t]
        counted = int(f["tokens"].iloc[0]) if len(f) else 0
        rows.append({
            "trace": t,
            "model (meta)": p.get("model", "–"),
            "provenance (meta)": str(p.get("provenance", "–")).replace("|", "/"),
            "steps prefill / decode": f"{p.get('prefill_steps', '–')} / {p.get('decode_steps', '–')}",
            "sequences": p.get("n_seqs", "–"),
            "top-k": p.get("top_k", "–"),
            "decode tokens counted": counted,
            "configs": len(f),
        })
    return pd.DataFrame(rows)


def _profile_rows(inp: Inputs) -> pd.DataFrame:
    rows = []
    for name, doc in inp.profiles.items():
        tr = doc.get("transfer", {})
        rows.append({
            "profile": name,
            "GPU": doc.get("gpu", "–"),
            "VRAM GiB": f_gib(doc.get("vram_bytes", math.nan)),
            "PCIe GB/s": f_num(tr.get("gbps", math.nan)),
            "fixed µs/copy": f_num(tr.get("fixed_s", math.nan) * 1e6, 0),
            "source (profile JSON)": str(doc.get("source", "–")).replace("|", "/"),
        })
    return pd.DataFrame(rows)


def _format_rows() -> pd.DataFrame:
    model = get_model("qwen3-30b-a3b:q4_k_m")
    q4 = model.expert_bytes(0, "q4_k")
    mean_native = model.total_expert_bytes() / (model.n_layers * model.n_experts)
    rows = [{"format": "Q4_K_M (native, mean over layers)", "bits/weight": f"{8 * mean_native / model.expert_weights:.4g}",
             "bytes/expert": f"{mean_native:,.0f}", "× Q4_K": f"{mean_native / q4:.3f}"}]
    for fmt in ("q4_k", "q3_k", "q2_k"):
        b = model.expert_bytes(0, fmt)
        rows.append({"format": fmt.upper(), "bits/weight": f"{FORMATS[fmt].bits_per_weight:.4g}",
                     "bytes/expert": f"{b:,}", "× Q4_K": f"{b / q4:.3f}"})
    return pd.DataFrame(rows)


@functools.cache
def _template(name: str = TEMPLATE) -> jinja2.Template:
    """A template of analysis/templates (the document, or its sentence macros) with the formatting filters."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             autoescape=False, extensions=["jinja2.ext.do"])  # markdown, not HTML
    env.filters.update(rate=f_rate, pct=f_pct, num=f_num, mb=f_mb, gib=f_gib, ci=f_ci, table=markdown_table,
                       fmt=lambda x, spec: format(x, spec))
    return env.get_template(name)


def _trace_facts(inp: Inputs, t: str, model_top_k: int) -> dict:
    """One trace's tables and caveat figures for the document."""
    p = inp.provenance.get(t, {})
    f = inp.sweeps[inp.sweeps["trace"] == t]
    gpu = primary_gpu(f, p)
    pol = policy_table(f, gpu)
    gpus = gpu_table(f)
    b = _one(f, gpu=gpu, policy="belady", budget=VRAM, precision="native")
    s_ = _one(f, gpu=gpu, policy=POLICY, budget=VRAM, precision="native")
    belady = None
    if b is not None and s_ is not None:
        avoidable = None if b.hit_rate - s_.hit_rate < 0.005 else (b.hit_rate - s_.hit_rate) / (1 - s_.hit_rate)
        belady = {"hit_rate": b.hit_rate, "policy_hit_rate": s_.hit_rate, "miss": 1 - b.hit_rate, "avoidable": avoidable}
    recorded = p.get("gpu_sources", {})
    return {
        "name": t, "prov": p, "gpu": gpu, "sha": str(p.get("trace_sha256", "?"))[:16],
        "precision_table": precision_table(f, gpu), "signal_table": signal_table(f, gpu),
        "policy_table": pol if not pol.empty and pol["cache policy"].nunique() > 1 else None,
        "gpu_table": gpus if not gpus.empty and gpus["GPU"].nunique() > 1 else None,
        "synthetic": str(p.get("provenance", "")).startswith("synthetic"),
        "engine_top_k": p.get("top_k") if p.get("top_k") and p.get("top_k") != model_top_k else None,
        "tokens": int(f["tokens"].iloc[0]),
        "belady": belady, "probation": slru_probation_facts(inp, t),
        "stale": [g for g, src in recorded.items() if g in inp.profiles and inp.profiles[g].get("source") != src],
    }


def _quality_facts(inp: Inputs) -> dict | None:
    """Provenance lines and tables of the quality section (None: no quality files)."""
    if inp.quality is None:
        return None
    meta = [{**m, "model": m.get("model_name") or m.get("model_file")} for m in inp.quality_meta]
    sims = headline_sims(inp)
    fractions = sorted(set(inp.sweeps["static_fraction"].dropna()))
    return {"meta": meta, "tables": [("share", quality_share_table(inp.quality, sims)),
                                     ("signal", quality_signal_table(inp.quality, fractions)),
                                     ("dynamic", quality_dynamic_table(inp.quality, sims)),
                                     ("compounding", compounding_table(inp.quality))]}


def _share_facts(inp: Inputs) -> dict | None:
    """The "SLRU's protected share" subsection (None when no sweep has the slru-share panel)."""
    rows = share_rows(inp)
    tab = slru_share_table(rows)
    if tab.empty:
        return None
    traces = sorted(set(rows["trace"]))
    bullets, worst = slru_share_facts(inp)
    return {"default": DEFAULT_PROTECTED_SHARE, "lru": _lru_check(inp, rows), "bullets": bullets, "worst": worst,
            "traces": traces, "policy": SHARED_POLICY, "table": tab,
            "commands": [inp.provenance[t]["command"] for t in traces if inp.provenance.get(t, {}).get("command")]}


def decision_facts(dec: dict | None, offload: list[dict] | None = None) -> dict | None:
    """The Decision section's values and tables (analysis.decision), or None without map sweeps."""
    from analysis import decision as D

    if dec is None or dec.get("verdict") is None:
        return None
    v, speed, vin = dec["verdict"], dec["speed"], dec["verdict_input"]
    provs = dec["provs"]
    wall = sum(float(p.get("wall_s", 0)) for p in provs)
    traces = {}
    for p in provs:
        traces.update(p.get("traces", {}))
    pressure = {}
    for p in provs:
        pressure.update({k: v_ for k, v_ in p.get("pressure", {}).items() if k.startswith("base:")})
    fits = sorted({f for p in provs for f in p.get("fits", []) if f.startswith("base:")})
    n_units = sorted({int(x) for x in speed.loc[speed["panel"] == "map", "n_units"]}) if not speed.empty else []
    real = speed[speed["panel"] == "real"] if not speed.empty else speed
    q = dec["quality"]
    qf = dec["quality_facts"]
    pairs = [(D.DYN if hasattr(D, "DYN") else "dynamic:0.6:0.9:q2_k", "dynamic:0.6:0.9:q2_k:serve"),
             ("static:mass:50%:q3_k", "static:mass:50%:q2_k"), ("static:mass:25%:q2_k", "static:mass:50%:q2_k")]
    diffs = D.paired_policy_diffs(dec["rows"], dec["units"], pairs)
    if not diffs.empty:
        diffs = diffs[(diffs["PCIe"] == "gen4x16")]
    gpu_runs = [r for r in offload or [] if r["platform"] != "cpu"]  # CPU rows are pipeline checks (validation.md)
    measured = D.measured_table(gpu_runs)
    return {
        "rule": v.rule, "rule_text": v.rule.describe(), "text": v.text,
        "primary": setting_sentence(vin, *PRIMARY_SETTING, v.rule),
        "quality_fails": sorted(set(v.rows.loc[v.rows["status"].str.contains("quality_fails"), "precision"])),
        "kld_max": float(v.rows["kld_hi"].max()) if v.rows["kld_hi"].notna().any() else None,
        "mass_gap": _mass_gap(vin, "static:mass:50%:q2_k"),
        "curve_used": _curve_used(vin),
        "coupled_used": _curve_used(vin, "coupled "),
        "n_settings": len(v.settings), "n_recommended": int(v.settings["recommended"].sum()),
        "map_table": D.map_table(v), "setting_table": D.setting_table(vin, 12, "gen4x16", v.rule),
        "sensitivity_table": D.sensitivity_table(v), "n_flips": len(v.flips), "link_flips": D.link_flips(v),
        "hobbit_table": D.panel_table(speed, "hobbit"), "t1t2_table": D.panel_table(speed, "t1t2"),
        "real_table": D.panel_table(speed, "real"), "real_units": int(real["n_units"].max()) if len(real) else 0,
        "diff_table": diffs, "quality_pairs": D.quality_pairs_table(qf) if qf else None,
        "quality": None if q is None else qf, "n_units": n_units, "min_units": dec["min_units"],
        "commands": [p.get("command", "") for p in provs], "wall_s": wall, "traces": traces,
        "pressure": pressure, "fits": fits, "measured": measured, "offload_files": sorted({r["file"] for r in offload or []}),
        "offload_platforms": sorted({r["platform"] for r in offload or []}),
        "validation": D.validation_summary(gpu_runs),
    }


def _curve_used(vin: pd.DataFrame, prefix: str = "static-gm-") -> list[dict]:
    """Which policies took their KLD from a quality-vs-gate-mass curve point (or, prefix "coupled ", a
    cache-coupled row), and in how many settings."""
    if "quality_row" not in vin:
        return []
    c = vin[vin["quality_row"].str.startswith(prefix, na=False) & (vin["scenario"] == "base")]
    g = c.groupby(["precision", "quality_row"]).size().reset_index(name="n")
    return [{"precision": r.precision, "row": r.quality_row, "n": int(r.n)} for r in g.itertuples()]


def _mass_gap(vin: pd.DataFrame, spec: str) -> dict | None:
    """Low-precision gate mass of one policy: in the quality run vs the range over the base replays."""
    r = vin[(vin["precision"] == spec) & (vin["scenario"] == "base")] if "quality_low_mass" in vin else vin.iloc[:0]
    if r.empty or not np.isfinite(r["quality_low_mass"]).any():
        return None
    return {"quality": float(r["quality_low_mass"].iloc[0]), "lo": float(r["low_precision_mass"].min()),
            "hi": float(r["low_precision_mass"].max())}


def render(inp: Inputs, figs: list[tuple[str, object, str]], fig_rel: str = "figures", dec: dict | None = None) -> str:
    """The whole decision document as markdown (pure: inputs → text through the template)."""
    model_top_k = get_model("qwen3-30b-a3b:q4_k_m").top_k
    fracs = sorted({p.get("calib_fraction") for p in inp.provenance.values() if p.get("calib_fraction") is not None})
    text = _template().render(
        repro=REPRO, policy=POLICY, share_fig=SHARE_FIG, map_fig=MAP_FIG, fig_rel=fig_rel, model_top_k=model_top_k,
        answer=answer_facts(inp),
        calib=" / ".join(f_pct(x, digits=0) for x in fracs) if fracs else "part",
        format_table=_format_rows(), trace_table=_trace_rows(inp), profile_table=_profile_rows(inp),
        traces=[_trace_facts(inp, t, model_top_k) for t in sorted(set(inp.sweeps["trace"]))],
        figures=[{"stem": stem, "caption": caption} for stem, _, caption in figs],
        quality=_quality_facts(inp), share=_share_facts(inp), decision=dec)
    return text.rstrip("\n") + "\n"  # one newline at the end, however the last section ends


def _lru_check(inp: Inputs, rows: pd.DataFrame) -> dict | None:
    """Whether the share-0 rows equal the LRU rows of the same budgets (or how far apart they are)."""
    z = rows[rows["protected_share"] == 0.0]
    lru = inp.sweeps[(inp.sweeps["policy"] == "lru") & (inp.sweeps["precision"] == "native")]
    m = z.merge(lru, on=["trace", "gpu", "budget"], suffixes=("", "_lru"))
    if m.empty:
        return None
    diff = (m["hit_rate"] - m["hit_rate_lru"]).abs().max()
    return {"rows": len(m), "equal": bool(diff == 0 and (m["tokens_per_s"] == m["tokens_per_s_lru"]).all()),
            "diff": diff}


def save_png(chart, path: Path, scale: float = 1.5) -> None:
    """Render an Altair chart to PNG through vl-convert, atomically."""
    import vl_convert as vlc

    png = vlc.vegalite_to_png(chart.to_json(), scale=scale)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
        tmp.chmod(0o644)


def generate(sweep_dir=SWEEP_DIR, quality_glob=QUALITY_GLOB, doc=DOC, fig_dir=FIG_DIR, *,
             png: bool = True, map_dir=None, quality48_glob=QUALITY48_GLOB,
             offload_glob=OFFLOAD_GLOB) -> tuple[str, list[Path]]:
    """Load the results, write the figures and the document; returns (markdown, figure paths).

    `map_dir`: the map sweeps of the Decision section (the CLI passes results/sweeps/map); None: no
    decision section data (the section says so)."""
    from analysis import decision as D

    inp = load_inputs(sweep_dir, quality_glob)
    figs = figures(inp)
    dec = D.decision(map_dir, quality48_glob) if map_dir is not None else None
    facts = decision_facts(dec, D.load_offload(offload_glob)) if dec is not None else None
    doc, fig_dir = Path(doc), Path(fig_dir)
    rel = _relpath(fig_dir, doc.parent)
    paths = []
    if facts is not None:
        figs = [(MAP_FIG, D.map_chart(dec["verdict_input"], dec["verdict"]),
                 ("The decision map: for each setting (model and native format; VRAM; PCIe link) the best policy's "
                 "lower 95 % bound of Δ tok/s against native, ✓ where the rule recommends a policy, blank where the "
                 "VRAM holds every expert (source: "
                 f"`{map_dir}/*.csv`; interactive version with every policy and interval: "
                 f"[{MAP_FIG}.html]({rel}/{MAP_FIG}.html))"))] + figs
        if png:
            D.write_html(D.interactive_chart(dec["verdict_input"]), fig_dir / f"{MAP_FIG}.html")
            paths.append(fig_dir / f"{MAP_FIG}.html")
    if png:
        for stem, chart, _ in figs:
            p = fig_dir / f"{stem}.png"
            save_png(chart, p)
            paths.append(p)
    md = render(inp, figs, rel, facts)
    if facts is not None and EARLIER_MARK in md:
        # The decision document holds only figures with intervals; the earlier single-trace results
        # (no intervals) go to a companion page beside it, linked from where they stood.
        head, tail = md.split(EARLIER_MARK, 1)
        earlier = doc.parent / EARLIER_DOC
        with atomic_path(earlier) as tmp:
            tmp.write_text(f"# Earlier single-trace results (superseded by [the decision document]({doc.name}))\n\n"
                           + md.split("\n", 1)[0].replace("# ", "_Companion of: ", 1) + "_\n" + tail)
            tmp.chmod(0o644)
        paths.append(earlier)
        md = head + (f"## Earlier single-trace results\n\nThe project's earlier results (one trace each, fixed budget "
                     f"shares, **no intervals**: budget curves, the signal comparison, the SLRU protected-share study) "
                     f"are on a page of their own, [{EARLIER_DOC}]({EARLIER_DOC}), regenerated by the same command. The "
                     f"decision above supersedes them.\n")
    with atomic_path(doc) as tmp:
        tmp.write_text(md)
        tmp.chmod(0o644)
    return md, paths


EARLIER_MARK = "## Earlier single-trace results\n"
EARLIER_DOC = "earlier-results.md"


def _relpath(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


EPILOG = f"""examples:
  {REPRO}
  {REPRO} --sweeps /tmp/sweeps --doc /tmp/decision.md --figures /tmp/figures
  {REPRO} --no-png            # the document only (figures keep their old files)
"""


def build_parser() -> argparse.ArgumentParser:
    """The analysis.report argument parser."""
    ap = argparse.ArgumentParser(prog="python -m analysis.report",
                                 description="Regenerate docs/decision.md and docs/figures/* from results/.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", default=str(SWEEP_DIR), help="folder of sweep CSVs (default: %(default)s)")
    ap.add_argument("--quality", default=QUALITY_GLOB, help="glob of quality JSON files (default: %(default)s)")
    ap.add_argument("--doc", default=str(DOC), help="output markdown (default: %(default)s)")
    ap.add_argument("--figures", default=str(FIG_DIR), help="output folder for PNGs (default: %(default)s)")
    ap.add_argument("--no-png", action="store_true", help="skip rendering PNGs (and the HTML map)")
    ap.add_argument("--map", default=str(MAP_DIR), help="folder of map sweeps (python -m analysis.mapsweep; "
                    "default: %(default)s)")
    ap.add_argument("--quality48", default=QUALITY48_GLOB, help="glob of the 48-layer model's quality file "
                    "(default: %(default)s)")
    ap.add_argument("--offload", default=OFFLOAD_GLOB, help="glob of measured executor results "
                    "(default: %(default)s)")
    return ap


@exit_on_input_error
def main(argv: list[str] | None = None) -> str:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    md, paths = generate(args.sweeps, args.quality, args.doc, args.figures, png=not args.no_png, map_dir=args.map,
                         quality48_glob=args.quality48, offload_glob=args.offload)
    pages = [q for q in paths if q.suffix == ".md"]
    extra = "".join(f", {q}" for q in pages)
    print(f"wrote {args.doc}{extra} and {len(paths) - len(pages)} figure(s) in {args.figures}", file=sys.stderr)
    return md


if __name__ == "__main__":
    main()
