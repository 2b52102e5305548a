"""`python -m analysis.report`: regenerate docs/decision.md and docs/figures/* from saved results.

Inputs (nothing else): `results/sweeps/NAME.csv` with its `NAME.json` provenance and
`NAME.per_layer.csv` (written by `python -m analysis.sweep`), `results/quality*.json` when present
(written by `python -m jaxmoe.quality`), and the hardware profiles in `sim/profiles/`. Every number
in the document is computed here from those files; where quality results are absent the document
says so in a "pending" section. Tables are built by pure functions of the frames (`precision_table`,
`signal_table`, `policy_table`, `gpu_table`, `quality_table`); charts come from `analysis.charts`
and are saved as PNG through vl-convert.
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
from analysis.sweep import PER_LAYER_COLUMNS, SWEEP_COLUMNS, VRAM
from sim.formats import FORMATS
from sim.io import InputError, atomic_path, exit_on_input_error, write_text_atomic
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


@dataclass
class Inputs:
    """Everything the report reads, already parsed."""

    sweeps: pd.DataFrame  # SWEEP_COLUMNS, all traces
    provenance: dict[str, dict]  # trace name → NAME.json
    layers: pd.DataFrame  # trace, config_id, layer, hit_rate
    quality: pd.DataFrame | None  # one row per quality record (None: no quality file)
    quality_files: list[str] = field(default_factory=list)
    profiles: dict[str, dict] = field(default_factory=dict)  # gpu name → profile JSON


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


def _quality_rows(doc, path: Path) -> list[dict]:
    if isinstance(doc, list):
        rows, meta = doc, {}
    elif isinstance(doc, dict):
        key = next((k for k in ("rows", "records", "results", "policies") if isinstance(doc.get(k), list)), None)
        if key is None:
            raise InputError(path, "expected a list of records or an object with a 'rows' list")
        rows = doc[key]
        meta = {k: v for k, v in doc.items() if k != key and not isinstance(v, (list, dict))}
    else:
        raise InputError(path, "expected a JSON list or object")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(path, f"record {i} is not an object")
        if "kld" not in r:
            raise InputError(path, f"record {i} has no 'kld'")
        out.append({**{f"meta_{k}": v for k, v in meta.items()}, **r, "source_file": path.name})
    return out


def load_quality(paths: list[str | Path]) -> pd.DataFrame | None:
    """Read quality JSON files (jaxmoe.quality) into one frame; None when there are none."""
    rows: list[dict] = []
    for p in sorted(map(Path, paths)):
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(p, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        rows.extend(_quality_rows(doc, p))
    if not rows:
        return None
    q = pd.DataFrame(rows)
    q["precision"] = [charts.quality_precision(r) for r in q.to_dict("records")]
    return q


def load_profiles(names) -> dict[str, dict]:
    """The raw JSON of each named hardware profile in sim/profiles (missing ones are skipped)."""
    out = {}
    for n in sorted(set(names)):
        p = PROFILE_DIR / f"{n}.json"
        if p.exists():
            out[n] = json.loads(p.read_text())
    return out


def load_inputs(sweep_dir: str | Path = SWEEP_DIR, quality_glob: str = QUALITY_GLOB) -> Inputs:
    """Load sweeps, quality files and the hardware profiles they name (plus h200)."""
    sweeps, provs, layers = load_sweeps(sweep_dir)
    qfiles = sorted(glob.glob(quality_glob))
    quality = load_quality(qfiles)
    return Inputs(sweeps, provs, layers, quality, [Path(f).name for f in qfiles],
                  load_profiles(list(sweeps["gpu"].unique()) + ["h200"]))


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
    s = str(v).replace("%", "").replace("+", "").replace("−", "-").strip()
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
    budgets = sorted(shared - {VRAM}, key=lambda b: float(b[:-1])) + ([VRAM] if VRAM in shared else [])
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


def quality_table(quality: pd.DataFrame, sims: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Quality rows with the simulated Δ tok/s of the same precision policy on each trace."""
    rows = []
    for r in quality.sort_values("precision", key=lambda s: s.map(lambda p: _rank(p) if isinstance(p, str) else (9,))) \
            .to_dict("records"):
        row = {"precision": f"`{r['precision']}`" if isinstance(r.get("precision"), str) else str(r.get("policy"))}
        for c in QUALITY_COLUMNS:
            if c in r:
                row[c] = f_num(r[c], 4) if c != "top1" else f_pct(r[c])
        for c in ("low_mass", "skipped_mass"):
            if c in r and not _isnan(r[c]):
                row[f"{c.replace('_', ' ')} (model)"] = f_pct(r[c])
        for name, sim in sims.items():
            m = sim[sim["precision"] == r.get("precision")]
            row[f"Δ tok/s {name}"] = f_pct(m["speedup"].iloc[0], signed=True) if len(m) else "–"
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# The answer bullets
# ------------------------------------------------------------------------------------------------

