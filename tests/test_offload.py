"""The offload executor on a tiny model (CPU): it executes exactly the simulator's decisions.

Independent references: `sim.simulate.run` (the simulator's own CLI library path) for hits, misses and
skips; the plain-jnp reference FFN for the executor's per-format launches (Pallas in interpret mode).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jaxmoe import offload  # noqa: E402
from sim.simulate import ReplayConfig, run  # noqa: E402
from sim.trace import Trace, TraceMeta, save_trace  # noqa: E402

L, E, K = 4, 8, 2
W = 3 * 256 * 256
FMT = ("q4_k", "q4_k+q6_k_down", "q4_k", "q4_k+q6_k_down")


def _nbytes(fmt: str) -> int:
    return W // 256 * 144 if fmt == "q4_k" else 2 * 65536 // 256 * 144 + 65536 // 256 * 210


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 layers × 8 experts, top-2, three sequences of 8 decode steps, Q6_K down in layers 1 and 3."""
    meta = TraceMeta(model="tiny-moe", n_layers=L, n_experts=E, top_k=K, expert_weights=W,
                     expert_bytes=tuple(_nbytes(f) for f in FMT), expert_format=FMT)
    rng = np.random.default_rng(0)
    t = 24
    ex = np.zeros((t, L, K), np.int16)
    wt = np.zeros((t, L, K), np.float32)
    pop = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])
    for i in range(t):
        for la in range(L):
            ex[i, la] = rng.choice(E, K, replace=False, p=pop)
            wt[i, la] = np.sort(rng.dirichlet(np.ones(K)))[::-1]
    path = tmp_path_factory.mktemp("offload") / "tiny.npz"
    save_trace(Trace.from_arrays(ex, wt, np.ones(t, np.uint8), np.repeat([0, 1, 2], 8).astype(np.int32), meta), path)
    return path


PRECISIONS = ["native", "static:mass:30%:q3_k", "static:mass:30%:q2_k", "dynamic:0.6:0.9"]


@pytest.fixture(scope="module")
def executed(tiny, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("offload_out") / "grid.json"
    doc = offload.main([str(tiny), "--shape", "tiny", "--copy-path", "jax", "--kernel", "reference",
                        "--budget", "40%,25%", "--policy", "slru,lru", "--precision", ",".join(PRECISIONS),
                        "--repeats", "2", "--warmup", "0", "--out", str(out), "-q"])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(doc["results"], default=float))
    return doc


def test_executor_counts_equal_sim_replay(tiny, executed):
    total = 0.4 * L * E * np.mean([_nbytes(f) for f in FMT])  # 40 % of all native expert bytes
    assert len(executed["results"]) == 2 * 2 * len(PRECISIONS)
    for rec in executed["results"]:
        sim = run(ReplayConfig(trace=str(tiny), capacity_bytes=rec["capacity_bytes"], policy=rec["policy"],
                               precision=rec["precision"], gpu="h200", timeline=False)).as_dict()
        assert (rec["hits"], rec["misses"], rec["skipped"]) == (sim["hits"], sim["misses"], sim["skipped"])
        assert rec["accesses"] == sim["accesses"] and rec["tokens"] == sim["tokens"]
        # what the executor really did, summed over its timed runs
        assert rec["executed_copies"] == rec["repeats"] * sim["misses"]
        assert rec["executed_experts"] == rec["repeats"] * (sim["hits"] + sim["misses"])
        assert rec["executed_tokens"] == rec["repeats"] * sim["tokens"]
        assert rec["bytes_copied_logical"] == sim["demand_bytes"]
        assert len(rec["tokens_per_s"]) == 2 and rec["tokens_per_s_ci95"][0] <= rec["tokens_per_s_mean"]
        # per-token wall times: one per decoded token of each run, summing to at most the run's seconds
        assert [len(r) for r in rec["token_s_per_run"]] == [sim["tokens"]] * 2
        for toks, secs in zip(rec["token_s_per_run"], rec["seconds"]):
            assert min(toks) > 0 and sum(toks) <= secs + 1e-5
        # each run's loop split: its parts sum to at most the run's wall time, and add up to the per-layer totals
        parts = rec["parts_s_per_run"]
        assert len(parts) == 2 and all(sum(p.values()) <= s + 1e-5 for p, s in zip(parts, rec["seconds"]))
        assert sum(p["stall"] for p in parts) / 2 == pytest.approx(sum(rec["per_layer_s_per_run"]["stall"]), abs=1e-5)
    assert executed["results"][0]["capacity_bytes"] == int(total)
    # the grid is not degenerate: some configurations copy, some skip, some serve low precision
    assert any(r["misses"] > 0 for r in executed["results"]) and any(r["hits"] > 0 for r in executed["results"])
    assert any(r["skipped"] > 0 for r in executed["results"])


