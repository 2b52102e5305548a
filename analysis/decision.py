"""The decision section's numbers: map sweeps + quality → intervals → the verdict (analysis.verdict).

Inputs (all optional; what is absent is said so in the document):
- `results/sweeps/map*.csv` + `.units.csv` + `.json` (`python -m analysis.mapsweep`): simulated
  configurations and their per-sequence tokens, time, hits and accesses.
- the 48-layer model's quality file (`results/quality-48l.json`, `python -m jaxmoe.scale`): mean
  per-token KLD against the Q4_K model, with a 95 % interval, per precision policy.
- `results/offload/*.json` (`python -m jaxmoe.offload`): measured executor tok/s.

Speed: `speed_frame` pairs every configuration with the native one of the same (scenario, model,
native format, VRAM, link, cache policy, prefetch) over the same sequences (`analysis.intervals.
paired_frame`: Δ tok/s and Δ hit rate with 95 % bootstrap intervals over sequences).
Quality: `quality_frame` maps the quality file's rows onto precision specs; a policy the file does
not measure (e.g. HOBBIT's `serve` variant) has no KLD and fails the rule as "quality_unknown".
The verdict: `verdict_input` turns both into `analysis.verdict`'s contract: one setting per (model +
native format, GPU, VRAM, link), the scenario `base` from the map panel, other scenarios from the
sensitivity panels.
"""
from __future__ import annotations

import json
import re
from glob import glob
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.intervals import MIN_UNITS, paired_frame, t_interval
from analysis.verdict import BASE_SCENARIO, Rule, verdict
from sim.precision import parse_precision

MAP_GLOB = "map*.csv"
QUALITY48_GLOB = "results/quality-48*.json"
OFFLOAD_GLOB = "results/offload/*.json"
GROUP_KEYS = ("panel", "scenario", "trace", "model", "native", "vram_gb", "pcie", "policy", "protected_share", "prefetch")
VERDICT_POLICY = "slru"  # the cache policy the verdict is computed for (the engine's)
Q4KM_VS_BF16_KLD = 0.0101  # Qwen3-30B-A3B Q4_K_M vs BF16 (ik_llama.cpp discussion #359): the rule's unit
QUALITY_REFERENCE = "q4_k"  # KLD against the model's own Q4_K weights = against the native model


