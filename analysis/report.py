"""`python -m analysis.report`: regenerate docs/decision.md and docs/figures/* from saved results.

Inputs (nothing else): `results/sweeps/NAME.csv` with its `NAME.json` provenance and
`NAME.per_layer.csv` (written by `python -m analysis.sweep`), `results/quality*.json` when present
(written by `python -m jaxmoe.quality`), and the hardware profiles in `sim/profiles/`. Every number
in the document is computed here from those files; where quality results are absent the document
says so in a "pending" section. Tables are built by pure functions of the frames (`precision_table`,
`signal_table`, `policy_table`, `gpu_table`, `slru_share_table`, `quality_*_table`); charts come from
`analysis.charts` and are saved as PNG through vl-convert.

Every section but one reads `Inputs.sweeps`: the engine's configurations, i.e. SLRU at its default
protected share (`engine_rows`). The `slru-share` panel's other shares feed only the "SLRU's
protected share" subsection (`slru_share_table`, `slru_share_bullets`), from `Inputs.all_sweeps`.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import charts
from analysis.sweep import DEFAULT_PROTECTED_SHARE, PER_LAYER_COLUMNS, SHARED_POLICY, SWEEP_COLUMNS, VRAM
from sim.formats import FORMATS
from sim.io import InputError, atomic_path, exit_on_input_error
from sim.precision import parse_precision
from sim.profiles import GIB, PROFILE_DIR, get_model

SWEEP_DIR = Path("results/sweeps")
QUALITY_GLOB = "results/quality*.json"
DOC = Path("docs/decision.md")
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


def _share_point(sub: pd.DataFrame, x: float) -> str:
    r = sub.loc[x]
    return f"{f_rate(r['hit_rate'])} ({f_num(r['tokens_per_s'])} tok/s)"


def _best_phrase(sub: pd.DataFrame) -> tuple[float, str]:
    """(a best share, "share 0.5 hits 0.534 (35.2 tok/s)" or "shares 0, 0.2 hit 0.990 (up to 73.4 tok/s)") for
    one trace and budget (`sub` indexed by share); best = the highest hit rate at 3 decimals, as in the table."""
    best = _best_shares(sub.reset_index())
    bx = max(best, key=lambda x: (sub.loc[x, "tokens_per_s"], x))
    if len(best) == 1:
        return bx, f"share {bx:g} hits {_share_point(sub, bx)}"
    return bx, (f"shares {', '.join(f'{x:g}' for x in best)} hit {f_rate(sub.loc[bx, 'hit_rate'])} "
                f"(up to {f_num(sub.loc[bx, 'tokens_per_s'])} tok/s)")


def slru_share_bullets(inp: Inputs, gap: float = SHARE_GAP) -> list[str]:
    """Sentences computed from the share rows: per trace, where the default share trails the best one by more
    than `gap` and what it loses at the worst such budget, the best share at the smallest and the 12 GB budget,
    what the default does to the Q2_K gain there; then each share's worst shortfall over every trace and budget."""
    nat = share_rows(inp)
    if nat.empty:
        return []
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
        parts = []
        if trailing:
            worst = max(trailing, key=lambda b: loss[b])
            sub = subs[worst]
            bx, phrase = _best_phrase(sub)
            r, rd = sub.loc[bx], sub.loc[d]
            parts.append(f"the default share {d:g} trails the best share by more than {gap:g} of hit rate at "
                         f"{', '.join(trailing)} (within {gap:g} at every other budget); most at {worst}, where "
                         f"{phrase} and the default {_share_point(sub, d)}: "
                         f"{-loss[worst]:+.3f} hit rate, {f_pct(rd['tokens_per_s'] / r['tokens_per_s'] - 1, signed=True)} "
                         "decode tokens/s")
            lo = low[(low["trace"] == t) & (low["budget"] == worst)].set_index("protected_share")
            if d in lo.index and bx in lo.index:
                g_d = lo.loc[d, "tokens_per_s"] / rd["tokens_per_s"] - 1
                g_b = lo.loc[bx, "tokens_per_s"] / r["tokens_per_s"] - 1
                verdict = ("the default share inflates the low-bit gain there" if g_d > g_b + gap else
                           "the default share shrinks the low-bit gain there" if g_d < g_b - gap else
                           "about the same low-bit gain")
                parts.append(f"at {worst} `{Q2}` gains {f_pct(g_d, signed=True)} tok/s over native under the default "
                             f"share and {f_pct(g_b, signed=True)} under share {bx:g} ({verdict})")
        else:
            parts.append(f"the default share {d:g} is within {gap:g} of the best share's hit rate at every budget")
        for b in dict.fromkeys((budgets[0], VRAM)):
            if b not in subs or (trailing and b == worst):
                continue
            sub = subs[b]
            where = "the 12 GB budget" if b == VRAM else f"the smallest budget ({b})"
            best = _best_shares(sub.reset_index())
            if len(best) == len(sub):
                parts.append(f"at {where} every share hits {f_rate(sub['hit_rate'].iloc[0])}")
            elif best == [d]:
                parts.append(f"at {where} the default is the best share, {_share_point(sub, d)}")
            else:
                parts.append(f"at {where} {_best_phrase(sub)[1]}, the default {_share_point(sub, d)}")
        out.append(f"`{t}`: " + "; ".join(parts) + ".")
    if len(shortfall) > 1:
        pick = min(shortfall, key=lambda x: (round(shortfall[x][0], 6), -x))
        each = "; ".join(f"share {_share_name(x)}: {v[0]:.3f} ({v[1]}, {v[2]})" for x, v in sorted(shortfall.items()))
        out.append(f"Worst hit-rate shortfall against the best share over every trace and budget above: {each}. "
                   f"The smallest worst case is share {pick:g}'s.")
    return out