@pytest.mark.parametrize("path", ["q4_k", "q4_k+q6_k_down", "q3_k", "q2_k"])
def test_executor_launch_matches_reference(path):
    """Each kernel path's launch (Pallas, interpret mode) against float32 dequantize-then-dot of the same slots."""
    from jaxmoe import quants
    from jaxmoe.kernels import expert_ffn as ef

    shape = offload.Shape(n_layers=2, n_experts=4, hidden=256, ffn=256, n_heads=2, n_kv=1, head_dim=64, vocab=64)
    natives = ("q4_k", "q4_k+q6_k_down")
    ex = offload.Executor(shape, natives, 2, copy_path="jax", kernel="pallas", ctx_cap=64, paths=(path,))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 256), jnp.float32)
    layer = 1 if path == "q4_k+q6_k_down" else 0
    experts = [1, 2]
    ids = np.array([ex.slot_of(path, layer, e) for e in experts], np.int32)
    w = np.array([0.7, 0.3], np.float32)
    got = np.asarray(ex.run_experts(jnp.zeros((1, 256)), x, path, jnp.asarray(ids), jnp.asarray(w)))
    want = np.zeros((1, 256))
    for e, wi in zip(experts, w):
        planes = ex.host[path][e % ex.distinct]
        fmt = "q4_k" if path.startswith("q4_k") else path
        deq = lambda t: np.asarray(ef.dequantize_jnp({k: jnp.asarray(v) for k, v in planes[t].items()}, fmt), np.float64)  # noqa: E731
        g, u = deq("gate") @ np.asarray(x[0], np.float64), deq("up") @ np.asarray(x[0], np.float64)
        h = g / (1 + np.exp(-g)) * u
        if path == "q4_k+q6_k_down":
            wd = quants.dequantize(planes["down"]["q6"], "q6_k", (256, 256)).astype(np.float64)
        else:
            wd = deq("down")
        want += wi * (wd @ h)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(got[0], want[0], atol=2e-2 * scale)  # bf16 down dot in the Q6_K path


def test_help_documents_the_cli():
    out = subprocess.run([sys.executable, "-m", "jaxmoe.offload", "--help"], capture_output=True, text=True, check=True)
    for word in ("--copy-path", "--budget", "--repeats", "--calibrate", "derived:", "raw", "jax", "Physical memory"):
        assert word in out.stdout


