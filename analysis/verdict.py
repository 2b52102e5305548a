"""The decision rule, as data and code: which precision policy to implement where, or reject.

The rule (fixed 2026-12-06, before any result of the model × VRAM × PCIe grid existed)
-------------------------------------------------------------------------------------
Recommend a precision policy for a setting (model, GPU, VRAM, PCIe link) only when BOTH hold:

1. Speed: the lower bound of its 95 % interval of Δ tok/s against the native configuration (same
   model, GPU, budget, cache policy) is at least +5 % (`Rule.min_gain`). Why 5 %: a smaller gain is
   within the run-to-run spread of real inference engines, and it would not pay for what the policy
   costs to build and run (a re-quantization pipeline, a second copy of demoted experts in host
   RAM, a second kernel per format). The LOWER bound is used so that a gain resting on one lucky
   workload does not count.
2. Quality: the upper bound of its 95 % interval of mean per-token KLD against the native model
   (Q4_K_M or Q5_K_M, whichever the setting runs) is at most 0.010 (`Rule.max_kld`). Why 0.010:
   Q4_K_M itself costs a mean KLD of 0.0101 against BF16 on Qwen3-30B-A3B (ik_llama.cpp discussion
   #359, wiki.test, context 512; docs/architecture.md). Someone who runs Q4_K_M has accepted that
   much damage and no more: the bound lets demotion add at most as much again, so that the result
   stays about twice Q4_K_M's error, far nearer Q4_K_M than the next format down (on LLaMA-3-8B,
   Q3_K_M's KLD is 3.3× Q4_K_M's, 0.102 vs 0.031; llama.cpp's published table). KLDs of successive
   perturbations are not exactly additive; the bound is a budget, not a model of that sum.
   A policy whose KLD has no interval fails as "quality_unknown" unless `Rule.allow_point_kld`.
   Transfer to a proxy model (added 2026-12-06 after the first quality file of the 48-layer proxy
   model showed KLDs ~200× below a real model's, before the verdict was read): the bound is
   "as much again as Q4_K's own damage", so on a model whose own Q4_K-vs-float KLD is K it is
   `max_kld × kld_unit` with kld_unit = K / 0.0101 (`Rule.kld_unit`, 1 for Qwen3-30B-A3B itself).
   And a quality figure counts only at the operating point it was measured at: where the quality
   run served less gate mass at low precision than the speed replay does (columns
   `quality_low_mass` < `low_precision_mass`, when both are given), the KLD is unknown there.
   Operating-point curve (added 2026-12-06, before the 48-layer model's second quality file was read):
   the quality file also measures static demotion sized by gate mass (each layer's least-mass experts
   up to 10 / 25 / 50 % of its calibration mass); a static policy whose own row is lighter than its
   replay takes the KLD of the curve point of the same low format that served the least mass still
   ≥ the replay's (`analysis.decision.curve_quality`). This assumes a demotion's cost follows the gate
   mass it serves low; it never uses a lighter point.
   Cache-coupled rows (added 2026-12-07, after the third quality file was read; it changes no
   recommendation, which was checked before and after): issue 10 asks that the quality measured with
   the cache in the loop replace the every-access-a-miss figure. A policy takes, of its own row and
   its cache-coupled rows, the one with the least served low mass still ≥ the replay's
   (`analysis.decision.coupled_quality`); the curve applies only when none of those serves enough.

Among the policies that pass in a setting, the recommended one has the highest Δ lower bound
(ties: lower KLD, then higher Δ). A setting where none passes is a "reject". A verdict that changes
under a sensitivity scenario (PCIe bandwidth, low-bit compute speed, runtime reserve, context
length, SLRU protected share, ...) is reported as flipping inside that range.

Input: a pandas DataFrame, one row per (setting, policy[, scenario]):
    model (str), gpu (str), vram_gb (number), pcie (str)            — the setting (`SETTING_KEYS`)
    policy (str), signal (str), threshold (str/number), low_format (str)  — the policy (`POLICY_KEYS`;
        signal/threshold/low_format may be absent or empty); policy "native" rows are the baseline
        and never recommended
    delta, delta_lo, delta_hi (float) — relative Δ tok/s vs native and its 95 % interval (0.05 = +5 %)
    kld, kld_lo, kld_hi (float)       — mean per-token KLD vs the native model and its interval
    scenario (str, optional)          — sensitivity scenario; `BASE_SCENARIO` ("base") is the verdict,
                                        others are what-ifs of the same settings and policies
    baseline (str, optional)          — the native format's name for the paragraph (default "native")
Output: `assess` adds status columns per row, `decide` gives one row per setting, `sensitivity`
the flips, `paragraph` the one-paragraph verdict, `verdict` all of these together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

SETTING_KEYS = ("model", "gpu", "vram_gb", "pcie")
POLICY_KEYS = ("policy", "signal", "threshold", "low_format")
NUMERIC = ("delta", "delta_lo", "delta_hi", "kld", "kld_lo", "kld_hi")
BASE_SCENARIO = "base"
NATIVE_POLICY = "native"
MAX_FLIPS_NAMED = 8  # the paragraph names this many flips, then counts the rest


@dataclass(frozen=True)
class Rule:
    """The decision rule's constants (module docstring says why each value)."""

    min_gain: float = 0.05  # lower bound of the Δ tok/s interval must be ≥ this
    max_kld: float = 0.010  # upper bound of the KLD interval (vs native) must be ≤ this
    allow_point_kld: bool = False  # True: a row without kld_hi is judged on its point kld
    kld_unit: float = 1.0  # proxy model: its own Q4_K-vs-float KLD / Q4_K_M's 0.0101 (docstring)

    @property
    def kld_bound(self) -> float:
        """The KLD bound in the measured model's own units."""
        return self.max_kld * self.kld_unit

    def describe(self) -> str:
        """The rule in one sentence."""
        kld = "KLD (point estimate where no interval)" if self.allow_point_kld else "the upper bound of its KLD"
        return (f"recommend a policy for a setting only when the lower bound of its 95 % Δ tok/s interval "
                f"is ≥ {self.min_gain:+.0%} and {kld} against the native model is ≤ {self.max_kld:.3f}"
                + (f" × {self.kld_unit:.3g} (the measured model's own Q4_K loss in Q4_K_M units) = {self.kld_bound:.2e}"
                   if self.kld_unit != 1.0 else "")
                + ", measured at no less low-precision gate mass than the replay serves")


