"""Trace schema: save/load round trips, helpers, and every validation rule through the loader CLI."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.io import InputError
from sim.trace import (
    ABSENT,
    DECODE,
    PREFILL,
    Trace,
    TraceMeta,
    concat_traces,
    describe,
    load_trace,
    save_trace,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def make_arrays(rng: np.random.Generator, S: int, L: int, K: int, E: int, absent_frac: float = 0.1,
                n_seq: int = 2, predicted: bool = False) -> dict:
    """Valid trace arrays: distinct ids per group, weights descending and summing to 1, some absent groups."""
    stride = max(1, E // K)
    ids = (rng.integers(0, E, (S, L, 1)) + np.arange(K) * stride) % E  # K distinct ids per group
    w = rng.random((S, L, K)) + 0.01
    w = -np.sort(-w, axis=2)
    w = (w / w.sum(axis=2, keepdims=True)).astype(np.float32)
    absent = rng.random((S, L)) < absent_frac
    absent[0, 0] = False  # at least one present group
    ids[absent] = ABSENT
    w[absent] = 0
    seq = np.sort(rng.integers(0, n_seq, S)) * 3  # contiguous, non-consecutive ids
    phase = np.zeros(S, np.uint8)
    for s in np.unique(seq):  # each sequence: prefill then decode
        idx = np.flatnonzero(seq == s)
        phase[idx[len(idx) // 2:]] = DECODE
    out = {"experts": ids.astype(np.int16), "weights": w, "phase": phase, "seq": seq.astype(np.int32)}
    if predicted:
        p = rng.integers(-1, E, (S, L, K))
        p[:, 0] = ABSENT
        out["predicted"] = p.astype(np.int16)
    return out


def full_meta(L: int, E: int, K: int) -> TraceMeta:
    """A meta with every optional field set."""
    return TraceMeta(
        model="toy-moe", n_layers=L, n_experts=E, top_k=K, provenance="unit test",
        expert_weights=3 * 256 * 4, expert_bytes=tuple(range(100, 100 + L)),
        expert_format=tuple("q4_k" if i % 2 else "q4_k+q6_k_down" for i in range(L)),
        dense_bytes=tuple(range(7, 7 + L)), extra={"note": "x", "nested": {"a": [1, 2]}},
    )


def assert_same(a: Trace, b: Trace) -> None:
    """Exact equality of arrays (values and dtypes) and of meta fields."""
    for k in ("experts", "weights", "phase", "seq", "predicted"):
        x, y = getattr(a, k), getattr(b, k)
        if x is None or y is None:
            assert x is None and y is None, k
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg=k)
    assert dataclasses.asdict(a.meta) == dataclasses.asdict(b.meta)


@pytest.mark.parametrize("with_pred", [False, True])
def test_save_load_round_trip(tmp_path, with_pred):
    rng = np.random.default_rng(1)
    arr = make_arrays(rng, 40, 5, 3, 16, predicted=with_pred)
    t = Trace.from_arrays(meta=full_meta(5, 16, 3), **arr)
    p = tmp_path / "t.npz"
    save_trace(t, p)
    u = load_trace(p)
    assert_same(t, u)
    assert u.experts.dtype == np.int16 and u.weights.dtype == np.float32
    assert u.phase.dtype == np.uint8 and u.seq.dtype == np.int32
    assert isinstance(u.meta.expert_bytes, tuple) and isinstance(u.meta.expert_format, tuple)
    for k in ("experts", "weights", "phase", "seq") + (("predicted",) if with_pred else ()):
        assert not getattr(u, k).flags.writeable, k
        with pytest.raises(ValueError):
            getattr(u, k)[0] = 0
    # the file is a plain npz: no pickle, exactly the documented keys
    with np.load(p, allow_pickle=False) as z:
        assert set(z.files) == {"experts", "weights", "phase", "seq", "meta"} | ({"predicted"} if with_pred else set())
        assert z["meta"].shape == () and json.loads(str(z["meta"]))["model"] == "toy-moe"
        np.testing.assert_array_equal(z["experts"], arr["experts"])


def test_save_is_deterministic_and_atomic(tmp_path):
    rng = np.random.default_rng(2)
    t = Trace.from_arrays(meta=TraceMeta("m", 4, 8, 2), **make_arrays(rng, 10, 4, 2, 8))
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    save_trace(t, a)
    time.sleep(2.1)  # zip timestamps have 2 s resolution: a timestamped writer would differ now
    save_trace(t, b)
    assert a.read_bytes() == b.read_bytes()
    # an invalid trace is not written, and does not clobber an existing file
    bad = Trace(experts=t.experts, weights=t.weights * 2, phase=t.phase, seq=t.seq, meta=t.meta)
    before = a.read_bytes()
    with pytest.raises(InputError, match="weights sum to"):
        save_trace(bad, a)
    with pytest.raises(InputError):
        save_trace(bad, tmp_path / "new.npz")
    assert a.read_bytes() == before and not (tmp_path / "new.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no temp files left


def test_from_arrays_casts_and_does_not_alias(tmp_path):
    rng = np.random.default_rng(3)
    arr = make_arrays(rng, 12, 3, 2, 10)
    ex64 = arr["experts"].astype(np.int64)
    w64 = arr["weights"].astype(np.float64)
    t = Trace.from_arrays(ex64, w64, arr["phase"].astype(int), list(arr["seq"]), TraceMeta("m", 3, 10, 2))
    assert t.experts.dtype == np.int16 and t.weights.dtype == np.float32
    assert t.phase.dtype == np.uint8 and t.seq.dtype == np.int32
    assert ex64.flags.writeable  # the caller's array is untouched
    ex64[0, 0, 0] = 9 if ex64[0, 0, 0] != 9 else 8
    assert t.experts[0, 0, 0] == arr["experts"][0, 0, 0]


def test_ids_beyond_int16_are_reported_not_wrapped():
    ex = np.array([[[70000, 1]]])  # would wrap to a valid-looking id if cast first
    with pytest.raises(InputError, match="expert id 70000 outside"):
        Trace.from_arrays(ex, [[[0.5, 0.5]]], [0], [0], TraceMeta("m", 1, 4, 2))


def test_phase_helpers_select_and_concat():
    rng = np.random.default_rng(4)
    arr = make_arrays(rng, 30, 4, 2, 12, n_seq=3, predicted=True)
    t = Trace.from_arrays(meta=TraceMeta("m", 4, 12, 2, "p1"), **arr)
    dec, pre = t.decode_only(), t.prefill_only()
    np.testing.assert_array_equal(dec.experts, arr["experts"][arr["phase"] == 1])
    np.testing.assert_array_equal(pre.weights, arr["weights"][arr["phase"] == 0])
    np.testing.assert_array_equal(dec.predicted, arr["predicted"][arr["phase"] == 1])
    assert dec.n_steps + pre.n_steps == 30 and (dec.phase == DECODE).all() and (pre.phase == PREFILL).all()
    assert not dec.experts.flags.writeable and not t.select(slice(0, 5)).weights.flags.writeable
    assert t.select(slice(3, 9)).n_steps == 6
    with pytest.raises(ValueError):
        t.only_phase(2)

    u = Trace.from_arrays(meta=TraceMeta("m", 4, 12, 2, "p2"), **make_arrays(rng, 9, 4, 2, 12, n_seq=2))
    c = concat_traces([t, u, t])
    assert c.n_steps == 30 + 9 + 30 and c.meta.provenance == "p1 + p2 + p1"
    np.testing.assert_array_equal(c.experts[30:39], u.experts)
    np.testing.assert_array_equal(c.predicted[30:39], ABSENT)  # u had no predictions
    np.testing.assert_array_equal(c.predicted[39:], t.predicted)
    # sequences stay distinct and contiguous: as many sequences as the parts had together
    n_parts = sum(len(np.unique(x.seq)) for x in (t, u, t))
    assert len(np.unique(c.seq)) == n_parts
    assert (np.diff(c.seq) >= 0).all()
    validate(c)
    with pytest.raises(ValueError, match="n_experts"):
        concat_traces([t, Trace.from_arrays(meta=TraceMeta("m", 4, 13, 2), **make_arrays(rng, 5, 4, 2, 13))])


def test_describe_counts():
    rng = np.random.default_rng(5)
    arr = make_arrays(rng, 50, 6, 4, 32, absent_frac=0.2, n_seq=4)
    t = Trace.from_arrays(meta=TraceMeta("toy", 6, 32, 4), **arr)
    n_absent = int((arr["experts"][:, :, 0] == -1).sum())
    n_pre = int((arr["phase"] == 0).sum())
    n_seq = len(set(arr["seq"].tolist()))
    text = describe(t)
    assert f"50 steps ({n_pre} prefill, {50 - n_pre} decode)" in text
    assert f"in {n_seq} sequence" in text
    assert f"{(300 - n_absent) * 4:,} accesses in {300 - n_absent:,} groups ({n_absent} absent)" in text
    assert t.n_accesses == (300 - n_absent) * 4


def test_norm_topk_false_allows_sub_unit_sums(tmp_path):
    meta = TraceMeta("m", 1, 8, 2, extra={"norm_topk": False})
    t = Trace.from_arrays([[[3, 1]], [[0, 2]]], [[[0.5, 0.2]], [[0.3, 0.3]]], [0, 1], [0, 0], meta)
    save_trace(t, tmp_path / "raw.npz")
    assert_same(t, load_trace(tmp_path / "raw.npz"))
    with pytest.raises(InputError, match=r"must be in \(0, 1\]"):
        Trace.from_arrays([[[3, 1]]], [[[0.7, 0.4]]], [0], [0], meta)
    with pytest.raises(InputError, match="must be 1 ± 0.001"):  # the default: sums to 1
        Trace.from_arrays([[[3, 1]]], [[[0.5, 0.2]]], [0], [0], TraceMeta("m", 1, 8, 2))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(S=st.integers(1, 20), L=st.integers(1, 5), K=st.integers(1, 4), E=st.integers(4, 300),
       seed=st.integers(0, 2**32 - 1), absent=st.floats(0, 0.9), pred=st.booleans())
def test_round_trip_property(tmp_path, S, L, K, E, seed, absent, pred):
    rng = np.random.default_rng(seed)
    arr = make_arrays(rng, S, L, K, E, absent_frac=absent, n_seq=3, predicted=pred)
    t = Trace.from_arrays(meta=TraceMeta("m", L, E, K, "hyp"), **arr)
    p = tmp_path / f"h{seed}.npz"
    save_trace(t, p)
    assert_same(t, load_trace(p))


def test_load_and_validate_are_fast(tmp_path):
    rng = np.random.default_rng(6)
    arr = make_arrays(rng, 10_000, 48, 8, 128, absent_frac=0.01, n_seq=20)
    t = Trace.from_arrays(meta=TraceMeta("big", 48, 128, 8), **arr)
    p = tmp_path / "big.npz"
    save_trace(t, p)
    t0 = time.perf_counter()
    u = load_trace(p)  # read + decompress + full validation
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    validate(u)
    validate_s = time.perf_counter() - t0
    assert u.n_steps == 10_000
    # measured ≈0.25 s / 0.12 s on one core; the bound leaves room for a loaded machine
    assert load_s < 1.5 and validate_s < 1.0, (load_s, validate_s)


# ---------------------------------------------------------------------------------------------------
# Every validation rule through the loader CLI: write a raw npz that breaks one rule.

def _good_raw() -> dict:
    rng = np.random.default_rng(7)
    arr = make_arrays(rng, 6, 3, 2, 8, absent_frac=0.0, n_seq=2)
    arr["experts"][1, 2] = ABSENT  # one absent group
    arr["weights"][1, 2] = 0
    arr["predicted"] = np.full((6, 3, 2), ABSENT, np.int16)
    meta = dataclasses.asdict(TraceMeta("m", 3, 8, 2))
    return {k: np.array(v) for k, v in arr.items()} | {"meta": json.dumps(meta)}


def _setmeta(**kw):
    def f(d):
        m = json.loads(d["meta"])
        for k, v in kw.items():
            if v is ...:
                del m[k]
            else:
                m[k] = v
        d["meta"] = json.dumps(m)
    return f


def _set(key, idx, value):
    def f(d):
        a = d[key].copy()
        a[idx] = value
        d[key] = a
    return f


def _put(key, value):
    def f(d):
        if value is ...:
            del d[key]
        else:
            d[key] = value
    return f


LOADER_CASES = [
    ("missing key", _put("weights", ...), "missing key(s) weights"),
    ("missing meta", _put("meta", ...), "missing key(s) meta"),
    ("unknown key", _put("hit_flags", np.zeros(3)), "unknown key(s) hit_flags"),
    ("bad residency", _put("residency", np.zeros(3)), "residency must be an integer array"),
    ("meta not JSON", _put("meta", "{model: m"), "meta is not valid JSON"),
    ("meta not 0-d string", _put("meta", np.zeros(2)), "meta must be a 0-d unicode array"),
    ("meta not an object", _put("meta", "[1, 2]"), "meta must be a JSON object"),
    ("meta lacks top_k", _setmeta(top_k=...), "meta lacks field(s) top_k"),
    ("meta unknown field", _setmeta(colour="red"), "unknown meta field 'colour'"),
    ("meta n_layers not int", _setmeta(n_layers="3"), "meta.n_layers must be a positive integer"),
    ("meta top_k > n_experts", _setmeta(top_k=9), "exceeds meta.n_experts"),
    ("meta expert_bytes length", _setmeta(expert_bytes=[1, 2]), "meta.expert_bytes must list one value per layer (3)"),
    ("meta expert_format type", _setmeta(expert_format=[1, 2, 3]), "meta.expert_format must hold non-empty strings"),
    ("experts float", lambda d: d.update(experts=d["experts"].astype(np.float32)), "experts must be an integer array"),
    ("experts 2-D", lambda d: d.update(experts=d["experts"][:, :, 0]), "experts must be 3-D"),
    ("weights shape", lambda d: d.update(weights=d["weights"][:, :, :1]), "weights shape (6, 3, 1) differs"),
    ("phase length", lambda d: d.update(phase=d["phase"][:5]), "phase shape (5,) must be (6,)"),
    ("seq length", lambda d: d.update(seq=np.zeros(7, np.int32)), "seq shape (7,) must be (6,)"),
    ("predicted shape", lambda d: d.update(predicted=d["predicted"][:, :2]), "predicted shape (6, 2, 2) differs"),
    ("layers vs meta", _setmeta(n_layers=4), "experts has 3 layers but meta.n_layers=4"),
    ("k vs meta", _setmeta(top_k=3), "experts has k=2 slots but meta.top_k=3"),
    ("id too large", _set("experts", (2, 1, 1), 8), "step 2 layer 1 slot 1: expert id 8 outside [0, 8)"),
    ("id negative", _set("experts", (3, 0, 0), -2), "step 3 layer 0 slot 0: expert id -2 outside"),
    ("absent mixed", _set("experts", (4, 2, 1), -1), "step 4 layer 2: ABSENT ids (-1) mixed"),
    ("absent with weight", _set("weights", (1, 2, 0), 0.5), "step 1 layer 2: absent group has nonzero weights"),
    ("repeated id", lambda d: _set("experts", (5, 1, 1), d["experts"][5, 1, 0])(d), "step 5 layer 1: expert id repeated"),
    ("negative weight", _set("weights", (0, 1, 1), -0.25), "step 0 layer 1 slot 1: negative weight"),
    ("NaN weight", _set("weights", (2, 0, 0), np.nan), "step 2 layer 0 slot 0: weight is nan"),
    ("inf weight", _set("weights", (2, 2, 1), np.inf), "step 2 layer 2 slot 1: weight is inf"),
    ("sum not 1", _set("weights", (3, 1, 0), 2.0), "step 3 layer 1: weights sum to"),
    ("phase 2", _set("phase", 4, 2), "step 4: phase 2"),
    ("no steps", lambda d: d.update({k: d[k][:0] for k in ("experts", "weights", "phase", "seq", "predicted")}),
     "empty trace: no steps"),
    ("no present group", lambda d: d.update(experts=np.full((6, 3, 2), -1, np.int16),
                                            weights=np.zeros((6, 3, 2), np.float32)), "no present group"),
    ("seq not contiguous", lambda d: d.update(seq=np.array([0, 0, 1, 1, 0, 0], np.int32)),
     "sequence 0's steps are not contiguous (runs start at steps 0 and 4)"),
    ("predicted out of range", _set("predicted", (5, 2, 0), 8), "step 5 layer 2 slot 0: predicted id 8 outside"),
]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120)


def test_good_raw_file_loads(tmp_path):
    p = tmp_path / "good.npz"
    np.savez(p, **_good_raw())
    r = _run("sim.trace", str(p))
    assert r.returncode == 0, r.stderr
    assert "6 steps" in r.stdout and "(1 absent)" in r.stdout


@pytest.mark.parametrize("name,mutate,expected", LOADER_CASES, ids=[c[0] for c in LOADER_CASES])
def test_loader_cli_rejects(tmp_path, name, mutate, expected):
    d = _good_raw()
    mutate(d)
    p = tmp_path / "bad.npz"
    np.savez(p, **d)
    r = _run("sim.trace", str(p))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {p}: ") and expected in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("kind", ["text", "npy", "missing", "directory", "pickled", "truncated", "corrupt"])
def test_loader_cli_rejects_non_npz(tmp_path, kind):
    p = tmp_path / "x.npz"
    if kind == "text":
        p.write_text("turn,phase,step\n0,0,0\n")
    elif kind == "npy":
        with open(p, "wb") as fh:
            np.save(fh, np.zeros(3))
    elif kind == "directory":
        p.mkdir()
    elif kind == "pickled":
        d = _good_raw()
        d["experts"] = np.array([{"a": 1}], dtype=object)
        np.savez(p, **d)
    elif kind in ("truncated", "corrupt"):
        rng = np.random.default_rng(8)
        save_trace(Trace.from_arrays(meta=TraceMeta("m", 4, 8, 2), **make_arrays(rng, 50, 4, 2, 8)), p)
        data = bytearray(p.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:  # flip bytes inside the first member's compressed data
            data[200:260] = bytes(60)
        p.write_bytes(bytes(data))
    r = _run("sim.trace", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}: "), r.stderr