def load_map(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """All map*.csv of `sweep_dir` joined (config ids made unique per file), their units and provenance."""
    rows, units, provs = [], [], []
    for path in sorted(Path(sweep_dir).glob(MAP_GLOB)):
        if path.name.endswith(".units.csv"):
            continue
        stem = path.name[: -len(".csv")]
        upath = path.with_name(f"{stem}.units.csv")
        if not upath.exists():
            continue
        r = pd.read_csv(path)
        u = pd.read_csv(upath)
        r["source"] = path.name
        r["key"] = stem + ":" + r["config_id"].astype(str)
        u["key"] = stem + ":" + u["config_id"].astype(str)
        rows.append(r)
        units.append(u)
        jpath = path.with_name(f"{stem}.json")
        if jpath.exists():
            prov = json.loads(jpath.read_text())
            prov["name"] = stem
            provs.append(prov)
    if not rows:
        return pd.DataFrame(), pd.DataFrame(), []
    return pd.concat(rows, ignore_index=True), pd.concat(units, ignore_index=True), provs


def speed_frame(rows: pd.DataFrame, units: pd.DataFrame, n_resamples: int = 2000) -> pd.DataFrame:
    """Per configuration: tok/s, Δ tok/s and hit rate vs native with paired 95 % intervals (over sequences)."""
    if rows.empty:
        return pd.DataFrame()
    meta = rows.copy()
    meta["protected_share"] = meta["protected_share"].fillna(-1.0)
    u = units.merge(meta[["key", *GROUP_KEYS, "precision"]], on="key")
    pf = paired_frame(u, GROUP_KEYS, "native", config="precision", n_resamples=n_resamples)
    out = meta.merge(pf, on=[*GROUP_KEYS, "precision"], how="inner", suffixes=("", "_ci"))
    out["protected_share"] = out["protected_share"].replace(-1.0, np.nan)
    return out


_QNAME = re.compile(r"^(static)-(\w+)-([0-9.]+)-(q2r|q3r|ta)$|^(dynamic)-([0-9.]+)-([0-9.]+)-(q2r|q3r|ta)$")
_QFMT = {"q2r": "q2_k", "q3r": "q3_k", "ta": "q2_k_gu"}  # ta: gate/up re-quantized to Q2_K, ffn_down kept
_QCURVE = re.compile(r"^static-gm-([0-9.]+)-(q2r|q3r|ta)$")  # jaxmoe.scale's demotion by gate-mass share
_QCURVE_FMT = {"q2r": "q2_k", "q3r": "q3_k", "ta": "q2_k_gu"}


def quality_spec(name: str) -> str | None:
    """The precision spec a quality row measures (`static-mass-0.25-q2r` → static:mass:25%:q2_k), or None.

    `q2r`/`q3r` are Q4_K re-quantized to Q2_K/Q3_K, what the simulator's low formats stand for; `ta`
    (tensor-aware) re-quantizes only ffn_gate/ffn_up to Q2_K and keeps ffn_down, the simulator's `q2_k_gu`. The
    dynamic rows apply the rule to every use (high-ranked uses always at high precision), which is
    the `reload` variant; the `serve` variant's quality is not measured by that file.
    """
    m = _QNAME.match(name)
    if not m:
        return None
    if m.group(1):
        return f"static:{m.group(2)}:{float(m.group(3)) * 100:g}%:{_QFMT[m.group(4)]}"
    return parse_precision(f"dynamic:{m.group(6)}:{m.group(7)}:{_QFMT[m.group(8)]}").name


def load_quality48(pattern: str = QUALITY48_GLOB) -> tuple[pd.DataFrame | None, dict]:
    """(frame precision → kld, kld_lo, kld_hi, low_mass, top1; facts) from the 48-layer quality file, or (None, {})."""
    paths = sorted(glob(pattern))
    if not paths:
        return None, {}
    path = Path(paths[-1])
    doc = json.loads(path.read_text())
    rows = []
    for r in doc.get("rows", []):
        if r.get("reference") != QUALITY_REFERENCE:
            continue
        spec = "native" if r.get("name") == QUALITY_REFERENCE else quality_spec(str(r.get("name", "")))
        if spec is None or r.get("kld") is None:
            continue
        lo, hi = (r.get("kld_ci") or [np.nan, np.nan])[:2]
        rows.append({"precision": spec, "kld": float(r["kld"]), "kld_lo": float(lo), "kld_hi": float(hi),
                     "quality_low_mass": r.get("low_mass"), "top1": r.get("top1")})
    model = doc.get("model", {})
    facts = {"file": str(path), "command": doc.get("command", ""), "device": doc.get("device", ""),
             "n_layers": model.get("n_layers"), "n_experts": model.get("n_experts"), "top_k": model.get("top_k"),
             "ppl": (doc.get("train") or {}).get("final_heldout_ppl"),
             "eval_chunks": (doc.get("setup") or {}).get("eval_chunks"), "n_ctx": (doc.get("setup") or {}).get("n_ctx")}
    curve = []
    for r in doc.get("rows", []):
        m = _QCURVE.match(str(r.get("name", "")))
        if m and r.get("reference") == QUALITY_REFERENCE and r.get("kld") is not None and r.get("kld_ci"):
            curve.append({"name": r["name"], "low_format": _QCURVE_FMT[m.group(2)], "share": float(m.group(1)),
                          "low_mass": float(r["low_mass"]), "kld": float(r["kld"]), "kld_lo": float(r["kld_ci"][0]),
                          "kld_hi": float(r["kld_ci"][1])})
    facts["mass_curve"] = curve
    coupled = []  # cache-coupled passes: the policy measured at the cache's operating point (issue 10 item 4)
    for r in doc.get("coupled", []):
        if r.get("reference") != QUALITY_REFERENCE or r.get("kld") is None or not r.get("kld_ci"):
            continue
        try:
            spec = parse_precision(str(r.get("precision", ""))).name
        except ValueError:
            continue
        coupled.append({"name": r["name"], "precision": spec, "low_mass": float(r["low_mass"]),
                        "kld": float(r["kld"]), "kld_lo": float(r["kld_ci"][0]), "kld_hi": float(r["kld_ci"][1])})
    facts["coupled_quality"] = coupled
    pairs = [p for p in doc.get("pairs", []) if p.get("reference") == QUALITY_REFERENCE and p.get("metric") == "kld"]
    facts["pairs"] = pairs
    anchor = [r for r in doc.get("rows", []) if r.get("name") == QUALITY_REFERENCE and r.get("reference") == "float"]
    facts["q4k_vs_float_kld"] = float(anchor[0]["kld"]) if anchor and anchor[0].get("kld") else None
    return pd.DataFrame(rows).drop_duplicates("precision"), facts


def _policy_fields(spec: str) -> dict:
    p = parse_precision(spec)
    if p.is_dynamic:
        return {"policy": f"HOBBIT dynamic ({p.low_copy})", "signal": "gate rank",
                "threshold": f"T1 {p.t1:g} / T2 {p.t2:g}", "low_format": p.dynamic_format.upper()}
    if p.is_static:
        return {"policy": "static", "signal": p.static_signal, "threshold": f"bottom {p.static_fraction:.0%}",
                "low_format": p.static_format.upper()}
    return {"policy": "native", "signal": "", "threshold": "", "low_format": ""}


def _lightest_serving(rows: list[dict], low_mass: float) -> dict | None:
    """Of quality rows, the one with the least served low mass that is still ≥ `low_mass` (never a lighter
    one; the first of equals); None when none serves enough."""
    ok = [r for r in rows if np.isfinite(r["low_mass"]) and r["low_mass"] >= low_mass]
    return min(ok, key=lambda r: r["low_mass"]) if ok else None


def curve_quality(low_format: str, low_mass: float, curve: list[dict]) -> dict | None:
    """The quality-vs-gate-mass row standing in for a static policy at `low_mass`: of the curve rows of
    `low_format`, the one with the least served low mass that is still ≥ `low_mass` (never a lighter one)."""
    return _lightest_serving([c for c in curve if c["low_format"] == low_format], low_mass)


def coupled_quality(precision: str, low_mass: float, own: dict | None, coupled: list[dict]) -> dict | None:
    """The measured row for a policy at `low_mass`: of its own (uncoupled) row and its cache-coupled rows, the
    one with the least served low mass that is still ≥ `low_mass` (the own row first among equals)."""
    return _lightest_serving(([own] if own is not None else []) + [c for c in coupled if c["precision"] == precision],
                             low_mass)


def verdict_input(speed: pd.DataFrame, quality: pd.DataFrame | None, curve: list[dict] | None = None,
                  coupled: list[dict] | None = None) -> pd.DataFrame:
    """analysis.verdict's contract from the speed frame (slru, no prefetch, map + sensitivity panels).

    A policy's KLD comes from the lightest of its own quality row and its cache-coupled rows (`coupled`:
    the quality run's `coupled P @ budget` passes) that served at least the replay's low-precision gate
    mass (`coupled_quality`); failing that, a static policy takes the quality-vs-gate-mass curve point
    (`curve_quality`) of its low format that served at least the replay's mass; failing both, its own row
    stays (and counts as measured at a lighter point). `quality_row` names the row a KLD comes from."""
    if speed.empty:
        return pd.DataFrame()
    s = speed[(speed["policy"] == VERDICT_POLICY) & (speed["prefetch"] == "none")
              & speed["panel"].isin(["map", "sens"])].copy()
    s["protected_share"] = s["protected_share"].fillna(-1)
    s = s[(s["scenario"] != BASE_SCENARIO) | (s["protected_share"] < 0)]
    if quality is not None and not quality.empty:
        s = s.merge(quality[["precision", "kld", "kld_lo", "kld_hi", "quality_low_mass"]], on="precision", how="left")
    else:
        s["kld"], s["kld_lo"], s["kld_hi"], s["quality_low_mass"] = np.nan, np.nan, np.nan, np.nan
    s["quality_row"] = np.where(s["kld"].notna(), "policy", "")
    for i in s.index:
        spec = parse_precision(s.at[i, "precision"])
        if spec.name == "native":
            continue
        own_mass = pd.to_numeric(pd.Series([s.at[i, "quality_low_mass"]]), errors="coerce").iloc[0]
        need = float(s.at[i, "low_precision_mass"])
        own = None if not np.isfinite(s.at[i, "kld"]) else {"name": "policy", "low_mass": own_mass}
        m = coupled_quality(spec.name, need, own, coupled or [])
        if m is not None:
            if m["name"] != "policy":
                s.loc[i, ["kld", "kld_lo", "kld_hi", "quality_low_mass"]] = [m["kld"], m["kld_lo"], m["kld_hi"],
                                                                             m["low_mass"]]
                s.at[i, "quality_row"] = m["name"]
            continue
        if not spec.is_static or spec.is_dynamic or not curve:
            continue
        c = curve_quality(spec.static_format, need, curve)
        if c is not None:
            s.loc[i, ["kld", "kld_lo", "kld_hi", "quality_low_mass"]] = [c["kld"], c["kld_lo"], c["kld_hi"], c["low_mass"]]
            s.at[i, "quality_row"] = c["name"]
    fields = pd.DataFrame([_policy_fields(p) for p in s["precision"]], index=s.index)
    out = pd.DataFrame({
        "model": s["model"] + " " + s["native"].str.upper().str.replace("_K_M", "_K_M"),
        "gpu": "an RTX 3060-class GPU",
        "vram_gb": s["vram_gb"], "pcie": s["pcie"],
        "policy": fields["policy"], "signal": fields["signal"], "threshold": fields["threshold"],
        "low_format": fields["low_format"], "precision": s["precision"],
        "delta": s["delta"], "delta_lo": s["delta_lo"], "delta_hi": s["delta_hi"],
        "kld": s["kld"], "kld_lo": s["kld_lo"], "kld_hi": s["kld_hi"], "scenario": s["scenario"],
        "baseline": s["native"].str.upper(), "n_units": s["n_units"],
        "hit_rate": s["hit_rate"], "hit_rate_lo": s["hit_rate_lo"], "hit_rate_hi": s["hit_rate_hi"],
        "low_precision_mass": s["low_precision_mass"],
        "quality_low_mass": pd.to_numeric(s["quality_low_mass"], errors="coerce").where(s["precision"] != "native", 0.0),
        "quality_row": s["quality_row"],
    })
    return out.reset_index(drop=True)


def decision(sweep_dir, quality_glob: str = QUALITY48_GLOB, rule: Rule | None = None) -> dict:
    """Everything the Decision section renders: the verdict, its tables and the input facts."""
    rows, units, provs = load_map(sweep_dir)
    quality, qfacts = load_quality48(quality_glob)
    speed = speed_frame(rows, units) if not rows.empty else pd.DataFrame()
    vin = verdict_input(speed, quality, qfacts.get("mass_curve"), qfacts.get("coupled_quality"))
    if rule is None:
        anchor = qfacts.get("q4k_vs_float_kld")
        rule = Rule(kld_unit=anchor / Q4KM_VS_BF16_KLD) if anchor else Rule()
    v = verdict(vin, rule) if not vin.empty else None
    return {"rows": rows, "units": units, "provs": provs, "speed": speed, "quality": quality,
            "quality_facts": qfacts, "verdict_input": vin, "verdict": v,
            "min_units": MIN_UNITS, "rule": rule}


def load_offload(pattern: str = OFFLOAD_GLOB) -> list[dict]:
    """Measured executor results (results/offload/*.json), one dict per measured configuration.

    A validation file (`python -m jaxmoe.offload_calib validate GRID --json FILE`: the grid's records with
    the simulator's prediction beside each) replaces the grid it names.
    """
    docs = {}
    for path in sorted(glob(pattern)):
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("results"), list):
            docs[Path(path).name] = doc
    validated = {d.get("grid") for d in docs.values() if d.get("kind") == "validation"}
    out = []
    for name, doc in docs.items():
        if name in validated:
            continue
        dev = doc.get("device", {})
        for r in doc["results"]:
            if "tokens_per_s_mean" not in r:
                continue
            sim = r.get("sim_tokens_per_s", r.get("simulated_tokens_per_s"))
            out.append({"file": name, "platform": dev.get("platform", "?"),
                        "device": dev.get("device_kind", "?"), "trace": r.get("trace"), "budget": r.get("budget"),
                        "policy": r.get("policy"), "precision": r.get("precision"),
                        "copy_path": r.get("copy_path", "?"),
                        # per-round tok/s only where rounds interleaved configurations (paired by round)
                        "runs": r.get("tokens_per_s") if doc.get("rounds") else None,
                        "measured": float(r["tokens_per_s_mean"]), "measured_ci": r.get("tokens_per_s_ci95"),
                        "simulated": None if sim is None else float(sim), "command": doc.get("command", "")})
    return out


