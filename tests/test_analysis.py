"""analysis/: the sweep grid (columns, determinism, agreement with sim.replay), the charts' encodings
and the report's numbers (parsed back from decision.md and compared with the input CSV)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import charts, report, sweep
from sim.precision import parse_precision
from sim.simulate import ReplayConfig, run

ROOT = Path(__file__).resolve().parents[1]
GPU = "rtx3060-12gb"


@pytest.fixture(scope="module")
def quick_sweep(tiny_trace, tmp_path_factory) -> Path:
    """results/sweeps-like folder holding the --quick sweep of the tiny trace."""
    out = tmp_path_factory.mktemp("sweeps")
    sweep.main([str(tiny_trace), "--name", "tiny", "--quick", "--gpu", GPU, "--out", str(out), "-q", "--scheduler", "serial"])
    return out


# ------------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------------

def test_quick_sweep_columns_rows_and_per_layer(quick_sweep):
    frame = pd.read_csv(quick_sweep / "tiny.csv")
    assert tuple(frame.columns) == sweep.SWEEP_COLUMNS
    expected = sweep.expand_grid(sweep.GRIDS["quick"], (GPU,))
    assert len(frame) == len(expected)  # a 12 GB GPU has a VRAM-derived budget: nothing skipped
    assert list(frame["config_id"]) == list(range(len(frame)))
    got = list(zip(frame["policy"], frame["budget"]))
    assert got == [(c.policy, c.budget) for c in expected]
    # belady never runs with dynamic precision
    assert not ((frame["policy"] == "belady") & frame["precision"].str.contains("dynamic")).any()
    # parsed precision columns
    st = frame[frame["precision"] == "static:mass:30%:q2_k"].iloc[0]
    assert (st["static_signal"], st["static_fraction"], st["static_format"]) == ("mass", 0.3, "q2_k")
    assert np.isnan(st["t1"])
    dy = frame[frame["precision"] == "dynamic:0.6:0.9:q2_k"].iloc[0]
    assert (dy["t1"], dy["t2"], dy["dynamic_format"]) == (0.6, 0.9, "q2_k") and pd.isna(dy["static_signal"])
    layers = pd.read_csv(quick_sweep / "tiny.per_layer.csv")
    assert tuple(layers.columns) == sweep.PER_LAYER_COLUMNS
    assert len(layers) == 48 * len(frame)
    prov = json.loads((quick_sweep / "tiny.json").read_text())
    assert prov["configs"] == len(frame) and prov["grid"] == "quick" and prov["n_layers"] == 48


def test_sweep_rows_equal_direct_replay(quick_sweep, tiny_trace):
    """Each row is exactly sim.replay.run of the same configuration (an independent end-to-end call)."""
    frame = pd.read_csv(quick_sweep / "tiny.csv")
    for (pol, prec, budget) in [("slru", "static:mass:30%:q2_k", "30%"), ("lru", "dynamic:0.6:0.9", "vram")]:
        name = parse_precision(prec).name
        row = frame[(frame["policy"] == pol) & (frame["precision"] == name) & (frame["budget"] == budget)].iloc[0]
        cap = None if budget == "vram" else int(0.3 * row["capacity_bytes"] / row["capacity_fraction"] + 0.5)
        rec = run(ReplayConfig(trace=str(tiny_trace), gpu=GPU, policy=pol, precision=prec, capacity_bytes=cap))
        if cap is not None:
            assert abs(rec.capacity_bytes - row["capacity_bytes"]) <= 1
        else:
            assert rec.capacity_bytes == row["capacity_bytes"]
        for k in ("hits", "misses", "accesses", "demand_bytes", "skipped"):
            assert getattr(rec, k) == row[k], k
        for k in ("hit_rate", "tokens_per_s", "low_precision_mass", "bytes_per_token"):
            assert getattr(rec, k) == pytest.approx(row[k], rel=1e-8), k


def test_sweep_deterministic(quick_sweep, tiny_trace, tmp_path):
    sweep.main([str(tiny_trace), "--name", "tiny", "--quick", "--gpu", GPU, "--out", str(tmp_path), "-q", "--scheduler", "serial"])
    for name in ("tiny.csv", "tiny.per_layer.csv", "tiny.json"):
        assert (tmp_path / name).read_bytes() == (quick_sweep / name).read_bytes(), name


def test_sweep_bad_input_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope.npz"
    p = subprocess.run([sys.executable, "-m", "analysis.sweep", str(missing), "--name", "x", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, check=False)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "nope.npz" in p.stderr
    assert not list(tmp_path.glob("x*"))
    with pytest.raises(SystemExit) as e:
        sweep.main([str(missing), "--name", "../evil", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_default_grid_shape():
    """The documented default grid: belady only static/native, every panel has its native baseline."""
    cfgs = sweep.expand_grid(sweep.GRIDS["default"], sweep.DEFAULT_GPUS)
    assert len(cfgs) == len(set(cfgs))
    natives = {(c.gpu, c.policy, c.budget) for c in cfgs if c.precision == "native"}
    assert all((c.gpu, c.policy, c.budget) in natives for c in cfgs)
    assert {c.gpu for c in cfgs} == set(sweep.DEFAULT_GPUS)
    assert len([c for c in cfgs if c.precision.startswith("static:") and "+" not in c.precision
                and c.budget == "vram" and c.gpu == "rtx3060-12gb" and c.policy == "slru"
                and c.protected_share == sweep.DEFAULT_PROTECTED_SHARE]) == 32


# ------------------------------------------------------------------------------------------------
# charts
# ------------------------------------------------------------------------------------------------

def _frame() -> pd.DataFrame:
    rows = []
    for budget, frac in (("20%", 0.2), ("40%", 0.4), ("vram", 0.6)):
        for prec, tps, low in (("native", 50.0, 0.0), ("static:mass:30%:q2_k", 60.0, 0.1),
                               ("static:mass:30%:q3_k", 55.0, 0.1), ("dynamic:0.6:0.9:q2_k", 45.0, 0.05)):
            for gpu, scale in (("rtx3060-12gb", 1.0), ("rtx4070-12gb", 1.5)):
                rows.append({"trace": "t", "gpu": gpu, "policy": "slru", "partition": "global", "prefetch": "none",
                                 "phase": "decode", "budget": budget, "budget_kind": "derived" if budget == "vram" else "fraction",
                                 "capacity_bytes": int(frac * 1e9), "capacity_fraction": frac, "precision": prec,
                                 "hit_rate": 0.5 + frac / 2 + low, "tokens_per_s": tps * scale * (1 + frac),
                                 "bytes_per_token": 1e7 * (1 - frac), "low_precision_mass": low,
                                 "skipped_mass": 0.01 if "dynamic" in prec else 0.0})
    return pd.DataFrame(rows)


def test_with_native_baseline_matches_hand_values():
    f = charts.with_native_baseline(_frame())
    r = f[(f["precision"] == "static:mass:30%:q2_k") & (f["gpu"] == "rtx4070-12gb") & (f["budget"] == "40%")].iloc[0]
    assert r["tokens_per_s_native"] == pytest.approx(50 * 1.5 * 1.4)
    assert r["speedup"] == pytest.approx(60 / 50 - 1)
    assert r["delta_tokens_per_s"] == pytest.approx((60 - 50) * 1.5 * 1.4)
    assert (f[f["precision"] == "native"]["speedup"] == 0).all()


def _enc(spec: dict) -> dict:
    """The encoding of the first layer (or the single chart) of a faceted/layered spec."""
    inner = spec.get("spec", spec)
    if "layer" in inner:
        inner = inner["layer"][0]
    return inner["encoding"]


def test_line_charts_encodings():
    f = _frame()
    spec = charts.hit_rate_vs_budget(f).to_dict()
    enc = _enc(spec)
    assert enc["x"]["field"] == "budget_pct" and enc["y"]["field"] == "hit_rate"
    assert enc["color"]["field"] == "precision_label"
    assert spec["facet"]["field"] == "policy"
    spec = charts.tokens_per_s_vs_budget(f).to_dict()
    assert _enc(spec)["y"]["field"] == "tokens_per_s" and spec["facet"]["field"] == "gpu"
    spec = charts.bytes_per_token_vs_budget(f).to_dict()
    assert _enc(spec)["y"]["field"] == "mb_per_token"
    data = next(iter(spec["datasets"].values()))
    by = {(d["precision"], d["budget"], d["gpu"]): d["mb_per_token"] for d in data}
    assert by[("native", "20%", "rtx3060-12gb")] == pytest.approx(8.0)  # 1e7 × 0.8 bytes = 8 MB


def test_low_mass_vs_gain_values():
    f = charts.with_native_baseline(_frame())
    spec = charts.low_mass_vs_gain(f[f["budget"] == "vram"]).to_dict()
    enc = _enc(spec)
    assert enc["x"]["field"] == "degraded_pct" and enc["y"]["field"] == "gain_pct"
    assert enc["shape"]["field"] == "low_format"
    data = next(iter(spec["datasets"].values()))
    assert all(d["precision"] != "native" for d in data)
    dyn = next(d for d in data if d["precision"].startswith("dynamic"))
    assert dyn["degraded_pct"] == pytest.approx(6.0) and dyn["gain_pct"] == pytest.approx(-10.0)


@pytest.mark.parametrize("row,expected", [
    ({"policy": "static:mass:30%:q2_k"}, "static:mass:30%:q2_k"),
    ({"signal": "mass", "fraction": 0.3, "format": "q2_k"}, "static:mass:30%:q2_k"),
    ({"signal": "freq", "fraction": "20%", "format": "Q3_K"}, "static:freq:20%:q3_k"),
    ({"signal": "weight", "fraction": 50, "format": "q2_k"}, "static:weight:50%:q2_k"),
    ({"t1": 0.6, "t2": 0.9, "format": "q2_k"}, "dynamic:0.6:0.9:q2_k"),
    ({"policy": "hobbit", "t1": 0.6, "t2": 0.9}, "dynamic:0.6:0.9:q2_k"),
    ({"policy": "native"}, "native"),
])
def test_quality_precision_canonical(row, expected):
    assert charts.quality_precision(row) == expected


def test_quality_join_and_chart():
    sim = charts.with_native_baseline(_frame())
    sim = sim[(sim["gpu"] == GPU) & (sim["budget"] == "vram")]
    q = pd.DataFrame([{"policy": "x", "signal": "mass", "fraction": 0.3, "format": "q2_k", "kld": 0.05, "ppl": 10.0},
                      {"policy": "y", "signal": "mass", "fraction": 0.3, "format": "q3_k", "kld": 0.02, "ppl": 9.8},
                      {"policy": "z", "signal": "random", "fraction": 0.1, "format": "q2_k", "kld": 0.3, "ppl": 11.0}])
    j = charts.join_quality(sim, q)
    assert sorted(j["precision"]) == ["static:mass:30%:q2_k", "static:mass:30%:q3_k"]  # random 10 % not simulated
    r = j[j["precision"] == "static:mass:30%:q2_k"].iloc[0]
    assert r["kld"] == 0.05 and r["delta_tokens_per_s"] == pytest.approx(10 * 1.6)
    enc = _enc(charts.quality_vs_speed(j).to_dict())
    assert enc["x"]["field"] == "kld" and enc["y"]["field"] == "delta_tokens_per_s"


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def _table_after(md: str, heading_start: str) -> list[dict]:
    """Parse the first markdown table following a line starting with `heading_start`."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(heading_start))
    while not lines[i].startswith("|"):
        i += 1
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _pct(s: str) -> float:
    return float(s.replace("%", "").replace("+", "").strip()) / 100