# ------------------------------------------------------------------------------------------------
# The answer bullets
# ------------------------------------------------------------------------------------------------

def _one(frame: pd.DataFrame, **eq) -> pd.Series | None:
    f = frame
    for k, v in eq.items():
        f = f[f[k] == v]
    return f.iloc[0] if len(f) else None


def slru_probation_note(inp: Inputs, trace: str, gap: float = 0.05) -> str | None:
    """A sentence when SLRU (native) hits `gap` or more below LRU at some budget of `trace`, else None."""
    import inspect

    from sim.cache.slru import SLRU

    share = inspect.signature(SLRU.__init__).parameters["protected_share"].default
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
    working = (p.get("n_layers") or 0) * (p.get("top_k") or 0)
    ws = f" — one decode token touches {working} experts" if working else ""
    return (f"SLRU with its default protected share ({share:g}) hits {f_rate(r['hit_rate'])} at the {worst} budget "
            f"where LRU hits {f_rate(l_.loc[worst, 'hit_rate'])} (budgets affected: {', '.join(sorted(both))}). Its "
            f"probationary segment there holds about {(1 - share) * r['capacity_experts']:.0f} Q4_K_M experts{ws}, "
            "so new experts are evicted before their reuse can promote them. Smaller low-bit copies relieve this, "
            "which inflates the low-bit speed-ups at those budgets; compare with the LRU rows.")