def paired_delta(runs_policy, runs_native) -> tuple[float, float, float] | None:
    """Mean and 95 % t-interval of Δ tok/s = policy/native − 1, paired by timing round (None: not paired).

    The executor times every configuration once per round in a random order (jaxmoe.offload), so the
    i-th runs of two configurations saw the same machine state: pairing removes the drift between rounds.
    """
    if not runs_policy or not runs_native or len(runs_policy) != len(runs_native) or len(runs_native) < 2:
        return None
    return t_interval(np.asarray(runs_policy, float) / np.asarray(runs_native, float) - 1)


def measured_deltas(records: list[dict]) -> list[dict]:
    """Per low-bit configuration: measured Δ tok/s against native with the same file, trace, budget, cache and
    copy path (paired by round where the run interleaved: (mean, lo, hi), else the ratio of means and no
    interval) and the simulated Δ (nan where not simulated), with both records."""
    if not records:
        return []
    df = pd.DataFrame(records)
    if "copy_path" not in df:
        df["copy_path"] = "?"
    out = []
    for key, g in df.groupby(["file", "trace", "budget", "policy", "copy_path"], sort=True):
        base = g[g["precision"] == "native"]
        if base.empty:
            continue
        b = base.iloc[0]
        for _, r in g.iterrows():
            if r["precision"] == "native":
                continue
            paired = paired_delta(r.get("runs"), b.get("runs"))
            meas = paired[0] if paired else r["measured"] / b["measured"] - 1
            sim = (r["simulated"] / b["simulated"] - 1) if r["simulated"] is not None and b["simulated"] else np.nan
            out.append({"key": key, "native": b, "policy": r, "measured": meas, "paired": paired, "simulated": sim})
    return out