def test_bad_input_exits_2(tiny, tmp_path):
    out = tmp_path / "x.json"
    r = subprocess.run([sys.executable, "-m", "jaxmoe.offload", str(tiny), "--shape", "tiny", "--copy-path", "nvlink",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "copy-path" in r.stderr and not out.exists()
    r = subprocess.run([sys.executable, "-m", "jaxmoe.offload", str(tiny), "--shape", "tiny", "--copy-path", "jax",
                        "--policy", "nosuch", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()


def test_tensor_aware_formats_are_refused_in_one_line(tiny, tmp_path, capsys):
    """The executor has no mixed-format kernel: a `_gu` low format fails at once, one stderr line, no output."""
    from sim.io import InputError
    from sim.trace import load_trace

    out = tmp_path / "x.json"
    for prec in ("native,static:mass:30%:q2_k_gu", "dynamic:0.6:0.9:q3_k_gu:serve",
                 "static:mass:20%:q3_k+dynamic:0.6:0.9:q2_k_gu+pools:split:0.3"):
        with pytest.raises(SystemExit) as exc:
            offload.main([str(tiny), "--shape", "tiny", "--copy-path", "jax", "--kernel", "reference",
                          "--precision", prec, "--out", str(out), "-q"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "no kernel for mixed-format experts" in err[0], err
        assert "_gu" in err[0] and not out.exists()
    with pytest.raises(InputError, match="q3_k_gu"):  # the one adapter to the simulator refuses too
        offload.simulator_plan(load_trace(tiny), policy="lru", precision="static:mass:30%:q3_k_gu", capacity_bytes=10**6)
    assert offload.check_executable("static:mass:30%:q2_k+dynamic:0.6:0.9:q3_k").low_formats() == ("q2_k", "q3_k")
    # the simulator itself prices the same configuration (the trace names its Q6_K-down layers)
    rec = run(ReplayConfig(trace=str(tiny), capacity_bytes=10**6, precision="static:mass:30%:q2_k_gu", gpu="h200",
                           timeline=False))
    assert rec.low_precision_mass > 0


def test_t_interval():
    m, lo, hi = offload.t_interval([10.0, 12.0, 11.0])
    assert m == 11.0 and lo < m < hi
    assert hi - m == pytest.approx(4.303 * 1.0 / np.sqrt(3))


def test_pointer_read_leaves_pool_donatable():
    """The raw path reads pool addresses through DLPack; the jax path's donated update must stay in place after."""
    from sim.trace import load_trace  # noqa: F401  (import order: sim before jax-heavy modules is irrelevant)

    shape = offload.Shape(n_layers=2, n_experts=4, hidden=256, ffn=256, n_heads=2, n_kv=1, head_dim=64, vocab=64)
    ex = offload.Executor(shape, ("q4_k", "q4_k"), 2, copy_path="jax", kernel="reference", ctx_cap=64, paths=("q2_k",))
    qs = lambda: ex.pools["q2_k"]["gate"]["qs"]  # noqa: E731
    before = offload.buffer_pointer(qs(), np.from_dlpack)
    ex.issue_copies("q2_k", [ex.slot_of("q2_k", 1, 3)], [3])
    assert offload.buffer_pointer(qs(), np.from_dlpack) == before  # updated in place: the raw path's pointer holds
    held = np.from_dlpack(qs())  # a view kept alive (what the first GPU run did) …
    ex.issue_copies("q2_k", [ex.slot_of("q2_k", 0, 2)], [2])
    assert offload.buffer_pointer(qs(), np.from_dlpack) != held.ctypes.data  # … forces a copy of the pool (GPU: an error)
    # the copied slot holds its distinct expert's planes
    np.testing.assert_array_equal(np.asarray(qs()[ex.slot_of("q2_k", 0, 2)]), ex.host["q2_k"][2 % ex.distinct]["gate"]["qs"])


def test_profiles_and_validation_pipeline(tiny, tmp_path):
    """calibrate (CPU, jax path) → profiles → the simulator predicts each configuration of a measured grid."""
    from jaxmoe import offload_calib

    grid, calib = tmp_path / "grid.json", tmp_path / "calib.json"
    offload.main([str(tiny), "--shape", "tiny", "--copy-path", "jax", "--kernel", "reference", "--budget", "30%",
                  "--policy", "lru", "--precision", "native", "--repeats", "2", "--warmup", "0",
                  "--calibrate", str(calib), "--out", str(grid), "-q"])
    docs = offload_calib.main(["profiles", str(calib), "--out-dir", str(tmp_path)])
    prof = docs[0]
    assert prof["name"] == "gpu-offload-jax" and prof["timeline"]["overlap_resident"] is False  # host-bound executor
    assert prof["transfer"]["curve"]["nbytes"] == sorted(offload_calib.path_nbytes(p, 256, 256)
                                                          for p in ("q4_k", "q4_k+q6_k_down", "q2_k", "q3_k"))
    rows = offload_calib.main(["validate", str(grid), "--trace-dir", str(tiny.parent), "--profile-dir", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["hit_rate"] == rows[0]["sim_hit_rate"]
    assert rows[0]["predicted"] > 0 and np.isfinite(rows[0]["error"])


def test_path_nbytes_matches_architecture_table():
    from jaxmoe import offload_calib

    assert offload_calib.path_nbytes("q4_k") == 2_654_208 and offload_calib.path_nbytes("q2_k") == 1_548_288
    assert offload_calib.path_nbytes("q3_k") == 2_027_520 and offload_calib.path_nbytes("q4_k+q6_k_down") == 3_059_712


@pytest.mark.parametrize("interleave", ["token", "run"])
def test_interleaved_rounds_give_every_configuration_the_same_runs(tiny, tmp_path, interleave):
    """Rounds: each configuration runs once per timed round (whole, or token by token with the others); the
    calibration keeps one sample per timed round (none from the warm-up round)."""
    grid, calib = tmp_path / "grid.json", tmp_path / "calib.json"
    doc = offload.main([str(tiny), "--shape", "tiny", "--copy-path", "jax", "--kernel", "reference", "--budget", "30%,60%",
                        "--policy", "lru,slru", "--precision", "native,dynamic:0.6:0.9", "--repeats", "3", "--warmup", "1",
                        "--interleave", interleave, "--calibrate", str(calib), "--out", str(grid), "-q"])
    assert doc["rounds"] == 3 and not doc["stopped_early"] and len(doc["results"]) == 8 and doc["interleave"] == interleave
    for rec in doc["results"]:
        assert len(rec["seconds"]) == 3 and rec["executed_tokens"] == 3 * rec["tokens"]
        assert rec["executed_copies"] == 3 * rec["misses"] and rec["executed_experts"] == 3 * (rec["hits"] + rec["misses"])
        assert rec["hits"] == rec["sim_hits"] and rec["misses"] == rec["sim_misses"]
        for toks, secs in zip(rec["token_s_per_run"], rec["seconds"]):  # a round's run = its tokens
            assert len(toks) == rec["tokens"] and sum(toks) <= secs + 1e-5
            if interleave == "token":
                assert sum(toks) == pytest.approx(secs, rel=1e-4, abs=1e-5)
    cal = json.loads(calib.read_text())
    samples = cal["paths"]["jax"]["samples"]
    assert cal["reps"] == 3 and all(len(v) == 3 for v in samples.values())
    assert cal["paths"]["jax"]["dense_s"] == pytest.approx(float(np.median(samples["dense"])), abs=1e-9)
    assert json.loads(grid.read_text())["results"] == json.loads(json.dumps(doc["results"]))


def test_skip_rounds_recomputes_every_calibration_value_from_the_later_rounds():
    """--skip-rounds: each value (dense_s included) is the median of the kept rounds' samples."""
    from jaxmoe import offload_calib

    samples = {"dense": [9.0, 1.0, 3.0], "dense_s_at_ctx_cap": [8.0, 2.0, 4.0], "hit|q4_k|1": [7.0, 5.0, 6.0],
               "miss|q4_k|1": [9.0, 8.0, 10.0]}
    rec = dict(samples=samples, head_samples=[5.0, 1.0, 2.0], dense_s=3.0, dense_s_at_ctx_cap=4.0, head_s=2.0,
               hit={"q4_k": {"1": 6.0}}, miss={"q4_k": {"1": 9.0}})
    out = offload_calib.skip_rounds_calib({"paths": {"raw": rec}}, 1)["paths"]["raw"]
    assert (out["dense_s"], out["dense_s_at_ctx_cap"], out["head_s"]) == (2.0, 3.0, 1.5)
    assert out["hit"] == {"q4_k": {"1": 5.5}} and out["miss"] == {"q4_k": {"1": 9.0}}
    assert set(out) == set(rec)  # no stray keys
    assert rec["dense_s"] == 3.0  # the input is left as it was


def test_noise_rows_tell_whole_run_shifts_from_slow_tokens():
    """A configuration whose runs are uniformly scaled has run CV = CV of the run's median token; one whose
    runs differ by a single slow token has a small median-token CV and one slow token per such run."""
    from jaxmoe import offload_calib

    base = np.array([0.03, 0.031, 0.029, 0.030])
    scaled = [list(base * f) for f in (1.0, 1.2, 0.9)]
    spiked = [list(base), list(np.r_[base[:3], 0.09]), list(base)]
    grid = {"results": [dict(copy_path="raw", seconds=[sum(t) for t in runs], token_s_per_run=runs)
                        for runs in (scaled, scaled, spiked)]}
    (row,) = offload_calib.noise_rows(grid)
    cv = lambda a: np.std(a, ddof=1) / np.mean(a)  # noqa: E731
    assert row["run_cv"] == pytest.approx(cv([sum(t) for t in scaled]))  # median of (scaled, scaled, spiked)
    assert row["run_median_token_cv"] == pytest.approx(cv([np.median(t) for t in scaled]))
    assert row["run_median_token_cv"] == pytest.approx(row["run_cv"], rel=1e-9)
    assert row["slow_tokens_per_run"] == pytest.approx((0 + 0 + 1 / 3) / 3)
    # a slowdown common to every configuration of a round is all round effect: log f - mean(log f), no residual
    f = np.array([1.0, 1.2, 0.9])
    common = {"results": [dict(copy_path="jax", seconds=list(c * f), token_s_per_run=[[c * x] for x in f])
                          for c in (0.5, 2.0)]}
    (row,) = offload_calib.noise_rows(common)
    assert row["round_effect"] == pytest.approx(list(np.log(f) - np.log(f).mean()))
    assert row["run_residual_sd"] == pytest.approx(0.0, abs=1e-12)
    assert offload_calib.noise_rows({"results": [dict(copy_path="raw", seconds=[1.0], token_s_per_run=[[1.0]])]}) == []
