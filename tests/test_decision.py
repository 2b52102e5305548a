"""The decision map: its panels against the reference engine, per-sequence units, quality mapping, and
the report's Decision section on constructed inputs whose verdict is known."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import decision as D
from analysis import mapsweep as M
from analysis import report
from sim.simulate import Prepared, ReplayConfig, run_prepared
from sim.synth import preset, synthesize


@pytest.fixture(scope="module")
def quick_sweep():
    """The committed single-trace sweeps (the report's earlier sections need some)."""
    return Path(__file__).resolve().parents[1] / "results" / "sweeps"


@pytest.fixture(scope="module")
def small_map():
    trace = synthesize(preset("mixtral-8x7b", n_seqs=4, prefill_tokens=4, decode_tokens=24, seed=1,
                              predict_accuracy=0.8))
    panels = (
        M.MapPanel("map", ("mixtral-8x7b:q4_k_m",), (8, 12), ("gen3x16", "gen5x16"), ("slru", "lru"),
                   ("native", "static:mass:50%:q2_k", M.DYN, M.DYN_SERVE)),
        M.MapPanel("hobbit", ("mixtral-8x7b:q4_k_m",), (12,), ("gen4x16",), ("hobbit",), ("native", M.DYN_SERVE),
                   ("none", "trace")),
        M.MapPanel("sens", ("mixtral-8x7b:q4_k_m",), (12,), ("gen3x16",), ("slru",),
                   ("native", "static:mass:50%:q2_k"), scenario="lowbit-native-speed", lowbit_native_speed=True),
    )
    rows, units, facts = M.run_map(panels, {"mixtral-8x7b": trace})
    return trace, panels, rows, units, facts


def test_map_rows_equal_the_reference_engine(small_map):
    """Every base/hobbit row equals a direct sim.simulate replay on the reference path (fast=False)."""
    trace, panels, rows, _, _ = small_map
    assert len(rows) == 2 * 2 * 2 * 4 + 2 * 2 + 2
    for _, r in rows[rows["scenario"] == "base"].iterrows():
        panel = next(p for p in panels if p.name == r["panel"])
        hw = M._hw(panel, r["vram_gb"], r["pcie"])
        model = M.get_model(f"{r['model']}:{r['native']}")
        prep = Prepared(trace, model, hw, calib_fraction=M.CALIB_SEQS / 4, ubatch=512, prefetch=r["prefetch"],
                        seed=0, context=4096)
        cfg = ReplayConfig(trace=trace, policy=r["policy"], precision=r["precision"], prefetch=r["prefetch"],
                           calib_fraction=M.CALIB_SEQS / 4, capacity_bytes=int(r["capacity_bytes"]), fast=False)
        rec = run_prepared(prep, cfg)
        assert rec.hit_rate == pytest.approx(r["hit_rate"], abs=1e-8)
        assert rec.tokens_per_s == pytest.approx(r["tokens_per_s"], rel=1e-6)
        assert rec.low_precision_mass == pytest.approx(r["low_precision_mass"], abs=1e-6)


def test_units_add_up_to_the_record(small_map):
    _, _, rows, units, _ = small_map
    g = units.groupby("config_id").agg(tokens=("tokens", "sum"), time_s=("time_s", "sum"), hits=("hits", "sum"),
                                       accesses=("accesses", "sum"))
    m = rows.set_index("config_id").join(g.add_suffix("_u"))
    np.testing.assert_array_equal(m["tokens"], m["tokens_u"])
    np.testing.assert_array_equal(m["accesses"], m["accesses_u"])
    np.testing.assert_allclose(m["tokens_u"] / m["time_s_u"], m["tokens_per_s"], rtol=1e-6)
    np.testing.assert_allclose(m["hits_u"] / m["accesses_u"], m["hit_rate"], rtol=1e-9)
    assert set(units["unit"]) == {2, 3}  # the two evaluation sequences (the first two calibrate)


def test_lowbit_native_speed_scenario_slows_only_low_bit_policies(small_map):
    _, _, rows, _, _ = small_map
    key = ["vram_gb", "pcie", "policy", "precision"]
    base = rows[(rows["scenario"] == "base") & (rows["pcie"] == "gen3x16") & (rows["vram_gb"] == 12)].set_index(key)
    sens = rows[rows["scenario"] == "lowbit-native-speed"].set_index(key)
    j = sens.join(base.add_suffix("_b"), how="inner")
    nat = j.xs("native", level="precision")
    assert (nat["tokens_per_s"] == nat["tokens_per_s_b"]).all()
    low = j.xs("static:mass:50%:q2_k", level="precision")
    assert (low["tokens_per_s"] < low["tokens_per_s_b"]).all()
    assert (low["hit_rate"] == low["hit_rate_b"]).all()  # same replay, only compute re-priced


def test_quality_spec_mapping():
    assert D.quality_spec("static-mass-0.25-q2r") == "static:mass:25%:q2_k"
    assert D.quality_spec("static-mass-0.5-q3r") == "static:mass:50%:q3_k"
    assert D.quality_spec("dynamic-0.6-0.9-q2r") == "dynamic:0.6:0.9:q2_k"
    # tensor-aware rows (ffn_gate/ffn_up at Q2_K, ffn_down kept) are the simulator's q2_k_gu
    assert D.quality_spec("static-mass-0.5-ta") == "static:mass:50%:q2_k_gu"
    assert D.quality_spec("dynamic-0.6-0.9-ta") == "dynamic:0.6:0.9:q2_k_gu"
    assert D.quality_spec("all-ta") is None and D.quality_spec("static-mass-0.5-q4r") is None


def _write_map(folder, gain_static: float, gain_dyn: float):
    """A constructed map: one setting, 8 sequences; native takes 1 s per sequence, the others 1/(1+gain)."""
    rows, units = [], []
    for cid, (prec, gain) in enumerate((("native", 0.0), ("static:mass:50%:q2_k", gain_static),
                                        ("dynamic:0.6:0.9:q2_k:serve", gain_dyn))):
        rows.append({"config_id": cid, "panel": "map", "scenario": "base", "trace": "qwen3-30b-a3b", "model": "qwen3-30b-a3b",
                         "native": "q4_k_m", "vram_gb": 12, "pcie": "gen4x16", "policy": "slru", "protected_share": None,
                         "prefetch": "none", "precision": prec, "low_copy": "", "capacity_bytes": 1, "capacity_fraction": 0.5,
                         "hit_rate": 0.9, "tokens_per_s": 100 * (1 + gain), "stall_fraction": 0.1, "bytes_per_token": 1.0,
                         "low_precision_mass": 0.1, "skipped_mass": 0.0, "tokens": 800, "accesses": 8000})
        for u in range(8):
            jitter = 1 + 0.01 * (u % 3)  # sequences differ in length of time, alike across policies
            units.append({"config_id": cid, "unit": u, "tokens": 100, "time_s": jitter / (1 + gain), "hits": 900,
                              "accesses": 1000})
    pd.DataFrame(rows).to_csv(folder / "map-test.csv", index=False)
    pd.DataFrame(units).to_csv(folder / "map-test.units.csv", index=False)
    (folder / "map-test.json").write_text(json.dumps({"command": "constructed", "wall_s": 1.0, "traces": {},
                                                      "pressure": {}, "fits": []}))


def _quality(path, kld_static: float):
    rows = [{"name": "q4_k", "reference": "q4_k", "kld": 0.0, "kld_ci": [0.0, 0.0]},
            {"name": "static-mass-0.5-q2r", "reference": "q4_k", "kld": kld_static,
             "kld_ci": [kld_static * 0.9, kld_static * 1.1]}]
    path.write_text(json.dumps({"command": "constructed", "model": {"n_layers": 48, "n_experts": 128, "top_k": 8}, "rows": rows,
                                "pairs": [], "setup": {"eval_chunks": 4, "n_ctx": 64}, "train": {}}))


@pytest.mark.parametrize("gain,kld,expect", [
    (0.20, 0.001, "Implement static (signal mass, threshold bottom 50%, low format Q2_K) for qwen3-30b-a3b Q4_K_M"),
    (0.03, 0.001, "Reject: no precision policy meets the rule in any of the 1 settings"),
    (0.20, 0.05, "Reject: no precision policy meets the rule in any of the 1 settings"),
])
def test_report_decision_section_on_constructed_inputs(tmp_path, quick_sweep, gain, kld, expect):
    mdir = tmp_path / "map"
    mdir.mkdir()
    _write_map(mdir, gain, 0.30)
    _quality(tmp_path / "quality-48l.json", kld)
    md, _ = report.generate(quick_sweep, str(tmp_path / "none*.json"), tmp_path / "d.md", tmp_path / "f", png=False,
                            map_dir=mdir, quality48_glob=str(tmp_path / "quality-48*.json"),
                            offload_glob=str(tmp_path / "none*.json"))
    decision = md.split("## Decision", 1)[1].split("## Earlier single-trace results", 1)[0]
    # the earlier single-trace sections (no intervals) move to their own page, linked from the decision page
    assert "## The question" not in md and "(earlier-results.md)" in md
    assert "## The question" in (tmp_path / "earlier-results.md").read_text()
    assert expect in decision
    # the serve variant is faster but has no quality measurement: never recommended
    assert "HOBBIT dynamic (serve)" not in decision.split("**Verdict.**")[1].split("\n")[0].split(":")[0]
    assert "quality_unknown" in decision
    if gain == 0.20:
        assert "+20.0 %" in decision


def test_report_says_so_without_quality(tmp_path, quick_sweep):
    mdir = tmp_path / "map"
    mdir.mkdir()
    _write_map(mdir, 0.20, 0.30)
    md, _ = report.generate(quick_sweep, str(tmp_path / "none*.json"), tmp_path / "d.md", tmp_path / "f", png=False,
                            map_dir=mdir, quality48_glob=str(tmp_path / "none-48*.json"),
                            offload_glob=str(tmp_path / "none*.json"))
    assert "Quality: not measured for these policies." in md
    assert "Reject: no precision policy meets the rule" in md
    assert "its quality cost has not been measured (with an interval" in md


def test_report_without_map_has_no_verdict(tmp_path, quick_sweep):
    md, _ = report.generate(quick_sweep, str(tmp_path / "none*.json"), tmp_path / "d.md", tmp_path / "f", png=False)
    assert "**No verdict yet.**" in md


def test_measured_beside_simulated(tmp_path):
    res = [{"trace": "t.npz", "budget": "30%", "policy": "slru", "precision": p, "tokens_per_s_mean": m,
            "tokens_per_s_ci95": [m - 1, m + 1], "sim_tokens_per_s": s}
           for p, m, s in (("native", 50.0, 60.0), ("static:mass:30%:q2_k", 55.0, 69.0))]
    (tmp_path / "gpu-grid.json").write_text(json.dumps({"command": "c", "device": {"platform": "gpu",
                                                         "device_kind": "H100"}, "results": res}))
    t = D.measured_table(D.load_offload(str(tmp_path / "*.json")))
    assert len(t) == 1
    r = t.iloc[0]
    assert (r["measured Δ tok/s [95 % CI, paired by round]"], r["simulated Δ tok/s"],
            r["error (sim − measured)"]) == ("+10.0 %", "+15.0 %", "+5.0 %")
    assert r["policy tok/s [95 % CI]"] == "55.0 [54.0, 56.0]"


def test_measured_delta_paired_by_round_and_validation_replaces_its_grid(tmp_path):
    """Interleaved rounds: Δ is the mean of per-round ratios with a t-interval; a validation file hides its grid."""
    runs = {"native": [40.0, 50.0, 45.0], "static:mass:30%:q2_k": [44.0, 55.0, 45.0]}
    res = [{"trace": "t.npz", "budget": "30%", "policy": "slru", "precision": p, "copy_path": "raw",
            "tokens_per_s": v, "tokens_per_s_mean": float(np.mean(v)), "tokens_per_s_ci95": [0.0, 99.0]}
           for p, v in runs.items()]
    dev = {"platform": "gpu", "device_kind": "H100"}
    (tmp_path / "grid.json").write_text(json.dumps({"command": "c", "device": dev, "rounds": 3, "results": res}))
    val = [dict(r, sim_tokens_per_s=s) for r, s in zip(res, (50.0, 52.0))]
    (tmp_path / "val.json").write_text(json.dumps({"kind": "validation", "grid": "grid.json", "device": dev,
                                                   "rounds": 3, "results": val}))
    recs = D.load_offload(str(tmp_path / "*.json"))
    assert {r["file"] for r in recs} == {"val.json"}
    t = D.measured_table(recs)
    assert len(t) == 1
    d = np.array([0.1, 0.1, 0.0])  # per-round ratios − 1
    half = 4.303 * d.std(ddof=1) / np.sqrt(3)
    want = f"+{d.mean() * 100:.1f} % [{(d.mean() - half) * 100:+.1f} %, +{(d.mean() + half) * 100:.1f} %]"
    assert t.iloc[0]["measured Δ tok/s [95 % CI, paired by round]"] == want
    assert t.iloc[0]["simulated Δ tok/s"] == "+4.0 %"
    # the summary: tok/s error per cell, and the simulated Δ against the measured one (|+4.0 − 6.7| points)
    v = D.validation_summary(recs).iloc[0]
    assert (v["configurations"], v["within ±5 %"]) == (2, "0 of 2")  # errors 50/45 − 1 = +11 %, 52/48 − 1 = +8 %
    assert v["Δ tok/s, sim − measured: mean / max abs. (points)"] == f"{(d.mean() - 0.04) * 100:.1f} / {(d.mean() - 0.04) * 100:.1f} (1 low-bit)"
    assert v["simulated Δ inside the measured Δ's 95 % CI"] == "1 of 1"


def test_static_policy_takes_its_kld_from_the_gate_mass_curve_at_or_above_its_operating_point(tmp_path):
    """The policy's own row served 5 % of gate mass low, the replay serves 10 %: its own KLD does not count;
    the curve point with the least served mass ≥ 10 % does (never a lighter one, never a heavier one than needed)."""
    mdir = tmp_path / "map"
    mdir.mkdir()
    _write_map(mdir, 0.20, 0.30)  # low_precision_mass 0.1 in every replay row
    q = {"name": "q4_k", "reference": "float", "kld": 1e-4, "kld_ci": [0.9e-4, 1.1e-4]}
    rows = [q, {"name": "q4_k", "reference": "q4_k", "kld": 0.0, "kld_ci": [0.0, 0.0]},
            {"name": "static-mass-0.5-q2r", "reference": "q4_k", "kld": 1e-9, "kld_ci": [0.0, 2e-9], "low_mass": 0.05}]
    curve = {"static-gm-0.1-q2r": (0.08, 1e-8), "static-gm-0.25-q2r": (0.12, 3e-6), "static-gm-0.5-q2r": (0.3, 1e-3),
             "static-gm-0.25-q3r": (0.12, 1e-12)}  # a Q3_K point must not stand in for a Q2_K policy
    for name, (mass, kld) in curve.items():
        rows.append({"name": name, "reference": "q4_k", "kld": kld, "kld_ci": [kld * 0.9, kld * 1.1], "low_mass": mass})
    (tmp_path / "quality-48l.json").write_text(json.dumps({"command": "constructed", "rows": rows, "pairs": [],
                                                          "model": {"n_layers": 48, "n_experts": 128, "top_k": 8},
                                                          "setup": {"eval_chunks": 4, "n_ctx": 64}, "train": {}}))
    dec = D.decision(mdir, str(tmp_path / "quality-48l.json"))
    r = dec["verdict_input"].set_index("precision").loc["static:mass:50%:q2_k"]
    assert r["quality_row"] == "static-gm-0.25-q2r"
    assert (r["kld"], r["kld_hi"], r["quality_low_mass"]) == (3e-6, 3e-6 * 1.1, 0.12)
    assert D.curve_quality("q2_k", 0.31, dec["quality_facts"]["mass_curve"]) is None  # beyond the curve: unknown
    # bound = 0.010 × (1e-4 / 0.0101) ≈ 9.9e-5: 3.3e-6 passes, so the policy is recommended
    assert dec["verdict"].settings["recommended"].sum() == 1


def test_dynamic_policy_takes_the_lightest_coupled_row_that_serves_the_replays_mass(tmp_path):
    """Issue 10 item 4: a coupled row replaces the every-access-a-miss row when it is the lightest one that
    still served at least the replay's low-precision mass; a lighter coupled row never counts."""
    rows = [{"name": "q4_k", "reference": "float", "kld": 1e-4, "kld_ci": [0.9e-4, 1.1e-4]},
            {"name": "dynamic-0.6-0.9-q2r", "reference": "q4_k", "kld": 1e-3, "kld_ci": [0.9e-3, 1.1e-3], "low_mass": 0.3}]
    coupled = [{"name": f"coupled dynamic:0.6:0.9 @ {b}", "precision": "dynamic:0.6:0.9", "reference": ref,
                "low_mass": m, "kld": k, "kld_ci": [k * 0.9, k * 1.1]}
               for b, m, k in (("derived", 0.05, 1e-5), ("4GiB", 0.2, 1e-4)) for ref in ("float", "q4_k")]
    path = tmp_path / "quality-48l.json"
    path.write_text(json.dumps({"command": "constructed", "rows": rows, "pairs": [], "coupled": coupled,
                                "model": {"n_layers": 48, "n_experts": 128, "top_k": 8},
                                "setup": {"eval_chunks": 4, "n_ctx": 64}, "train": {}}))
    quality, facts = D.load_quality48(str(path))
    cq = facts["coupled_quality"]
    assert [c["name"] for c in cq] == ["coupled dynamic:0.6:0.9 @ derived", "coupled dynamic:0.6:0.9 @ 4GiB"]
    assert {c["precision"] for c in cq} == {"dynamic:0.6:0.9:q2_k"}  # parsed to the sweep's spelling
    own = {"name": "policy", "low_mass": 0.3}
    assert D.coupled_quality("dynamic:0.6:0.9:q2_k", 0.1, own, cq)["name"] == "coupled dynamic:0.6:0.9 @ 4GiB"
    assert D.coupled_quality("dynamic:0.6:0.9:q2_k", 0.04, own, cq)["name"] == "coupled dynamic:0.6:0.9 @ derived"
    assert D.coupled_quality("dynamic:0.6:0.9:q2_k", 0.25, own, cq)["name"] == "policy"  # only the own row serves enough
    assert D.coupled_quality("dynamic:0.6:0.9:q2_k", 0.35, own, cq) is None  # heavier than every row: unknown
    assert D.coupled_quality("dynamic:0.6:0.9:q2_k:serve", 0.01, None, cq) is None  # another rule: not this row
    speed = pd.DataFrame([{"policy": "slru", "prefetch": "none", "panel": "map", "scenario": "base", "protected_share": None,
                           "precision": p, "model": "qwen3-30b-a3b", "native": "q4_k_m", "vram_gb": 12, "pcie": "gen4x16",
                           "delta": d, "delta_lo": d, "delta_hi": d, "n_units": 8, "hit_rate": 0.9, "hit_rate_lo": 0.9,
                           "hit_rate_hi": 0.9, "low_precision_mass": m}
                          for p, d, m in (("native", 0.0, 0.0), ("dynamic:0.6:0.9:q2_k", 0.1, 0.1))])
    vin = D.verdict_input(speed, quality, facts["mass_curve"], cq).set_index("precision")
    assert vin.at["dynamic:0.6:0.9:q2_k", "quality_row"] == "coupled dynamic:0.6:0.9 @ 4GiB"
    assert vin.at["dynamic:0.6:0.9:q2_k", "kld_hi"] == pytest.approx(1.1e-4)