def validation_summary(records: list[dict]) -> pd.DataFrame:
    """Per measured file and copy path: how far the simulator's tok/s is from the executor's (|error|), and how
    far its Δ tok/s of the low-bit policies against native is from the measured Δ (points)."""
    rows = [r for r in records if r.get("simulated") is not None]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    df["err"] = df["simulated"] / df["measured"] - 1
    deltas = {}
    for d in measured_deltas(rows):
        if np.isfinite(d["simulated"]):
            deltas.setdefault((d["key"][0], d["key"][4]), []).append(d)
    out = []
    for (f, dev, cp), g in df.groupby(["file", "device", "copy_path"], sort=True):
        e = g["err"].to_numpy()
        ds = deltas.get((f, cp), [])
        diff = np.array([d["simulated"] - d["measured"] for d in ds])
        inside = sum(1 for d in ds if d["paired"] and d["paired"][1] <= d["simulated"] <= d["paired"][2])
        n_paired = sum(1 for d in ds if d["paired"])
        out.append({"file": f, "device": dev, "copy path": cp, "configurations": len(e),
                    "mean abs. error": f"{np.abs(e).mean() * 100:.1f} %", "median error": _p(float(np.median(e))),
                    "max abs. error": f"{np.abs(e).max() * 100:.1f} %", "within ±5 %": f"{int((np.abs(e) <= 0.05).sum())} of {len(e)}",
                    "Δ tok/s, sim − measured: mean / max abs. (points)":
                        f"{np.abs(diff).mean() * 100:.1f} / {np.abs(diff).max() * 100:.1f} ({len(diff)} low-bit)" if len(diff) else "–",
                    "simulated Δ inside the measured Δ's 95 % CI": f"{inside} of {n_paired}" if n_paired else "–"})
    return pd.DataFrame(out)