def answer_bullets(inp: Inputs) -> list[str]:
    """3–5 bullets of measured numbers answering the question (nothing that was not measured)."""
    base = charts.with_native_baseline(inp.sweeps)
    traces = sorted(set(base["trace"]))
    out = []
    per = {}
    for t in traces:
        gpu = primary_gpu(base[base["trace"] == t], inp.provenance.get(t, {}))
        per[t] = (gpu, base[(base["trace"] == t) & (base["gpu"] == gpu) & (base["policy"] == POLICY)])

    parts = []
    for t, (gpu, f) in per.items():
        n = _one(f, budget=VRAM, precision="native")
        if n is not None:
            parts.append(f"**{t}**: hit rate {f_rate(n.hit_rate)}, {f_num(n.tokens_per_s)} tok/s, "
                         f"{f_mb(n.bytes_per_token)} MB/token over PCIe")
    if parts:
        gpu0, f0 = next(iter(per.values()))
        n0 = _one(f0, budget=VRAM, precision="native")
        cap = "" if n0 is None else (f" ({f_gib(n0.capacity_bytes)} GiB ≈ {n0.capacity_experts:.0f} Q4_K_M experts, "
                                     f"{f_pct(n0.capacity_fraction)} of all)")
        out.append(f"Baseline, all experts Q4_K_M, SLRU at the 12 GB budget{cap}, {gpu0} profile: " + "; ".join(parts) + ".")

    for budget, where in ((VRAM, "at the 12 GB budget"), (TIGHT, f"at a tight {TIGHT} budget")):
        parts = []
        for t, (gpu, f) in per.items():
            q2, q3 = _one(f, budget=budget, precision=Q2), _one(f, budget=budget, precision=Q3)
            if q2 is None and q3 is None:
                continue
            bits = []
            if q2 is not None:
                bits.append(f"Q2_K {f_pct(q2.speedup, signed=True)} tok/s ({f_pct(q2.low_precision_mass)} of gate mass at 2 bits)")
            if q3 is not None:
                bits.append(f"Q3_K {f_pct(q3.speedup, signed=True)} ({f_pct(q3.low_precision_mass)} at 3 bits)")
            parts.append(f"**{t}** " + ", ".join(bits))
        if parts:
            out.append(f"Holding the bottom 30 % of each layer's experts (by gate mass) at low precision, {where}: "
                       + "; ".join(parts) + ".")

    parts = []
    for t, (gpu, f) in per.items():
        d = _one(f, budget=VRAM, precision=DYN)
        if d is not None:
            parts.append(f"**{t}** {f_pct(d.speedup, signed=True)} tok/s, {f_pct(d.low_precision_mass)} of gate "
                         f"mass at Q2_K and {f_pct(d.skipped_mass)} skipped")
    if parts:
        out.append("HOBBIT's dynamic rule (T1 = 0.6, T2 = 0.9, misses loaded at Q2_K) at the 12 GB budget: "
                   + "; ".join(parts) + ". (A Q2_K copy loaded for a low-ranked use cannot serve a later "
                   "high-ranked use of the same expert, which loads it again at Q4_K.)")

    if inp.quality is None:
        out.append("**Quality: pending.** No `results/quality*.json` exists yet, so the cost in KLD / perplexity "
                   "of these policies is not measured; the speed side alone does not decide the question.")
    else:
        q = _main(inp.quality)
        bits = []
        for prec in (Q3, Q2, DYN):
            r = _one(q, precision=prec)
            if r is not None and not _isnan(r.get("kld")):
                extra = f", same top-1 {f_pct(r['top1'])}" if "top1" in r and not _isnan(r["top1"]) else ""
                bits.append(f"`{prec}` KLD {f_ci(r['kld'], r.get('kld_ci'))}{extra}")
        files = ", ".join(f"`{m['file']}`" for m in inp.quality_meta)
        if bits:
            out.append(f"Quality cost, measured on the project's small Qwen3-MoE model against its own Q4_K model "
                       f"({files}): " + "; ".join(bits) + ".")
        else:
            out.append(f"Quality files exist ({files}) but none has the headline policies; see the quality section.")
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