RULE = Rule()


def _check(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in (*SETTING_KEYS, "policy", *NUMERIC) if c not in df.columns]
    if missing:
        raise ValueError(f"verdict input lacks columns {missing} (contract in analysis/verdict.py)")
    out = df.copy()
    for c in POLICY_KEYS:
        if c not in out:
            out[c] = ""
        out[c] = out[c].fillna("").astype(str)
    if "scenario" not in out:
        out["scenario"] = BASE_SCENARIO
    for c in NUMERIC:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(np.float64)
    return out


def assess(df: pd.DataFrame, rule: Rule = RULE) -> pd.DataFrame:
    """Per row: gain_ok, quality_ok, passes and status ∈ {pass, gain_below, quality_fails,
    gain_below+quality_fails, quality_unknown, gain_unknown, baseline}."""
    out = _check(df)
    kld_bound = out["kld_hi"]
    if rule.allow_point_kld:
        kld_bound = kld_bound.fillna(out["kld"])
    if "quality_low_mass" in out and "low_precision_mass" in out:  # measured at a lighter operating point
        lighter = pd.to_numeric(out["quality_low_mass"], errors="coerce") < \
            pd.to_numeric(out["low_precision_mass"], errors="coerce") - 1e-9
        kld_bound = kld_bound.where(~lighter)
    gain_known = out["delta_lo"].notna()
    kld_known = kld_bound.notna()
    out["gain_ok"] = gain_known & (out["delta_lo"] >= rule.min_gain)
    out["quality_ok"] = kld_known & (kld_bound <= rule.kld_bound)
    baseline = out["policy"].str.lower() == NATIVE_POLICY
    out["passes"] = out["gain_ok"] & out["quality_ok"] & ~baseline
    status = np.full(len(out), "pass", dtype=object)
    status[(~out["gain_ok"] & gain_known).to_numpy()] = "gain_below"
    qf = (~out["quality_ok"] & kld_known).to_numpy()
    status[qf] = np.where(status[qf] == "gain_below", "gain_below+quality_fails", "quality_fails")
    status[(~kld_known).to_numpy()] = "quality_unknown"
    status[(~gain_known).to_numpy()] = "gain_unknown"
    status[baseline.to_numpy()] = "baseline"
    out["status"] = status
    return out


def _rank(frame: pd.DataFrame) -> pd.DataFrame:
    """Best first: highest Δ lower bound, then lower KLD, then higher Δ, then policy keys (stable)."""
    return frame.sort_values(["delta_lo", "kld", "delta", *POLICY_KEYS], ascending=[False, True, False, True, True,
                                                                               True, True], kind="mergesort")


