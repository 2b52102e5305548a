"""sim.synth additions for capacity-pressure traces: unchanged old outputs, the Qwen3-235B preset,
calibration sequences and the pressure report (against brute force)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.engine import calibration_steps
from sim.io import InputError
from sim.profiles import get_model, load_hardware
from sim.synth import calibration_fraction, preset, pressure, synthesize, with_calibration
from sim.trace import ABSENT, load_trace, save_trace, validate

ROOT = Path(__file__).resolve().parents[1]

# Digests of traces written by sim/synth.py BEFORE the capacity-pressure additions (commit f2dfc0c's
# synth.py, computed 2026-12-06): array bytes + meta.extra + provenance, and the saved npz file.
GOLDEN = {
    "qwen-default-small": (dict(model="qwen3-30b-a3b", n_seqs=2, prefill_tokens=16, decode_tokens=300, seed=5),
                           "57e21a048e08144447be7b8a99b883369cd03ad7257baf28425d409e43ee49e5",
                           "4e4a41ca38b570043d594ca10c182d9f5f70d343392e28f94de6fde4d9d75a0c"),
    "qwen-predict-skip": (dict(model="qwen3-30b-a3b", n_seqs=3, prefill_tokens=7, decode_tokens=40, seed=2,
                               predict_accuracy=0.7, prefill_skip_last_layer=True),
                          "f36c89482a84063a016e37a27a11f74ccc1ce1f836ba07b379ae48ea8024c85c",
                          "7d6a55e9d1eb7a2c88fc98950fdf4f711e3fd9a73d7c5bbaab7a0c6f48f953f6"),
    "mixtral": (dict(model="mixtral-8x7b", n_seqs=2, prefill_tokens=4, decode_tokens=300, seed=9,
                     predict_accuracy=0.5),
                "2b855f73852ef21cbdba8e7e703c8bfc6ad7d69c3dd48a59ed4978a83bbddc50",
                "db33084f29f40d1cf5cdf08a9e07823b89582a4e10a3418db0db2afdb800337b"),
}


def digest(tr) -> str:
    h = hashlib.sha256()
    for name in ("experts", "weights", "phase", "seq", "predicted"):
        a = getattr(tr, name)
        h.update(name.encode())
        h.update(b"none" if a is None else np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(tr.meta.extra, sort_keys=True).encode())
    h.update(tr.meta.provenance.encode())
    return h.hexdigest()


@pytest.mark.parametrize("case", list(GOLDEN))
def test_existing_options_give_byte_identical_traces(case, tmp_path):
    kw, arrays_sha, file_sha = GOLDEN[case]
    kw = dict(kw)
    tr = synthesize(preset(kw.pop("model"), **kw))
    assert digest(tr) == arrays_sha
    save_trace(tr, tmp_path / "t.npz")
    assert hashlib.sha256((tmp_path / "t.npz").read_bytes()).hexdigest() == file_sha


def test_qwen3_235b_preset_matches_its_model_profile():
    cfg = preset("qwen3-235b-a22b", n_seqs=2, prefill_tokens=3, decode_tokens=20, seed=1)
    prof = get_model("qwen3-235b-a22b")
    assert (cfg.n_layers, cfg.n_experts, cfg.top_k, cfg.expert_weights) == (
        prof.n_layers, prof.n_experts, prof.top_k, prof.expert_weights) == (94, 128, 8, 3 * 4096 * 1536)
    tr = synthesize(cfg)
    validate(tr)
    assert tr.experts.shape == (46, 94, 8) and tr.meta.model == "qwen3-235b-a22b"


def test_calibration_sequences_are_exactly_the_first_k():
    tr = synthesize(preset("mixtral-8x7b", n_seqs=7, prefill_tokens=2, decode_tokens=9, seed=4))
    for k in range(1, 7):
        t = with_calibration(tr, k)
        assert t.meta.extra["calib_seqs"] == k and "synth_config" in t.meta.extra
        calib = calibration_steps(t, t.meta.extra["calib_fraction"])
        assert np.array_equal(calib, t.seq < k), k
    with pytest.raises(InputError):
        calibration_fraction(7, 7)
    with pytest.raises(InputError):
        calibration_fraction(0, 7)


def brute_pressure(tr, budget, sizes, calib_seqs):
    keys_eval, keys_all = set(), set()
    for t in range(tr.n_steps):
        for layer in range(tr.meta.n_layers):
            for e in tr.experts[t, layer]:
                if e == ABSENT:
                    continue
                keys_all.add((layer, int(e)))
                if tr.seq[t] >= calib_seqs:
                    keys_eval.add((layer, int(e)))
    fit, used = 0, 0
    for size in sorted(int(s) for s in sizes for _ in range(tr.meta.n_experts)):
        if used + size > budget:
            break
        used += size
        fit += 1
    return len(keys_eval), len(keys_all), fit


def test_pressure_report_matches_brute_force():
    cfg = preset("qwen3-30b-a3b", n_seqs=3, prefill_tokens=4, decode_tokens=25, seed=8, n_layers=6,
                 prefill_skip_last_layer=True)
    tr = synthesize(cfg)
    sizes = np.array([100, 150, 100, 150, 200, 100])
    for budget in (0, 99, 100, 5_000, 40_000, 10**9):
        rep = pressure(tr, budget, sizes, calib_seqs=1)
        ev, al, fit = brute_pressure(tr, budget, sizes, 1)
        assert (rep["touched_eval"], rep["touched_all"], rep["fit"]) == (ev, al, fit), budget
        assert rep["experts_total"] == 6 * 128 and rep["decode_steps_eval"] == 2 * 25
    with pytest.raises(InputError):
        pressure(tr, 10, sizes[:3])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sim.synth", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def test_cli_calibration_and_pressure(tmp_path):
    out = tmp_path / "p.npz"
    r = _cli("-o", str(out), "--model", "mixtral-8x7b", "--seqs", "4", "--calib-seqs", "1", "--prefill", "2",
             "--decode", "40", "--pressure-gib", "12")
    assert r.returncode == 0, r.stderr
    assert "replay with --calib-fraction 0.25" in r.stdout
    # Mixtral Q4_K_M on 12 GiB: VRAM − dense − head − 4 k tokens of KV − the base's runtime reserve
    prof = get_model("mixtral-8x7b")
    budget = (12 * 2**30 - sum(prof.dense_bytes) - prof.head_bytes - 4096 * prof.kv_bytes_per_token
              - load_hardware("rtx3060-12gb").runtime_reserve_bytes)
    fit = brute_pressure(load_trace(out), budget, prof.native_bytes_per_layer(), 1)[2]
    assert 90 < fit < 120 and f"touch 256 distinct experts of 256; {fit} fit" in r.stdout
    tr = load_trace(out)
    assert tr.meta.extra["calib_seqs"] == 1 and tr.meta.extra["calib_fraction"] == 0.25
    bad = tmp_path / "bad.npz"
    r = _cli("-o", str(bad), "--seqs", "2", "--calib-seqs", "2")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "calibration" in r.stderr
    assert not bad.exists()