def figures(inp: Inputs) -> list[tuple[str, object, str]]:
    """(file stem, chart, caption) for every figure of the document."""
    out = []
    for t in sorted(set(inp.sweeps["trace"])):
        f = inp.sweeps[inp.sweeps["trace"] == t]
        gpu = primary_gpu(f, inp.provenance.get(t, {}))
        fp = f[f["gpu"] == gpu]
        hr = _curves(fp, "policy")
        if not hr.empty:
            out.append((f"{t}-hit-rate", charts.hit_rate_vs_budget(hr),
                        (f"Decode hit rate vs expert budget per cache policy ({t}, {gpu}; rows of "
                         f"results/sweeps/{t}.csv with gpu={gpu}, fraction and VRAM budgets).")))
        ts = _curves(f[f["policy"] == POLICY], "gpu")
        if not ts.empty:
            out.append((f"{t}-tokens-per-s", charts.tokens_per_s_vs_budget(ts),
                        f"Simulated decode tokens/s vs budget per GPU profile ({t}, {POLICY})."))
        bt = _curves(fp[fp["policy"].isin([POLICY, "lru"])], "policy")
        if not bt.empty:
            out.append((f"{t}-bytes-per-token", charts.bytes_per_token_vs_budget(bt),
                        f"PCIe bytes per decoded token vs budget ({t}, {gpu})."))
        g = charts.with_native_baseline(fp[(fp["policy"] == POLICY) & fp["budget"].isin([VRAM, TIGHT])])
        g = g.assign(budget_name=[_budget_name(b, c) for b, c in zip(g["budget"], g["capacity_fraction"])])
        if (g["precision"] != "native").any() and g["speedup"].notna().any():
            out.append((f"{t}-gain-vs-mass", charts.low_mass_vs_gain(g),
                        (f"Tokens/s gain over native vs gate mass served below Q4_K, every static/dynamic "
                         f"policy ({t}, {gpu}, {POLICY}; panels: budgets).")))
        lay = inp.layers[inp.layers["trace"] == t]
        nat = fp[(fp["policy"] == POLICY) & (fp["precision"] == "native") & (fp["budget_kind"] == "fraction")]
        if not lay.empty and not nat.empty:
            hm = lay.merge(nat[["config_id", "capacity_fraction"]], on="config_id")
            hm = hm.assign(budget_pct=(hm["capacity_fraction"] * 100).round().astype(int))
            if not hm.empty:
                out.append((f"{t}-per-layer", charts.per_layer_heatmap(hm),
                            f"Per-layer decode hit rate, SLRU, native ({t}, {gpu}; results/sweeps/{t}.per_layer.csv)."))
    sr = share_rows(inp)
    if not sr.empty:
        sr = sr.assign(share_label=[_share_name(x) for x in sr["protected_share"]])
        gpus = ", ".join(f"{t}: {g}" for t, g in dict(zip(sr["trace"], sr["gpu"])).items())
        out.append((SHARE_FIG, charts.hit_rate_vs_budget_by_share(sr),
                    (f"SLRU decode hit rate vs expert budget per protected share, native precision ({gpus}; "
                     "rows of the slru-share panel in results/sweeps/TRACE.csv).")))
    if inp.quality is not None:
        joined = [charts.join_quality(sim, inp.quality) for sim in headline_sims(inp).values()]
        j = pd.concat(joined, ignore_index=True) if joined else pd.DataFrame()
        if not j.empty and j["kld"].notna().any():
            out.append(("quality-vs-speed", charts.quality_vs_speed(j),
                        ("Δ decode tokens/s (simulator, 12 GB budget, SLRU) against KLD to the Q4_K baseline "
                         "(jaxmoe.quality), joined on the precision policy.")))
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