def test_report_numbers_equal_csv_and_quality_pending(quick_sweep, tmp_path):
    doc, figs = tmp_path / "decision.md", tmp_path / "figures"
    md, paths = report.generate(quick_sweep, str(tmp_path / "quality*.json"), doc, figs, png=True)
    assert doc.read_text() == md
    assert paths and all(p.exists() and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    for p in paths:  # every figure the document links exists
        assert f"figures/{p.name}" in md
    csv = pd.read_csv(quick_sweep / "tiny.csv")
    rows = _table_after(md, "**Key precision policies**")
    assert len(rows) == 6  # 2 budgets × native, mass 30 % Q2_K, dynamic
    for r in rows:
        prec = r["precision"].strip("`")
        budget = "vram" if r["budget"].startswith("12 GB") else r["budget"].split()[0]
        c = csv[(csv["policy"] == "slru") & (csv["precision"] == prec) & (csv["budget"] == budget)].iloc[0]
        nat = csv[(csv["policy"] == "slru") & (csv["precision"] == "native") & (csv["budget"] == budget)].iloc[0]
        assert float(r["tok/s"]) == pytest.approx(c["tokens_per_s"], abs=0.05)
        assert float(r["hit rate"]) == pytest.approx(c["hit_rate"], abs=5e-4)
        assert float(r["MB/token"]) == pytest.approx(c["bytes_per_token"] / 1e6, abs=0.05)
        assert _pct(r["Δ tok/s"]) == pytest.approx(c["tokens_per_s"] / nat["tokens_per_s"] - 1, abs=5e-4)
        assert _pct(r["low-prec. mass"]) == pytest.approx(c["low_precision_mass"], abs=5e-4)
    # the answer bullet quotes the same baseline numbers
    nat = csv[(csv["policy"] == "slru") & (csv["precision"] == "native") & (csv["budget"] == "vram")].iloc[0]
    m = re.search(r"\*\*tiny\*\*: hit rate ([0-9.]+), ([0-9.]+) tok/s", md)
    assert m and float(m.group(1)) == pytest.approx(nat["hit_rate"], abs=5e-4)
    assert float(m.group(2)) == pytest.approx(nat["tokens_per_s"], abs=0.05)
    quality = md.split("## Quality", 1)[1].split("## Caveats", 1)[0]
    assert "**Pending.**" in quality and "KLD" in quality and not re.search(r"\d\.\d", quality)
    assert "Quality: pending" in md.split("## Method", 1)[0]


def _qrow(policy, precision, *, signal=None, fraction=None, fmt="q4_k", source=None, reference="q4_k",
          t1=None, t2=None, low=0.0, skip=0.0, ppl=12.5, kld=0.0, top1=1.0) -> dict:
    """One row shaped like jaxmoe.quality.make_row's (keys ROW_KEYS)."""
    return {"policy": policy, "precision": precision, "signal": signal, "fraction": fraction, "format": fmt,
            "source": source, "reference": reference, "t1": t1, "t2": t2, "low_mass": low, "skipped_mass": skip,
            "ppl": ppl, "ppl_ci": [ppl * 0.99, ppl * 1.01], "ppl_ratio": ppl / 12.5, "ppl_ratio_ci": [1.0, 1.1],
            "kld": kld, "kld_ci": [kld * 0.9, kld * 1.1], "top1": top1, "top1_ci": [top1 - 0.01, top1],
            "dp": -0.001, "dp_ci": [-0.002, 0.0], "n_tokens": 4080, "n_chunks": 16}


QUALITY_ROWS = [
    _qrow("native", "native"),
    _qrow("native", "native", fmt="f32", kld=0.002, ppl=12.4),  # the float model against Q4_K
    _qrow("native", "native", reference="float", kld=0.003),  # Q4_K against the float model
    _qrow("static", "static:mass:30%:q2_k", signal="mass", fraction=0.3, fmt="q2_k", source="q4_k",
          low=0.12, ppl=12.9876, kld=0.0421, top1=0.913),
    _qrow("static", "static:mass:30%:q3_k", signal="mass", fraction=0.3, fmt="q3_k", source="q4_k",
          low=0.12, ppl=12.61, kld=0.0107, top1=0.962),
    _qrow("static", "static:mass:30%:q2_k", signal="mass", fraction=0.3, fmt="q2_k", source="float",
          low=0.12, ppl=12.9, kld=0.0388, top1=0.92),  # compounding row: same precision, float-sourced
    _qrow("dynamic", "dynamic:0.6:0.9:q2_k", fmt="q2_k", source="q4_k", t1=0.6, t2=0.9, low=0.2, skip=0.03,
          ppl=13.2, kld=0.0833, top1=0.88),
]


def test_quality_fixture_matches_jaxmoe_rows():
    """The fixture rows carry exactly jaxmoe.quality's row keys (skips where JAX is unavailable)."""
    quality = pytest.importorskip("jaxmoe.quality")
    assert tuple(QUALITY_ROWS[0]) == tuple(quality.ROW_KEYS)


def test_report_with_quality_file(quick_sweep, tmp_path):
    qpath = tmp_path / "quality-small.json"
    qpath.write_text(json.dumps({"command": "python -m jaxmoe.quality --model m.gguf --json q.json",
                                 "model": {"file": "m.gguf", "name": "tiny-moe",
                                           "config": {"n_layers": 4, "n_experts": 16, "top_k": 4}},
                                 "rows": QUALITY_ROWS, "setup": {"n_ctx": 512, "n_chunks": 16}}))
    md, _ = report.generate(quick_sweep, str(tmp_path / "quality*.json"), tmp_path / "d.md", tmp_path / "f", png=False)
    quality = md.split("## Quality", 1)[1].split("## Caveats", 1)[0]
    assert "Pending" not in quality and "tiny-moe" in quality and "4,080 scored tokens" in quality
    rows = _table_after(quality, "**Share and format**")
    got = {(r["format"], r["share demoted"]): r for r in rows}
    q2 = got[("Q2_K", "30 %")]
    assert q2["KLD [95 % CI]"] == "0.0421 [0.0379, 0.0463]"  # the Q4_K-sourced row, not the float-sourced one
    assert float(q2["PPL ratio"]) == pytest.approx(12.9876 / 12.5, abs=5e-5)
    assert _pct(q2["low-prec. mass (model)"]) == pytest.approx(0.12)
    csv = charts.with_native_baseline(pd.read_csv(quick_sweep / "tiny.csv"))
    c = csv[(csv["policy"] == "slru") & (csv["precision"] == "static:mass:30%:q2_k") & (csv["budget"] == "vram")].iloc[0]
    assert _pct(q2["Δ tok/s tiny"]) == pytest.approx(c["speedup"], abs=5e-4)
    assert got[("Q3_K", "30 %")]["Δ tok/s tiny"] == "–"  # Q3_K not in the quick grid: nothing invented
    dyn = _table_after(quality, "**HOBBIT dynamic rule**")
    assert len(dyn) == 1 and dyn[0]["KLD [95 % CI]"].startswith("0.0833") and _pct(dyn[0]["skipped mass (model)"]) == 0.03
    comp = _table_after(quality, "**Compounding**")
    assert len(comp) == 1 and float(comp[0]["KLD, low copy from float"]) == 0.0388
    assert float(comp[0]["KLD, low copy re-quantized from Q4_K"]) == 0.0421
    head = md.split("## Method", 1)[0]
    assert "`static:mass:30%:q2_k` KLD 0.0421" in head and "`static:mass:30%:q3_k` KLD 0.0107" in head
    assert "quality-vs-speed" in md


def test_report_bad_inputs(tmp_path):
    with pytest.raises(SystemExit) as e:
        report.main(["--sweeps", str(tmp_path), "--doc", str(tmp_path / "d.md"), "--no-png"])
    assert e.value.code == 2 and not (tmp_path / "d.md").exists()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit):
        report.main(["--sweeps", str(tmp_path), "--doc", str(tmp_path / "d.md"), "--no-png"])
    assert not (tmp_path / "d.md").exists()


def test_slru_probation_note_only_when_slru_trails_lru():
    f = pd.DataFrame([
        {"trace": "t", "gpu": GPU, "policy": pol, "precision": "native", "budget": b, "hit_rate": h,
         "capacity_experts": cap}
        for pol, b, h, cap in (("slru", "20%", 0.30, 1000.0), ("lru", "20%", 0.78, 1000.0),
                               ("slru", "40%", 0.95, 2000.0), ("lru", "40%", 0.951, 2000.0))])
    inp = report.Inputs(f, {"t": {"gpus": [GPU], "n_layers": 48, "top_k": 8}}, pd.DataFrame(), None)
    note = report.slru_probation_note(inp, "t")
    assert "0.300 at the 20% budget where LRU hits 0.780" in note and "(budgets affected: 20%)" in note
    assert "about 200 Q4_K_M experts" in note and "384 experts" in note  # (1 − 0.8) × 1000; 48 × 8
    inp.sweeps = f.assign(hit_rate=[0.78, 0.78, 0.95, 0.951])
    assert report.slru_probation_note(inp, "t") is None