def measured_table(records: list[dict]) -> pd.DataFrame:
    """Measured Δ tok/s vs native (paired by round, with its interval) beside simulated, and the validation error."""
    def tps(x):
        ci = x["measured_ci"]
        return f"{x['measured']:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci is not None and len(ci) == 2 else "")
    out = []
    for d in measured_deltas(records):
        key, b, r, meas, paired, sim = d["key"], d["native"], d["policy"], d["measured"], d["paired"], d["simulated"]
        out.append({"file": key[0], "device": f"{r['platform']}:{r['device']}", "trace": key[1],
                    "budget": key[2], "cache": key[3], "copy path": key[4], "precision": r["precision"],
                    "native tok/s [95 % CI over rounds]": tps(b), "policy tok/s [95 % CI]": tps(r),
                    "measured Δ tok/s [95 % CI, paired by round]":
                        _p(meas) + (f" [{_p(paired[1])}, {_p(paired[2])}]" if paired else ""),
                    "simulated Δ tok/s": _p(sim),
                    "error (sim − measured)": _p(sim - meas) if np.isfinite(sim) else "–"})
    return pd.DataFrame(out)


__all__ = ["ci_kld", "ci_pct", "ci_rate", "coupled_quality", "curve_quality", "decision", "interactive_chart", "link_flips", "load_map", "load_offload",
           "load_quality48", "map_chart", "map_table", "measured_deltas", "measured_table", "paired_delta", "paired_policy_diffs",
           "panel_table", "quality_pairs_table", "quality_spec", "sensitivity_table", "setting_table",
           "speed_frame", "validation_summary", "verdict_input", "write_html"]