def render(inp: Inputs, figs: list[tuple[str, object, str]], fig_rel: str = "figures") -> str:
    """The whole decision document as markdown (pure: inputs → text)."""
    traces = sorted(set(inp.sweeps["trace"]))
    L: list[str] = []
    add = L.append
    add("# Should cold Qwen3-30B-A3B experts live at Q2_K or Q3_K on a 12 GB GPU?")
    add("")
    add(f"_Generated by `{REPRO}` from `results/sweeps/*.csv` (+ `.json`, `.per_layer.csv`), "
        f"`results/quality*.json` and `sim/profiles/*.json`. Do not edit by hand: every number below is "
        f"computed from those files, and rerunning the command regenerates this page and `docs/figures/`._")
    add("")
    add("## The question")
    add("")
    add("Qwen3-30B-A3B (GGUF Q4_K_M) runs on a 12 GB GPU with an SLRU cache of experts in VRAM; missing experts "
        "stream from host RAM over PCIe. Should cold / low-importance experts be stored (and moved) at Q2_K or "
        "Q3_K, re-quantized from Q4_K — more of them fit, fewer bytes move — and what does it cost in quality?")
    add("")
    add("## The answer")
    add("")
    for b in answer_bullets(inp):
        add(f"- {b}")
    add("")
    add("Speed numbers are simulated decode tokens/s on the named GPU profile; Δ is relative to all-Q4_K_M "
        "with the same cache policy and budget.")
    add("")
    add("## Method")
    add("")
    fracs = sorted({p.get("calib_fraction") for p in inp.provenance.values() if p.get("calib_fraction") is not None})
    calib = " / ".join(f_pct(x, digits=0) for x in fracs) if fracs else "part"
    add("**Simulator** (`sim/`, [docs/simulator.md](simulator.md)): each trace is replayed through a precision "
        "policy (which format each expert access uses), a byte-capacity cache policy and a simpy timeline of the "
        f"PCIe copy engine and the compute stream. The first {calib} of each trace (its calibration window) learns the "
        "static rankings and warms the cache; only the decode tokens after it are counted. Budgets are shares of "
        "all expert bytes at Q4_K_M, plus the VRAM-derived 12 GB budget (VRAM − dense weights − output head − KV "
        "cache at 4 k tokens − runtime reserve).")
    add("")
    add("Expert sizes (Qwen3-30B-A3B expert: 3 × 2048 × 768 weights; from `sim.formats` / `sim.profiles`):")
    add("")
    add(markdown_table(_format_rows()))
    add("")
    add("**Traces** (provenance from each sweep's `results/sweeps/NAME.json`):")
    add("")
    add(markdown_table(_trace_rows(inp)))
    add("")
    for t in traces:
        p = inp.provenance.get(t, {})
        if p.get("command"):
            made = f"`{p['trace_command']}`, then " if p.get("trace_command") else ""
            add(f"- `{t}`: {made}`{p['command']}` (trace sha256 `{str(p.get('trace_sha256', '?'))[:16]}…`)")
    add("")
    add("**Hardware profiles** (`sim/profiles/*.json`). The RTX profiles are *datasheet-scaled estimates, not "
        "measurements*; the h200 profile's own `source` says what was measured on the project's H200 machine:")
    add("")
    add(markdown_table(_profile_rows(inp)))
    add("")

    add("## Results")
    add("")
    for t in traces:
        f = inp.sweeps[inp.sweeps["trace"] == t]
        gpu = primary_gpu(f, inp.provenance.get(t, {}))
        add(f"### Trace `{t}`")
        add("")
        tab = precision_table(f, gpu)
        if not tab.empty:
            add(f"**Key precision policies**, {POLICY}, {gpu} (source: `results/sweeps/{t}.csv`; "
                f"reproduce: `{REPRO}`):")
            add("")
            add(markdown_table(tab))
            add("")
        tab = signal_table(f, gpu)
        if not tab.empty:
            add(f"**Which experts to demote** — static policies at the 12 GB budget, {POLICY}, {gpu}; Δ tok/s vs "
                f"native, share of gate mass served at the low format:")
            add("")
            add(markdown_table(tab))
            add("")
        tab = policy_table(f, gpu)
        if not tab.empty and tab["cache policy"].nunique() > 1:
            add(f"**Cache policies** ({gpu}; belady is the offline optimum):")
            add("")
            add(markdown_table(tab))
            add("")
        tab = gpu_table(f)
        if not tab.empty and tab["GPU"].nunique() > 1:
            add(f"**GPU profiles** ({POLICY}):")
            add("")
            add(markdown_table(tab))
            add("")
    add("### Figures")
    add("")
    add(f"All figures are rebuilt by `{REPRO}` from the CSVs named in their captions.")
    add("")
    for stem, _, caption in figs:
        if stem != SHARE_FIG:  # that one is shown in its own subsection under Caveats
            _add_figure(add, fig_rel, stem, caption)

    add("## Quality")
    add("")
    if inp.quality is None:
        add("**Pending.** No quality results (`results/quality*.json`, written by `python -m jaxmoe.quality`) "
            "exist yet. No perplexity, KLD or top-1 agreement numbers are reported here until they do; rerun "
            f"`{REPRO}` afterwards to fill this section and the quality-vs-speed figure.")
    else:
        add("The project's small Qwen3-MoE-architecture model evaluated under each precision policy against its "
            "own Q4_K model (llama.cpp's perplexity/KLD method, bootstrap 95 % intervals over chunks); low-bit "
            "experts are re-quantized from the Q4_K weights. Δ tok/s is the simulated gain of the same policy at "
            f"the 12 GB budget ({POLICY}, each trace's primary GPU); `–` where that policy was not simulated.")
        add("")
        for m in inp.quality_meta:
            name = m.get("model_name") or m.get("model_file")
            facts = [f"model `{name}`"] if name else []
            if m.get("n_layers"):
                facts.append(f"{m['n_layers']} layers, {m.get('n_experts')} experts, top-{m.get('top_k')}")
            if m.get("scored_tokens"):
                facts.append(f"{m['scored_tokens']:,} scored tokens")
            if m.get("n_chunks"):
                facts.append(f"{m['n_chunks']} chunks of {m.get('n_ctx')}")
            cmd = f"; produced by `{m['command']}`" if m.get("command") else ""
            add(f"- `{m['file']}`: " + ", ".join(facts) + cmd)
        add("")
        sims = headline_sims(inp)
        fractions = sorted(set(inp.sweeps["static_fraction"].dropna()))
        for title, tab in (
            ("**Share and format** (signal `mass`):", quality_share_table(inp.quality, sims)),
            ("**Importance signal** (KLD, same top-1):", quality_signal_table(inp.quality, fractions)),
            ("**HOBBIT dynamic rule** (every access treated as a miss in the quality run):",
             quality_dynamic_table(inp.quality, sims)),
            (("**Compounding**: the same demoted experts with low copies quantized from the float weights "
              "instead of re-quantized from Q4_K:"), compounding_table(inp.quality)),
        ):
            if not tab.empty:
                add(title)
                add("")
                add(markdown_table(tab))
                add("")
    add("")
    add("## Caveats")
    add("")
    for t in traces:
        p = inp.provenance.get(t, {})
        prov = str(p.get("provenance", ""))
        if prov.startswith("synthetic"):
            add(f"- `{t}` is synthesized (`sim.synth`, a generative model calibrated to the real trace's statistics, "
                "[docs/synth.md](synth.md)): its hit rates are only as good as that model.")
        else:
            model_k = get_model("qwen3-30b-a3b:q4_k_m").top_k
            k_note = (f" (the recording engine used {p.get('top_k')} experts per token, Qwen3-30B-A3B's default is "
                      f"{model_k})") if p.get("top_k") and p.get("top_k") != model_k else ""
            add(f"- `{t}` is a real recording but small: {p.get('n_seqs', '?')} sequence(s), "
                f"{p.get('decode_steps', '?')} decode steps, top-{p.get('top_k', '?')} routing{k_note}; with the 25 % "
                "calibration window, static rankings learn on very few tokens and every percentage rests on "
                f"{int(inp.sweeps[inp.sweeps['trace'] == t]['tokens'].iloc[0])} counted decode tokens.")
    for t in traces:
        f = inp.sweeps[inp.sweeps["trace"] == t]
        gpu = primary_gpu(f, inp.provenance.get(t, {}))
        b = _one(f, gpu=gpu, policy="belady", budget=VRAM, precision="native")
        s_ = _one(f, gpu=gpu, policy=POLICY, budget=VRAM, precision="native")
        if b is not None and s_ is not None:
            head = (f"- `{t}` at the 12 GB budget: the offline optimum (belady) hits {f_rate(b.hit_rate)} against "
                    f"{POLICY}'s {f_rate(s_.hit_rate)}")
            if b.hit_rate - s_.hit_rate < 0.005:
                add(head + f"; the remaining {f_pct(1 - b.hit_rate)} of accesses miss under any replacement policy "
                    "(first uses in the counted window), so there the gain of low-bit experts comes from moving "
                    "fewer bytes per miss rather than from fitting more experts.")
            else:
                avoid = (b.hit_rate - s_.hit_rate) / (1 - s_.hit_rate)
                add(head + f": a better replacement policy could avoid at most {f_pct(avoid)} of {POLICY}'s misses; "
                    f"{f_pct(1 - b.hit_rate)} of accesses miss under any policy.")
    for t in traces:
        note = slru_probation_note(inp, t)
        if note:
            add(f"- `{t}`: {note}")
    for t in traces:
        recorded = inp.provenance.get(t, {}).get("gpu_sources", {})
        stale = [g for g, src in recorded.items() if g in inp.profiles and inp.profiles[g].get("source") != src]
        if stale:
            add(f"- **Stale:** `{t}` was simulated with an older version of the {', '.join(stale)} profile(s); "
                f"rerun its sweep (`{inp.provenance[t].get('command', 'python -m analysis.sweep')}`).")
    add("- The RTX 3060 / 4070 profiles are datasheet-scaled estimates (see their `source`); absolute tokens/s "
        "on those GPUs are not measured, the relative Δ between precision policies is the robust quantity.")
    add("- Quality (when present) is measured on the project's small Qwen3-MoE-architecture model, not on "
        "Qwen3-30B-A3B: it shows the direction and the ordering of policies; a 30B model's loss under 2–3-bit "
        "re-quantization may differ, and the small model likely understates it.")
    add("- Dynamic precision changes the access sequence online (skips, low copies), so `belady` is only run with "
        "native/static precision.")
    add("")
    share_section(inp, figs, fig_rel, add)
    return "\n".join(L)