def decide(df: pd.DataFrame, rule: Rule = RULE, scenario: str = BASE_SCENARIO) -> pd.DataFrame:
    """One row per setting of `scenario`: the recommended policy (or none) and the nearest miss.

    Columns: setting keys, recommended (bool), the policy keys and numbers of the chosen row
    (the recommendation, or else the candidate with the highest Δ lower bound), status of that row,
    n_policies (candidates, baseline excluded) and n_pass.
    """
    a = assess(df, rule)
    a = a[a["scenario"] == scenario]
    rows = []
    for key, g in a.groupby(list(SETTING_KEYS), sort=True, dropna=False):
        cand = g[g["status"] != "baseline"]
        passing = cand[cand["passes"]]
        pick = _rank(passing if len(passing) else cand)
        row = dict(zip(SETTING_KEYS, key))
        row["recommended"] = bool(len(passing))
        row["n_policies"] = int(len(cand))
        row["n_pass"] = int(len(passing))
        if len(pick):
            best = pick.iloc[0]
            for c in (*POLICY_KEYS, *NUMERIC, "status"):
                row[c] = best[c]
            if "baseline" in g:
                row["baseline"] = best["baseline"]
        rows.append(row)
    return pd.DataFrame(rows)


def sensitivity(df: pd.DataFrame, rule: Rule = RULE) -> pd.DataFrame:
    """Rows whose pass/fail under a non-base scenario differs from the base verdict.

    Columns: setting keys, policy keys, scenario, base_passes, passes, base_status, status,
    delta_lo, kld_hi (under the scenario). Empty when nothing flips or there are no scenarios.
    """
    a = assess(df, rule)
    a = a[a["status"] != "baseline"]
    keys = [*SETTING_KEYS, *POLICY_KEYS]
    base = a[a["scenario"] == BASE_SCENARIO].set_index(keys)[["passes", "status"]]
    other = a[a["scenario"] != BASE_SCENARIO]
    cols = [*keys, "scenario", "base_passes", "passes", "base_status", "status", "delta_lo", "kld_hi"]
    if other.empty or base.empty:
        return pd.DataFrame(columns=cols)
    j = other.join(base.rename(columns={"passes": "base_passes", "status": "base_status"}), on=keys, how="inner")
    flips = j[j["passes"] != j["base_passes"]]
    return flips[cols].reset_index(drop=True)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f} %"


def _setting(r) -> str:
    vram = f"{float(r['vram_gb']):g} GB"
    return f"{r['model']} on {r['gpu']} ({vram} VRAM, {r['pcie']})"


def _policy(r) -> str:
    parts = [str(r["policy"])]
    extra = []
    if str(r.get("signal", "")):
        extra.append(f"signal {r['signal']}")
    if str(r.get("threshold", "")):
        extra.append(f"threshold {r['threshold']}")
    if str(r.get("low_format", "")):
        extra.append(f"low format {r['low_format']}")
    return parts[0] + (f" ({', '.join(extra)})" if extra else "")


def _kld(x: float) -> str:
    """A KLD for the text: 4 decimals, or 2 significant digits below 0.001 (the 48-layer model's are ~1e-5)."""
    return f"{x:.4f}" if not np.isfinite(x) or abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _where(g: pd.DataFrame) -> str:
    """Settings compactly: per model and GPU, each VRAM size with its links ("on every link" when all)."""
    parts = []
    for (model, gpu), m in g.groupby(["model", "gpu"], sort=True):
        by_vram = []
        for vram, v in m.groupby("vram_gb", sort=True):
            links = sorted(set(v["pcie"]))
            by_vram.append(f"{float(vram):g} GB ({', '.join(links)})")
        parts.append(f"{model} on {gpu} at " + ", ".join(by_vram))
    return "[" + "; ".join(parts) + "]"


def _numbers(r) -> str:
    base = r.get("baseline", "") or "native"
    base = base if isinstance(base, str) and base else "native"
    kld = f"KLD {_kld(r['kld'])}"
    if np.isfinite(r["kld_lo"]) and np.isfinite(r["kld_hi"]):
        kld += f" [{_kld(r['kld_lo'])}, {_kld(r['kld_hi'])}]"
    elif not np.isfinite(r["kld"]):
        kld = "an unmeasured KLD"
    return (f"Δ tok/s {_pct(r['delta'])} [95 % interval {_pct(r['delta_lo'])}, {_pct(r['delta_hi'])}] at {kld} "
            f"against the {base} model")


_WHY = {
    "gain_below": "its speed gain's lower bound is under the threshold",
    "quality_fails": "its KLD bound exceeds the quality limit",
    "gain_below+quality_fails": "both its speed gain and its quality miss the rule",
    "quality_unknown": "its quality cost has not been measured (with an interval, at the low-precision gate mass this replay serves)",
    "gain_unknown": "its speed gain has no interval",
}