# ------------------------------------------------------------------------------------------------
# Tables and figures of the decision section
# ------------------------------------------------------------------------------------------------

def _p(x, digits: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x * 100:+.{digits}f} %"


def _r(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _k(x) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def ci_pct(r, name: str = "delta") -> str:
    """`+12.3 % [+10.1, +14.0]` from columns name, name_lo, name_hi."""
    if not np.isfinite(r[name]):
        return "–"
    return f"{_p(r[name])} [{_p(r[f'{name}_lo'])[:-2]}, {_p(r[f'{name}_hi'])[:-2]}]"


def ci_rate(r, name: str = "hit_rate") -> str:
    return "–" if not np.isfinite(r[name]) else f"{_r(r[name])} [{_r(r[f'{name}_lo'])}, {_r(r[f'{name}_hi'])}]"


def ci_kld(r) -> str:
    if not np.isfinite(r["kld"]):
        return "not measured"
    if np.isfinite(r["kld_lo"]) and np.isfinite(r["kld_hi"]):
        return f"{_k(r['kld'])} [{_k(r['kld_lo'])}, {_k(r['kld_hi'])}]"
    return _k(r["kld"])


def _short(r) -> str:
    if r["policy"] == "native":
        return "native"
    if str(r["policy"]).startswith("HOBBIT"):
        return f"{r['policy']} {r['threshold']}"
    return f"static {r['signal']} {r['threshold'].replace('bottom ', '')} {r['low_format']}"


def map_table(v) -> pd.DataFrame:
    """One row per (model + native, VRAM), one column per link: the verdict cell of each setting."""
    s = v.settings.copy()
    if s.empty:
        return pd.DataFrame()
    links = [lk for lk in ("gen3x16", "gen4x8", "gen4x16", "gen5x16") if lk in set(s["pcie"])]
    out = []
    for (model, vram), g in s.groupby(["model", "vram_gb"], sort=True):
        row = {"model": model, "VRAM": f"{vram:g} GB"}
        for lk in links:
            c = g[g["pcie"] == lk]
            if c.empty:
                row[lk] = ""
                continue
            c = c.iloc[0]
            mark = "**yes**" if c["recommended"] else "no"
            row[lk] = f"{mark}: {_short(c)} {_p(c['delta_lo'])[:-2]}…{_p(c['delta_hi'])[:-2]} %"
        out.append(row)
    return pd.DataFrame(out)


def setting_table(vin: pd.DataFrame, vram: float = 12, pcie: str = "gen4x16", rule: Rule | None = None) -> pd.DataFrame:
    """Every policy at one VRAM/link: Δ tok/s, hit rate, low mass with intervals, KLD, status under `rule`
    (the verdict's own rule: its KLD bound is in the measured model's units, not the default's)."""
    from analysis.verdict import assess

    a = assess(vin, rule or Rule())
    a = a[(a["scenario"] == BASE_SCENARIO) & (a["vram_gb"] == vram) & (a["pcie"] == pcie)]
    rows = []
    for _, r in a.sort_values(["model", "precision"]).iterrows():
        rows.append({"model": r["model"], "policy": r["precision"], "Δ tok/s [95 % CI]": ci_pct(r),
                     "hit rate [95 % CI]": ci_rate(r), "gate mass at low bits": f"{r['low_precision_mass']:.1%}",
                     "KLD vs native [95 % CI]": ci_kld(r), "rule": r["status"]})
    return pd.DataFrame(rows)


def sensitivity_table(v) -> pd.DataFrame:
    """Per (setting, scenario): the recommendation under the scenario against the base one."""
    from analysis.verdict import decide

    scen = sorted(set(v.rows["scenario"]) - {BASE_SCENARIO})
    base = decide(v.rows, v.rule)  # the verdict's own rule (a proxy model's bound is scaled)
    rows = []
    for sc in scen:
        d = decide(v.rows, v.rule, scenario=sc)
        m = d.merge(base, on=["model", "gpu", "vram_gb", "pcie"], suffixes=("", "_base"))
        for _, r in m.iterrows():
            flip = bool(r["recommended"]) != bool(r["recommended_base"]) or (
                r["recommended"] and _short(r) != _short({k: r[f"{k}_base"] for k in ("policy", "signal", "threshold",
                                                                                     "low_format")}))
            rows.append({"scenario": sc, "model": r["model"], "VRAM": f"{r['vram_gb']:g} GB", "PCIe": r["pcie"],
                         "base verdict": ("**yes** " if r["recommended_base"] else "no: best ") + _short(
                             {k: r[f"{k}_base"] for k in ("policy", "signal", "threshold", "low_format")})
                         + f" {_p(r['delta_lo_base'])} lower bound",
                         "under scenario": ("**yes** " if r["recommended"] else "no: best ") + _short(r)
                         + f" {_p(r['delta_lo'])} lower bound",
                         "flips": "**FLIP**" if flip else ""})
    return pd.DataFrame(rows)


def link_flips(v) -> list[str]:
    """Settings (model, VRAM) whose verdict changes with the PCIe link in the base map."""
    s = v.settings
    out = []
    for (model, vram), g in s.groupby(["model", "vram_gb"], sort=True):
        if g["recommended"].nunique() > 1:
            yes = ", ".join(g.loc[g["recommended"], "pcie"])
            out.append(f"{model} at {vram:g} GB (recommended only on {yes})")
    return out


def panel_table(speed: pd.DataFrame, panel: str) -> pd.DataFrame:
    """A panel's configurations (hobbit, t1t2, real) with Δ tok/s and hit rate intervals."""
    s = speed[speed["panel"] == panel]
    rows = []
    for _, r in s.sort_values(["policy", "prefetch", "precision"]).iterrows():
        rows.append({"cache policy": r["policy"], "prefetch": r["prefetch"], "precision": r["precision"],
                     "tok/s": f"{r['tok_s']:.1f}", "Δ tok/s vs native [95 % CI]": ci_pct(r),
                     "hit rate [95 % CI]": ci_rate(r), "low-bit mass": f"{r['low_precision_mass']:.1%}",
                     "skipped mass": f"{r['skipped_mass']:.1%}", "units": int(r["n_units"])})
    return pd.DataFrame(rows)


def paired_policy_diffs(rows: pd.DataFrame, units: pd.DataFrame, pairs: list[tuple[str, str]],
                        panel: str = "map", policy: str = VERDICT_POLICY) -> pd.DataFrame:
    """Paired speed differences b vs a (relative Δ tok/s of b over a, Δ hit rate) per setting, with intervals."""
    r = rows[(rows["panel"] == panel) & (rows["policy"] == policy) & (rows["scenario"] == BASE_SCENARIO)
             & (rows["prefetch"] == "none")].copy()
    r["protected_share"] = r["protected_share"].fillna(-1.0)
    u = units.merge(r[["key", *GROUP_KEYS, "precision"]], on="key")
    out = []
    for a, b in pairs:
        sub = u[u["precision"].isin([a, b])]
        if sub.empty:
            continue
        ok = sub.groupby(list(GROUP_KEYS), dropna=False)["precision"].transform("nunique") == 2
        sub = sub[ok]
        if sub.empty:
            continue
        pf = paired_frame(sub, GROUP_KEYS, a, config="precision")
        pf = pf[pf["precision"] == b]
        for _, x in pf.iterrows():
            out.append({"a": a, "b": b, "model": f"{x['model']} {x['native'].upper()}", "VRAM": f"{x['vram_gb']:g} GB",
                        "PCIe": x["pcie"], "Δ tok/s of b over a [95 % CI]": ci_pct(x),
                        "Δ hit rate b − a [95 % CI]": ci_rate(x, "hit_delta").replace("0.", "0.")})
    return pd.DataFrame(out)


def quality_pairs_table(qfacts: dict) -> pd.DataFrame:
    """The quality file's paired KLD differences (vs the Q4_K model) with intervals."""
    rows = []
    for p in qfacts.get("pairs", []):
        a, b = quality_spec(p["a"]), quality_spec(p["b"])
        if a is None or b is None:  # rows of formats the simulator does not price (e.g. q2_k+q4_k_down)
            continue
        lo, hi = (p.get("ci") or [np.nan, np.nan])[:2]
        rows.append({"a": a, "b": b, "KLD a − b": f"{p['diff']:+.2e}", "95 % CI": f"[{lo:+.2e}, {hi:+.2e}]",
                     "verdict": p.get("verdict", "")})
    return pd.DataFrame(rows)


def map_chart(vin: pd.DataFrame, v):
    """Static PNG: the verdict map (facets model × native; x link, y VRAM; colour = best Δ lower bound)."""
    import altair as alt

    s = v.settings.copy()
    s["best"] = [_short(r) for _, r in s.iterrows()]
    s["lower bound Δ tok/s"] = s["delta_lo"]
    s["VRAM GB"] = s["vram_gb"].astype(int).astype(str)
    s["mark"] = np.where(s["recommended"], "✓", "✗")
    base = alt.Chart(s).encode(x=alt.X("pcie:N", title="PCIe link", sort=["gen3x16", "gen4x8", "gen4x16", "gen5x16"]),
                               y=alt.Y("VRAM GB:N", sort=["24", "16", "12", "8"]))
    rect = base.mark_rect().encode(color=alt.Color("lower bound Δ tok/s:Q", scale=alt.Scale(scheme="redyellowgreen",
                                                                                            domainMid=0.05),
                                                   legend=alt.Legend(format="+.0%")))
    text = base.mark_text(fontSize=11).encode(text="mark:N")
    return (rect + text).properties(width=160, height=120).facet(facet=alt.Facet("model:N", title=None),
                                                                   columns=3).properties(
        title="Best policy's Δ tok/s lower bound per setting (✓ = the rule recommends it)")


def interactive_chart(vin: pd.DataFrame):
    """The HTML page: Δ tok/s with its interval per policy and VRAM, tooltips, selectors for model and link."""
    import altair as alt

    d = vin[vin["scenario"] == BASE_SCENARIO].copy()
    d = d[d["policy"] != "native"]
    d["interval"] = [f"{_p(a)} … {_p(b)}" for a, b in zip(d["delta_lo"], d["delta_hi"])]
    d["KLD"] = [ci_kld(r) for _, r in d.iterrows()]
    d["hit"] = d["hit_rate"].round(3)
    d = d[["model", "pcie", "vram_gb", "precision", "delta", "delta_lo", "delta_hi", "interval", "KLD", "hit"]]
    d[["delta", "delta_lo", "delta_hi"]] = d[["delta", "delta_lo", "delta_hi"]].round(4)
    models = sorted(set(d["model"]))
    links = [lk for lk in ("gen3x16", "gen4x8", "gen4x16", "gen5x16") if lk in set(d["pcie"])]
    pm = alt.param(name="model_sel", value=models[0], bind=alt.binding_select(options=models, name="model "))
    pl = alt.param(name="link_sel", value=links[min(2, len(links) - 1)],
                   bind=alt.binding_select(options=links, name="PCIe "))
    base = alt.Chart(d).transform_filter("datum.model == model_sel && datum.pcie == link_sel").encode(
        x=alt.X("vram_gb:O", title="VRAM (GB)"),
        color=alt.Color("precision:N", title="policy"),
        xOffset="precision:N")
    tips = [alt.Tooltip("precision:N", title="policy"), alt.Tooltip("vram_gb:Q", title="VRAM GB"),
            alt.Tooltip("pcie:N", title="PCIe"), alt.Tooltip("delta:Q", title="Δ tok/s", format="+.1%"),
            alt.Tooltip("interval:N", title="95 % interval"), alt.Tooltip("hit:Q", title="hit rate"),
            alt.Tooltip("KLD:N", title="KLD vs native")]
    pts = base.mark_point(filled=True, size=60).encode(y=alt.Y("delta:Q", title="Δ tok/s vs native",
                                                               axis=alt.Axis(format="+.0%")), tooltip=tips)
    bars = base.mark_rule().encode(y="delta_lo:Q", y2="delta_hi:Q", tooltip=tips)
    rule = alt.Chart(pd.DataFrame({"y": [0.05]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(bars, pts, rule).add_params(pm, pl).properties(
        width=520, height=320, title="Simulated Δ tok/s (95 % bootstrap interval over sequences); dashed: +5 % rule")


def write_html(chart, path: Path) -> None:
    """A self-contained HTML page (vl-convert bundles Vega), atomically."""
    import vl_convert as vlc

    from sim.io import atomic_path
    html = vlc.vegalite_to_html(chart.to_json(), bundle=True)
    with atomic_path(path) as tmp:
        tmp.write_text(html)
        tmp.chmod(0o644)