def _add_figure(add, fig_rel: str, stem: str, caption: str) -> None:
    """A figure and its caption in decision.md."""
    add(f"![{caption}]({fig_rel}/{stem}.png)")
    add("")
    add(f"*{caption}*")
    add("")


def _lru_check(inp: Inputs, rows: pd.DataFrame) -> str:
    """`: here the share-0 rows equal the LRU rows` (or how far they are apart), from the data."""
    z = rows[rows["protected_share"] == 0.0]
    lru = inp.sweeps[(inp.sweeps["policy"] == "lru") & (inp.sweeps["precision"] == "native")]
    m = z.merge(lru, on=["trace", "gpu", "budget"], suffixes=("", "_lru"))
    if m.empty:
        return ""
    diff = (m["hit_rate"] - m["hit_rate_lru"]).abs().max()
    if diff == 0 and (m["tokens_per_s"] == m["tokens_per_s_lru"]).all():
        return f": its {len(m)} native rows here equal the LRU rows of the same budgets exactly"
    return f"; its native rows here differ from LRU's by up to {diff:.4f} of hit rate"


def share_section(inp: Inputs, figs: list[tuple[str, object, str]], fig_rel: str, add) -> None:
    """The "SLRU's protected share" subsection (nothing when no sweep has the slru-share panel)."""
    rows = share_rows(inp)
    tab = slru_share_table(rows)
    if tab.empty:
        return
    traces = sorted(set(rows["trace"]))
    add("### SLRU's protected share")
    add("")
    add(f"The SLRU small-budget collapse above depends on the protected segment's share of the cache (default "
        f"{DEFAULT_PROTECTED_SHARE:g}; 0 makes SLRU exactly LRU{_lru_check(inp, rows)}). The `slru-share` panel of "
        "each sweep reruns SLRU at several shares (`sim.cache.slru.SLRU(protected_share=…)`, `--protected-share` "
        "of `python -m sim.replay`) on the primary GPU; `–` where a share was not run. Best share: the highest "
        "hit rate at 3 decimals.")
    add("")
    for b in slru_share_bullets(inp):
        add(f"- {b}")
    add("")
    srcs = ", ".join(f"`results/sweeps/{t}.csv`" for t in traces)
    cmds = "; ".join(f"`{inp.provenance[t]['command']}`" for t in traces if inp.provenance.get(t, {}).get("command"))
    add(f"Decode hit rate and simulated tok/s by protected share, native precision, each trace's primary GPU "
        f"(source: {srcs}, rows with policy `{SHARED_POLICY}` by column `protected_share`; reproduce: "
        + (f"{cmds}, then " if cmds else "") + f"`{REPRO}`):")
    add("")
    add(markdown_table(tab))
    add("")
    for stem, _, caption in figs:
        if stem == SHARE_FIG:
            _add_figure(add, fig_rel, stem, caption)


