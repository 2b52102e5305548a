"""Derived hardware grid: VRAM and PCIe link re-pricing of a base profile, checked by hand arithmetic."""
import json
import subprocess
import sys

import numpy as np
import pytest

from sim import cost
from sim.hwgrid import LINKS, VRAM_GIB, derive, derive_doc, get_link, grid
from sim.io import InputError
from sim.profiles import GIB, derived_expert_budget, get_model, load_hardware


@pytest.mark.parametrize("base", ["rtx3060-12gb", "h200"])
@pytest.mark.parametrize("link", list(LINKS))
def test_copy_time_keeps_fixed_cost_and_stretches_bandwidth(base, link):
    b = load_hardware(base)
    d = derive(base, 16, link)
    ratio = b.transfer_gbps / LINKS[link].gbps
    assert d.transfer_fixed_s == b.transfer_fixed_s and d.transfer_gbps == LINKS[link].gbps
    sizes = np.array([2_654_208, 1_548_288, 3 * 2**26])  # Q4_K, Q2_K experts; one beyond any curve
    want = b.transfer_fixed_s + np.maximum(cost.transfer_s(b, sizes) - b.transfer_fixed_s, 0) * ratio
    np.testing.assert_allclose(cost.transfer_s(d, sizes), want, rtol=1e-12)
    # kernels, dense layer, VRAM bandwidth and copy engines are the base GPU's
    assert d.vram_gbps == b.vram_gbps and d.copy_engines == b.copy_engines
    for fmt, secs in b.compute_s.items():
        np.testing.assert_array_equal(d.compute_s[fmt], secs)
    np.testing.assert_array_equal(d.dense_s, b.dense_s)
    assert d.vram_bytes == 16 * GIB and d.runtime_reserve_bytes == b.runtime_reserve_bytes
    assert "derived" in d.source and "NOT measured" in d.source and b.name in d.source


def test_slower_link_means_slower_copies_and_more_vram_a_bigger_budget():
    times = {lk: cost.transfer_s(derive("rtx3060-12gb", 12, lk), 2_654_208) for lk in LINKS}
    assert times["gen3x16"] > times["gen4x8"] > times["gen4x16"] > times["gen5x16"]
    # rtx3060 has no curve: copy = 10 µs + bytes / bandwidth
    assert times["gen4x16"] == pytest.approx(10e-6 + 2_654_208 / 25e9)
    model = get_model("qwen3-30b-a3b")
    budgets = [derived_expert_budget(model, derive("rtx3060-12gb", v, "gen4x16")) for v in VRAM_GIB]
    assert np.all(np.diff(budgets) == np.diff(VRAM_GIB) * GIB)  # each extra GiB goes to experts


def test_grid_is_16_distinct_profiles_and_doc_round_trips(tmp_path):
    profiles = grid("rtx3060-12gb")
    assert len(profiles) == 16 and len({p.name for p in profiles}) == 16
    doc = derive_doc(load_hardware("h200").raw, 8, "Gen4 x8", runtime_reserve_bytes=123)
    assert doc["name"] == "h200@8gib-gen4x8" and doc["runtime_reserve_bytes"] == 123
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert load_hardware(str(path)).transfer_gbps == 12.5


def test_bad_link_and_vram():
    assert get_link("PCIe-Gen5 x16").name == "gen5x16"
    with pytest.raises(InputError, match="unknown PCIe link"):
        get_link("gen6x32")
    with pytest.raises(InputError, match="VRAM"):
        derive("rtx3060-12gb", 0, "gen4x16")


def test_cli_writes_profiles_and_rejects_bad_link_without_output(tmp_path):
    out = tmp_path / "grid"
    r = subprocess.run([sys.executable, "-m", "sim.hwgrid", "rtx3060-12gb", "-o", str(out), "--vram", "8", "24",
                        "--links", "gen3x16", "gen5x16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "rtx3060-12gb@24gib-gen3x16.json", "rtx3060-12gb@24gib-gen5x16.json",
        "rtx3060-12gb@8gib-gen3x16.json", "rtx3060-12gb@8gib-gen5x16.json"]
    bad = tmp_path / "bad"
    r = subprocess.run([sys.executable, "-m", "sim.hwgrid", "rtx3060-12gb", "-o", str(bad), "--links", "agp8x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown PCIe link" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not bad.exists()
