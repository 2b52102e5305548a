"""The sweep's `slru-share` panel (SLRU's protected share as its own column) and the report's subsection on it.

Behaviour checked against the simulator itself: a share-0 row equals the LRU row of the same
configuration (sim/cache/slru.py documents that SLRU with no protected segment is LRU), and a
non-default share row equals `sim.replay.run` through the pure-Python cache (fast=False) with
`policy_params={"protected_share": x}`, so the share reaches the compiled replay the sweep uses.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import report, sweep
from sim.simulate import ReplayConfig, run
from tests.test_analysis import _table_after

GPU = "rtx3060-12gb"
GPUS = ("rtx3060-12gb", "rtx4070-12gb", "h200")
CORE = ("hits", "misses", "accesses", "demand_bytes", "bytes_moved")


@pytest.fixture(scope="module")
def share_sweep(tiny_trace, tmp_path_factory) -> Path:
    """A sweep of a small grid: slru at shares 0, 0.5 and the default, and lru, at 10 %, 20 % and the VRAM-derived
    budget (native, Q2_K)."""
    budgets = ("10%", "20%", sweep.VRAM)
    grid = (sweep.Panel("t", sweep.PRIMARY, ("slru", "lru"), ("native", "static:mass:30%:q2_k"), budgets),
            sweep.Panel("t-share", sweep.PRIMARY, ("slru",), ("native", "static:mass:30%:q2_k"), budgets,
                        (0.0, 0.5, sweep.DEFAULT_PROTECTED_SHARE)))
    sweep.GRIDS["test-share"] = grid
    try:
        frame, layers, prov = sweep.run_sweep(tiny_trace, gpus=(GPU,), grid="test-share", trace_label="tiny")
    finally:
        del sweep.GRIDS["test-share"]
    out = tmp_path_factory.mktemp("sweeps")
    sweep.write_sweep(out, "tiny", frame, layers, prov)
    return out


# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------

def test_default_grid_share_panel():
    cfgs = sweep.expand_grid(sweep.GRIDS["default"], GPUS)
    assert len(cfgs) == len(set(cfgs))
    assert sweep.DEFAULT_PROTECTED_SHARE == 0.8
    # every slru config carries a share, no other policy does
    assert all((c.protected_share is not None) == (c.policy == "slru") for c in cfgs)
    off = [c for c in cfgs if c.protected_share not in (None, 0.8)]
    assert {c.gpu for c in off} == {GPUS[0]}  # primary GPU only
    assert {c.protected_share for c in off} == {0.0, 0.2, 0.5}
    want = {(b, p) for b in sweep.FRACTIONS + (sweep.VRAM,) for p in ("native", "static:mass:30%:q2_k")}
    for x in (0.0, 0.2, 0.5, 0.8):
        got = {(c.budget, c.precision) for c in cfgs if c.gpu == GPUS[0] and c.protected_share == x}
        assert want <= got, x
    # the panel is appended: the grid without it expands to exactly the first configs (config_ids kept)
    panels = sweep.GRIDS["default"]
    assert panels[-1].name == "slru-share"
    before = sweep.expand_grid(panels[:-1], GPUS)
    assert cfgs[:len(before)] == before and len(cfgs) == len(before) + 3 * len(want)
    assert all(c.policy_params == {} for c in before)  # the earlier panels run SLRU as before
    quick = sweep.expand_grid(sweep.GRIDS["quick"], (GPU,))
    assert len(quick) <= 16 and {c.protected_share for c in quick if c.policy == "slru"} == {0.0, 0.5, 0.8}


def test_share_validated():
    bad = (sweep.Panel("x", sweep.PRIMARY, ("slru",), ("native",), ("30%",), (1.5,)),)
    with pytest.raises(sweep.InputError):
        sweep.expand_grid(bad, (GPU,))


# ------------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------------

def test_share_column_and_rows(share_sweep):
    text = (share_sweep / "tiny.csv").read_text()
    header, first = text.splitlines()[:2]
    assert header.split(",") == list(sweep.SWEEP_COLUMNS) and header.endswith(",protected_share")
    f = pd.read_csv(share_sweep / "tiny.csv")
    assert f.loc[f["policy"] == "lru", "protected_share"].isna().all()
    assert first.endswith(",0.8") and f["policy"].iloc[0] == "slru"  # the default written out
    slru = f[f["policy"] == "slru"]
    assert sorted(set(slru["protected_share"])) == [0.0, 0.5, 0.8]
    assert len(slru) == 3 * 3 * 2 and not slru.duplicated(["protected_share", "budget", "precision"]).any()


def _row(f, policy, share, budget, precision):
    m = (f["policy"] == policy) & (f["budget"] == budget) & (f["precision"] == precision)
    m &= f["protected_share"].isna() if share is None else (f["protected_share"] == share)
    assert m.sum() == 1
    return f[m].iloc[0]


@pytest.mark.parametrize("precision", ["native", "static:mass:30%:q2_k"])
def test_share_zero_is_lru_and_default_collapses(share_sweep, precision):
    f = pd.read_csv(share_sweep / "tiny.csv")
    for b in ("10%", "20%", "vram"):
        z, lru = _row(f, "slru", 0.0, b, precision), _row(f, "lru", None, b, precision)
        for k in CORE + ("tokens_per_s",):
            assert z[k] == lru[k], (b, k)
    # at 10 % the default's probation (20 % of ~614 experts) is below one token's 48 × 8 = 384 experts: the
    # documented SLRU collapse, the default hits clearly less than LRU (share 0) there
    z, d = _row(f, "slru", 0.0, "10%", precision), _row(f, "slru", 0.8, "10%", precision)
    assert d["capacity_experts"] * 0.2 < 48 * 8
    assert d["hit_rate"] < z["hit_rate"] - 0.02


def test_share_rows_equal_reference_replay(share_sweep, tiny_trace):
    """A share-0.5 and a default row equal sim.replay.run through the pure-Python cache at the same share."""
    f = pd.read_csv(share_sweep / "tiny.csv")
    for share, params in ((0.5, {"protected_share": 0.5}), (0.8, {})):
        r = _row(f, "slru", share, "10%", "native")
        rec = run(ReplayConfig(trace=str(tiny_trace), gpu=GPU, policy="slru", capacity_bytes=int(r["capacity_bytes"]),
                               policy_params=params, fast=False, timeline=False))
        for k in CORE:
            assert getattr(rec, k) == r[k], (share, k)
    # and the share matters: 0.5 and the default differ on this trace at 10 %
    assert _row(f, "slru", 0.5, "10%", "native")["hits"] != _row(f, "slru", 0.8, "10%", "native")["hits"]


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------

def test_report_share_section(share_sweep, tmp_path):
    md, paths = report.generate(share_sweep, str(tmp_path / "none*.json"), tmp_path / "d.md", tmp_path / "figures",
                                png=True)
    assert any(p.name == f"{report.SHARE_FIG}.png" for p in paths)
    section = md.split("### SLRU's protected share", 1)[1]
    assert f"figures/{report.SHARE_FIG}.png" in section
    assert md.count(f"{report.SHARE_FIG}.png") == 1  # inline only, not again under Figures
    f = pd.read_csv(share_sweep / "tiny.csv")
    rows = _table_after(section, "Decode hit rate and simulated tok/s by protected share")
    assert [r["budget"] for r in rows][:2] == ["10%", "20%"] and rows[2]["budget"].startswith("12 GB (")
    for r in rows:
        b = "vram" if r["budget"].startswith("12 GB") else r["budget"]
        for x in (0.0, 0.5, 0.8):
            c = _row(f, "slru", x, b, "native")
            assert float(r[f"hit rate @{x:g}"]) == pytest.approx(c["hit_rate"], abs=5e-4)
            assert float(r[f"tok/s @{x:g}"]) == pytest.approx(c["tokens_per_s"], abs=0.05)
        h3 = {x: round(_row(f, "slru", x, b, "native")["hit_rate"], 3) for x in (0.0, 0.5, 0.8)}
        best = [f"{x:g}" for x in h3 if h3[x] == max(h3.values())]
        assert r["best share"] == ("all equal" if len(best) == 3 else ", ".join(best))
    # the trace's bullet names the budget where the default trails most, the best share there and the loss
    m = re.search(r"`tiny`: the default share 0\.8 trails the best share by more than 0\.005 of hit rate at ([0-9%, ]+) "
                  r"\(.*?\); most at ([0-9]+%), where shares? ([0-9., ]+?) hits? ([0-9.]+) .*?and the default "
                  r"([0-9.]+) \([0-9.]+ tok/s\): -([0-9.]+) hit rate", section)
    assert m, section[:1200]
    budgets = ("10%", "20%", "vram")
    hit = {(b, x): _row(f, "slru", x, b, "native")["hit_rate"] for b in budgets for x in (0.0, 0.5, 0.8)}
    loss = {b: max(hit[b, x] for x in (0.0, 0.5, 0.8)) - hit[b, 0.8] for b in budgets}
    assert m.group(1).split(", ") == [b for b in budgets if loss[b] > 0.005]
    worst = max(loss, key=loss.get)
    assert m.group(2) == worst
    top = max(round(hit[worst, x], 3) for x in (0.0, 0.5, 0.8))
    assert [float(x) for x in m.group(3).split(", ")] == [x for x in (0.0, 0.5, 0.8) if round(hit[worst, x], 3) == top]
    assert float(m.group(4)) == pytest.approx(top, abs=5e-4)
    assert float(m.group(5)) == pytest.approx(hit[worst, 0.8], abs=5e-4)
    assert float(m.group(6)) == pytest.approx(loss[worst], abs=1e-3)
    assert "its 3 native rows here equal the LRU rows of the same budgets exactly" in section
    assert "python -m analysis.report" in section


def test_report_elsewhere_unchanged_by_share_rows(share_sweep, tmp_path):
    """Every section but the new one reads the same numbers with or without the non-default shares, and a CSV
    written before the protected_share column loads as SLRU at its default share."""
    old = tmp_path / "old"
    old.mkdir()
    f = pd.read_csv(share_sweep / "tiny.csv")
    keep = f["policy"].ne("slru") | f["protected_share"].eq(0.8)
    f[keep].drop(columns="protected_share").to_csv(old / "tiny.csv", index=False)
    shutil.copy(share_sweep / "tiny.json", old / "tiny.json")
    shutil.copy(share_sweep / "tiny.per_layer.csv", old / "tiny.per_layer.csv")
    new_md, _ = report.generate(share_sweep, str(tmp_path / "none*.json"), tmp_path / "a" / "d.md",
                                tmp_path / "a" / "figures", png=False)
    old_md, _ = report.generate(old, str(tmp_path / "none*.json"), tmp_path / "b" / "d.md", tmp_path / "b" / "figures",
                                png=False)
    assert "### SLRU's protected share" not in old_md
    head = new_md.split("### SLRU's protected share", 1)[0]
    n_all, n_default = len(f), int(keep.sum())

    def trace_row(md):
        return next(line for line in md.splitlines() if line.startswith("| tiny |"))
    assert trace_row(head).endswith(f"| {n_all} |") and trace_row(old_md).endswith(f"| {n_default} |")
    assert head.replace(trace_row(head), "").rstrip("\n") == old_md.replace(trace_row(old_md), "").rstrip("\n")