def paragraph(decisions: pd.DataFrame, flips: pd.DataFrame, rule: Rule = RULE, n_scenarios: int = 0) -> str:
    """The verdict in one paragraph: "Implement X for Y …" or "Reject …", plus any flips.

    `n_scenarios` is the number of sensitivity scenarios that were checked (for the closing sentence).
    """
    if decisions.empty:
        return "No verdict: the results hold no setting."
    n = len(decisions)
    rec = decisions[decisions["recommended"]]
    rule_txt = f"The rule: {rule.describe()}."
    if len(rec):
        groups = rec.groupby(list(POLICY_KEYS), sort=False, dropna=False)
        # headline: the policy recommended in most settings; ties → best median Δ lower bound
        ranked = sorted(groups, key=lambda kv: (-len(kv[1]), -float(kv[1]["delta_lo"].median())))
        _, head = ranked[0]
        best = _rank(head).iloc[0]
        text = f"Implement {_policy(best)} for {_setting(best)}: {_numbers(best)}. "
        if len(rec) > 1:
            where = "; ".join(f"{_policy(g.iloc[0])} for " + _where(g) for _, g in ranked)
            text += f"The rule is met in {len(rec)} of {n} settings ({where})"
        else:
            text += f"The rule is met in this 1 of {n} settings"
        text += "; reject everywhere else. " if len(rec) < n else ". "
    else:
        cand = decisions.dropna(subset=["delta_lo"]) if "delta_lo" in decisions else decisions.iloc[:0]
        text = f"Reject: no precision policy meets the rule in any of the {n} settings. "
        if len(cand):
            near = _rank(cand).iloc[0]
            text += (f"The nearest miss is {_policy(near)} for {_setting(near)}: {_numbers(near)}; "
                     f"it fails because {_WHY.get(near['status'], near['status'])}. ")
    text += rule_txt
    if len(flips):
        parts = []
        for _, f in flips.head(MAX_FLIPS_NAMED).iterrows():
            turn = "would pass" if f["passes"] else "fails"
            parts.append(f"{_policy(f)} for {_setting(f)} {turn} under '{f['scenario']}'")
        more = len(flips) - MAX_FLIPS_NAMED
        tail = f"; and {more} more (flips table)" if more > 0 else ""
        text += " This verdict is not robust inside the sensitivity range: " + "; ".join(parts) + tail + "."
    elif n_scenarios:
        text += f" No verdict flips under the {n_scenarios} sensitivity scenario(s) checked."
    else:
        text += " No sensitivity scenario was checked."
    return text


def setting_sentence(df: pd.DataFrame, model: str, vram_gb: float, pcie: str, rule: Rule = RULE) -> str | None:
    """The verdict for one setting (the engine's own, e.g. Qwen3-30B-A3B Q4_K_M on a 12 GB card) in words.

    Recommended: the policy and its numbers. Otherwise the fastest candidate and why it fails, and the
    fastest one whose quality passes (its gain is then what misses). None when the setting is absent.
    """
    a = assess(df, rule)
    a = a[(a["scenario"] == BASE_SCENARIO) & (a["model"] == model) & (a["vram_gb"].astype(float) == float(vram_gb))
          & (a["pcie"] == pcie) & (a["status"] != "baseline")]
    if a.empty:
        return None
    where = f"{model} on {a.iloc[0]['gpu']} ({float(vram_gb):g} GB VRAM, {pcie})"
    passing = a[a["passes"]]
    if len(passing):
        best = _rank(passing).iloc[0]
        return f"For {where}: implement {_policy(best)}: {_numbers(best)}."
    fast = _rank(a).iloc[0]
    text = (f"For {where}: reject. The fastest candidate, {_policy(fast)}, has {_numbers(fast)}; it fails because "
            f"{_WHY.get(fast['status'], fast['status'])}.")
    ok_q = a[a["quality_ok"]]
    if len(ok_q):
        q = _rank(ok_q).iloc[0]
        if q.name != fast.name:
            text += f" The fastest whose quality passes, {_policy(q)}, has {_numbers(q)}; its gain misses the threshold."
    else:
        text += " No candidate's quality passes here."
    return text


@dataclass
class Verdict:
    """Everything the decision section needs: per-row assessment, per-setting decision, flips, text."""

    rule: Rule
    rows: pd.DataFrame
    settings: pd.DataFrame
    flips: pd.DataFrame
    text: str

    def rule_dict(self) -> dict:
        """The rule's constants as a JSON-ready dict."""
        return asdict(self.rule)


def verdict(df: pd.DataFrame, rule: Rule = RULE) -> Verdict:
    """Apply `rule` to every setting of `df` (contract in the module docstring)."""
    rows = assess(df, rule)
    settings = decide(df, rule)
    flips = sensitivity(df, rule)
    n_scen = int(rows.loc[rows["scenario"] != BASE_SCENARIO, "scenario"].nunique())
    return Verdict(rule, rows, settings, flips, paragraph(settings, flips, rule, n_scen))


__all__ = ["BASE_SCENARIO", "NATIVE_POLICY", "POLICY_KEYS", "RULE", "Rule", "SETTING_KEYS", "Verdict", "assess",
           "decide", "paragraph", "sensitivity", "setting_sentence", "verdict"]