def save_png(chart, path: Path, scale: float = 1.5) -> None:
    """Render an Altair chart to PNG through vl-convert, atomically."""
    import vl_convert as vlc

    png = vlc.vegalite_to_png(chart.to_json(), scale=scale)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
        tmp.chmod(0o644)


def generate(sweep_dir=SWEEP_DIR, quality_glob=QUALITY_GLOB, doc=DOC, fig_dir=FIG_DIR, *,
             png: bool = True) -> tuple[str, list[Path]]:
    """Load the results, write the figures and the document; returns (markdown, figure paths)."""
    inp = load_inputs(sweep_dir, quality_glob)
    figs = figures(inp)
    doc, fig_dir = Path(doc), Path(fig_dir)
    rel = _relpath(fig_dir, doc.parent)
    paths = []
    if png:
        for stem, chart, _ in figs:
            p = fig_dir / f"{stem}.png"
            save_png(chart, p)
            paths.append(p)
    md = render(inp, figs, rel)
    with atomic_path(doc) as tmp:
        tmp.write_text(md)
        tmp.chmod(0o644)
    return md, paths


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
    ap.add_argument("--no-png", action="store_true", help="skip rendering PNGs")
    return ap


@exit_on_input_error
def main(argv: list[str] | None = None) -> str:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    md, paths = generate(args.sweeps, args.quality, args.doc, args.figures, png=not args.no_png)
    print(f"wrote {args.doc} and {len(paths)} figure(s) in {args.figures}", file=sys.stderr)
    return md


if __name__ == "__main__":
    main()