def _one(frame: pd.DataFrame, **eq) -> pd.Series | None:
    f = frame
    for k, v in eq.items():
        f = f[f[k] == v]
    return f.iloc[0] if len(f) else None


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
                   + "; ".join(parts) + ".")

    if inp.quality is None:
        out.append("**Quality: pending.** No `results/quality*.json` exists yet, so the cost in KLD / perplexity "
                   "of these policies is not measured; the speed side alone does not decide the question.")
    else:
        q = inp.quality
        bits = []
        for prec in (Q2, Q3, DYN):
            r = _one(q, precision=prec)
            if r is not None and not _isnan(r.get("kld")):
                extra = f", same top-1 {f_pct(r['top1'])}" if "top1" in r and not _isnan(r["top1"]) else ""
                bits.append(f"`{prec}` KLD {f_num(r['kld'], 4)}{extra}")
        if bits:
            out.append("Quality on the project's small Qwen3-MoE model (against its Q4_K baseline): " + "; ".join(bits) + ".")
        else:
            out.append("Quality files exist (" + ", ".join(inp.quality_files) + ") but none matches the headline "
                       "policies; see the quality section.")
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
    if inp.quality is not None:
        joined = []
        for t in sorted(set(inp.sweeps["trace"])):
            f = inp.sweeps[inp.sweeps["trace"] == t]
            gpu = primary_gpu(f, inp.provenance.get(t, {}))
            sim = charts.with_native_baseline(f[(f["gpu"] == gpu) & (f["policy"] == POLICY) & (f["budget"] == VRAM)])
            joined.append(charts.join_quality(sim, inp.quality))
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
        f = inp.sweeps[inp.sweeps["trace"] == t]
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
    native = model.expert_bytes(0)
    rows = []
    for fmt in ("q4_k", "q3_k", "q2_k"):
        b = model.expert_bytes(0, fmt)
        rows.append({"format": fmt.upper(), "bits/weight": f"{FORMATS[fmt].bits_per_weight:.4g}",
                     "bytes/expert": f"{b:,}", "× Q4_K_M layer-0 expert": f"{b / native:.3f}"})
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
    add("**Simulator** (`sim/`, [docs/simulator.md](simulator.md)): each trace is replayed through a precision "
        "policy (which format each expert access uses), a byte-capacity cache policy and a simpy timeline of the "
        "PCIe copy engine and the compute stream. The first 25 % of each trace (its calibration window) learns the "
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
        add(f"![{caption}]({fig_rel}/{stem}.png)")
        add("")
        add(f"*{caption}*")
        add("")

    add("## Quality")
    add("")
    if inp.quality is None:
        add("**Pending.** No quality results (`results/quality*.json`, written by `python -m jaxmoe.quality`) "
            "exist yet. No perplexity, KLD or top-1 agreement numbers are reported here until they do; rerun "
            f"`{REPRO}` afterwards to fill this section and the quality-vs-speed figure.")
    else:
        add(f"From {', '.join(f'`{x}`' for x in inp.quality_files)}: the project's small Qwen3-MoE-architecture "
            "model evaluated under each precision policy against its own Q4_K baseline; Δ tok/s is the simulated "
            f"gain of the same policy at the 12 GB budget ({POLICY}, each trace's primary GPU).")
        add("")
        sims = {}
        for t in traces:
            f = inp.sweeps[inp.sweeps["trace"] == t]
            gpu = primary_gpu(f, inp.provenance.get(t, {}))
            sims[t] = charts.with_native_baseline(f[(f["gpu"] == gpu) & (f["policy"] == POLICY) & (f["budget"] == VRAM)])
        add(markdown_table(quality_table(inp.quality, sims)))
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
            add(f"- `{t}` is a real recording but small: {p.get('n_seqs', '?')} sequence(s), "
                f"{p.get('decode_steps', '?')} decode steps, top-{p.get('top_k', '?')} routing; with the 25 % "
                "calibration window, static rankings learn on very few tokens and every percentage rests on "
                f"{int(inp.sweeps[inp.sweeps['trace'] == t]['tokens'].iloc[0])} counted decode tokens.")
    add("- The RTX 3060 / 4070 profiles are datasheet-scaled estimates (see their `source`); absolute tokens/s "
        "on those GPUs are not measured, the relative Δ between precision policies is the robust quantity.")
    add("- Quality (when present) is measured on the project's small Qwen3-MoE-architecture model, not on "
        "Qwen3-30B-A3B: it shows the direction and the ordering of policies; a 30B model's loss under 2–3-bit "
        "re-quantization may differ, and the small model likely understates it.")
    add("- Dynamic precision changes the access sequence online (skips, low copies), so `belady` is only run with "
        "native/static precision.")
    add("")
    return "\n".join(L)


def save_png(chart, path: Path, scale: float = 2.0) -> None:
    """Render an Altair chart to PNG through vl-convert, atomically."""
    import vl_convert as vlc

    png = vlc.vegalite_to_png(chart.to_json(), scale=scale)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


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
    write_text_atomic(doc, md)
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
