"""sim.synth: determinism, schema validity, calibrated statistics against brute-force references."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.io import InputError
from sim.synth import (
    PRESETS,
    SynthConfig,
    compare,
    distinct_experts,
    gate_weights,
    lru_hit_rates,
    popularity_entropy,
    prediction_accuracy,
    preset,
    reuse_by_layer,
    stats,
    synthesize,
)
from sim.trace import ABSENT, DECODE, PREFILL, load_trace, save_trace, validate

ROOT = Path(__file__).resolve().parents[1]

# A few hundred tokens of the default Qwen3 model: 2 sequences × (32 prefill + 128 decode).
SMALL = preset("qwen3-30b-a3b", n_seqs=2, prefill_tokens=32, decode_tokens=128, seed=11)


@pytest.fixture(scope="module")
def small_trace():
    return synthesize(SMALL)


# ------------------------------------------------------------------------------ brute-force references


def brute_lru_hit_rate(trace, fraction: float, phase: int = DECODE) -> float:
    """Global LRU over (layer, expert) keys with an OrderedDict; hits counted on `phase` accesses."""
    m = trace.meta
    cap = round(fraction * m.n_layers * m.n_experts)
    cache: OrderedDict = OrderedDict()
    hits = n = 0
    for t in range(trace.n_steps):
        counted = trace.phase[t] == phase
        for layer in range(m.n_layers):
            for e in trace.experts[t, layer]:
                e = int(e)
                if e == ABSENT:
                    break
                key = (layer, e)
                hit = key in cache
                if hit:
                    cache.move_to_end(key)
                else:
                    cache[key] = None
                    if len(cache) > cap:
                        cache.popitem(last=False)
                if counted:
                    n += 1
                    hits += hit
    return hits / n


def brute_reuse(trace, phase: int = DECODE) -> float:
    """Fraction of selections also selected by the same layer at the previous token (Python sets)."""
    hit = n = 0
    for t in range(1, trace.n_steps):
        if trace.seq[t] != trace.seq[t - 1] or trace.phase[t] != phase:
            continue
        for layer in range(trace.meta.n_layers):
            cur, prv = set(trace.experts[t, layer].tolist()), set(trace.experts[t - 1, layer].tolist())
            if ABSENT in cur or ABSENT in prv:
                continue
            hit += len(cur & prv)
            n += len(cur)
    return hit / n


def brute_entropy(ids: np.ndarray, n_experts: int) -> float:
    """Normalised entropy of the histogram of `ids`, computed with Python counting."""
    counts: dict[int, int] = {}
    for e in ids.ravel().tolist():
        counts[e] = counts.get(e, 0) + 1
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) / math.log(n_experts)


def assert_valid(trace, cfg: SynthConfig) -> None:
    """Schema rules checked directly (independently of sim.trace.validate)."""
    ex, w = trace.experts, trace.weights
    T = cfg.prefill_tokens + cfg.decode_tokens
    assert ex.shape == w.shape == (cfg.n_steps, cfg.n_layers, cfg.top_k)
    present = ex[:, :, 0] != ABSENT
    assert ((ex[present] >= 0) & (ex[present] < cfg.n_experts)).all()
    srt = np.sort(ex[present], axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all(), "ids repeat within a top-k"
    wp = w[present].astype(np.float64)
    assert (wp > 0).all()
    assert np.abs(wp.sum(axis=1) - 1).max() < 1e-5
    assert (np.diff(wp, axis=1) <= 1e-7).all(), "weights not descending by rank"
    assert (w[~present] == 0).all() and (ex[~present] == ABSENT).all()
    assert (trace.seq == np.repeat(np.arange(cfg.n_seqs), T)).all()
    assert (trace.phase == np.tile(np.r_[[PREFILL] * cfg.prefill_tokens, [DECODE] * cfg.decode_tokens], cfg.n_seqs)).all()


# ------------------------------------------------------------------------------ determinism + validity


def test_same_seed_same_trace_different_seed_differs():
    cfg = dataclasses.replace(SMALL, n_seqs=1, prefill_tokens=8, decode_tokens=40, predict_accuracy=0.6)
    a, b = synthesize(cfg), synthesize(cfg)
    c = synthesize(dataclasses.replace(cfg, seed=cfg.seed + 1))
    for name in ("experts", "weights", "phase", "seq", "predicted"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.experts, c.experts)
    assert not np.array_equal(a.weights, c.weights)
    assert not np.array_equal(a.predicted, c.predicted)


def test_save_load_roundtrip_is_valid_and_byte_identical(tmp_path, small_trace):
    validate(small_trace)
    assert_valid(small_trace, SMALL)
    p1, p2 = tmp_path / "a.npz", tmp_path / "b.npz"
    save_trace(small_trace, p1)
    save_trace(synthesize(SMALL), p2)
    assert p1.read_bytes() == p2.read_bytes()
    back = load_trace(p1)
    assert np.array_equal(back.experts, small_trace.experts)
    assert np.array_equal(back.weights, small_trace.weights)
    assert back.meta.n_experts == 128 and back.meta.top_k == 8 and back.meta.n_layers == 48
    assert back.meta.extra["synth_config"]["seed"] == SMALL.seed
    assert "synthetic" in back.meta.provenance


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_layers=st.integers(1, 6),
    n_experts=st.integers(1, 20),
    k_frac=st.floats(0, 1),
    n_seqs=st.integers(1, 3),
    prefill=st.integers(0, 5),
    decode=st.integers(0, 12),
    reuse_p=st.floats(0, 1),
    skew=st.floats(0, 8),
    drift=st.floats(0, 0.5),
    predict=st.one_of(st.none(), st.floats(0, 1)),
    skip_last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_any_config_gives_a_valid_trace(n_layers, n_experts, k_frac, n_seqs, prefill, decode, reuse_p, skew,
                                        drift, predict, skip_last, seed):
    if prefill + decode == 0:
        decode = 1
    k = max(1, round(k_frac * n_experts))
    cfg = SynthConfig(
        model="tiny", n_layers=n_layers, n_experts=n_experts, top_k=k, n_seqs=n_seqs, prefill_tokens=prefill,
        decode_tokens=decode, reuse_p=reuse_p, skew_deep=skew, drift_share=drift, drift_tokens=3.0,
        predict_accuracy=predict, prefill_skip_last_layer=skip_last, seed=seed, prefill_reuse_scale=1.0,
    )
    tr = synthesize(cfg)
    validate(tr)
    if skip_last and prefill > 1 and n_layers >= 1:
        # every prefill step but each prompt's last skips the last layer; nothing else is absent
        expected = np.zeros((cfg.n_steps, n_layers), bool)
        t_in_seq = np.arange(cfg.n_steps) % (prefill + decode)
        expected[t_in_seq < prefill - 1, n_layers - 1] = True
        assert np.array_equal(tr.experts[:, :, 0] == ABSENT, expected)
    if not (skip_last and prefill > 1):
        assert_valid(tr, cfg)
    if predict is None:
        assert tr.predicted is None
    else:
        pr = tr.predicted
        assert (pr[:, 0] == ABSENT).all()
        ok = tr.experts[:, 1:, 0] != ABSENT
        body = pr[:, 1:][ok]
        assert ((body >= ABSENT) & (body < n_experts)).all()
        # a slot is unknown (ABSENT) only when no expert outside the true set is left for it
        misses_filled = np.array([len(set(b.tolist()) - set(t.tolist()) - {ABSENT})
                                  for b, t in zip(body, tr.experts[:, 1:][ok])])
        n_unknown = (body == ABSENT).sum(axis=1)
        assert ((n_unknown == 0) | (misses_filled == n_experts - k)).all()
        for row in body:
            known = row[row != ABSENT]
            assert len(set(known.tolist())) == known.size, "predicted ids repeat within a group"


def test_bad_config_raises_input_error():
    with pytest.raises(InputError, match="reuse_p"):
        SynthConfig(reuse_p=1.5)
    with pytest.raises(InputError, match="top_k"):
        SynthConfig(n_experts=4, top_k=5)
    with pytest.raises(InputError, match="topic_share \\+ drift_share"):
        SynthConfig(topic_share=0.8, drift_share=0.3)
    with pytest.raises(InputError, match="unknown model"):
        preset("gpt-5")


# ------------------------------------------------------------------------------ calibrated statistics


def test_default_reuse_and_lru_in_documented_bands(small_trace):
    reuse = brute_reuse(small_trace)
    assert abs(reuse - 0.45) <= 0.05, reuse
    lru40 = brute_lru_hit_rate(small_trace, 0.4)
    assert 0.88 <= lru40 <= 0.97, lru40
    # the library's statistics agree exactly with the brute-force references
    _, reuse_lib = reuse_by_layer(small_trace)
    assert reuse_lib == pytest.approx(reuse, abs=1e-12)
    assert lru_hit_rates(small_trace, [0.4])[0.4] == pytest.approx(lru40, abs=1e-12)


def test_stack_distance_lru_matches_ordereddict_at_many_sizes_with_absent_groups():
    cfg = dataclasses.replace(SMALL, n_seqs=2, prefill_tokens=6, decode_tokens=20, prefill_skip_last_layer=True,
                              n_layers=6, n_experts=16, top_k=3)
    tr = synthesize(cfg)
    assert (tr.experts[:, :, 0] == ABSENT).any()
    fractions = [0.02, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0]
    for phase in (DECODE, PREFILL):
        lib = lru_hit_rates(tr, fractions, phase)
        for f in fractions:
            assert lib[f] == pytest.approx(brute_lru_hit_rate(tr, f, phase), abs=1e-12), (phase, f)


def test_early_layers_route_more_uniformly_than_deep_ones(small_trace):
    dec = small_trace.experts[small_trace.phase == DECODE]
    ent = np.array([brute_entropy(dec[:, layer], 128) for layer in range(48)])
    assert np.allclose(popularity_entropy(small_trace), ent, atol=1e-12)
    assert ent[0] > 0.9, ent[0]  # 2 × 128 tokens × top-8 from a uniform law would give ≈ 0.97
    assert ent[0] > ent[24:].mean() + 0.08, (ent[0], ent[24:].mean())
    assert ent[:3].mean() > ent[24:].mean() + 0.05, (ent[:3], ent[24:].mean())
    reuse_l, _ = reuse_by_layer(small_trace)
    assert reuse_l[0] < reuse_l[24:].mean() - 0.15


def test_prediction_accuracy_matches_p_within_sampling_error():
    for p in (0.0, 0.7, 1.0):
        cfg = dataclasses.replace(SMALL, n_seqs=1, prefill_tokens=0, decode_tokens=150, predict_accuracy=p)
        tr = synthesize(cfg)
        ex, pr = tr.experts[:, 1:], tr.predicted[:, 1:]
        found = np.array([[len(set(ex[t, layer]) & set(pr[t, layer])) for layer in range(47)]
                          for t in range(tr.n_steps)])
        n = found.size * cfg.top_k
        acc = found.sum() / n
        assert prediction_accuracy(tr) == pytest.approx(acc, abs=1e-12)
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(acc - p) <= 4 * sigma + 1e-12, (p, acc)
        if p == 1.0:
            assert np.array_equal(ex, pr)  # every true expert kept in its own rank slot


def test_keep_mechanism_matches_exact_expectation_under_uniform_popularity():
    # With uniform popularity, m ~ Bin(k, r) previous experts are kept and k - m fresh ones are a
    # uniform subset of the E - m others, so E[reuse] = E[m + (k - m)^2 / (E - m)] / k.
    E, k, r = 16, 4, 0.3
    cfg = SynthConfig(model="u", n_layers=4, n_experts=E, top_k=k, n_seqs=1, prefill_tokens=0, decode_tokens=3000,
                      skew_early=0.0, skew_deep=0.0, layer_jitter=0.0, drift_share=0.0, reuse_p=r, reuse_p_early=r,
                      seed=5)
    tr = synthesize(cfg)
    expected = sum(math.comb(k, m) * r**m * (1 - r) ** (k - m) * (m + (k - m) ** 2 / (E - m)) for m in range(k + 1)) / k
    _, got = reuse_by_layer(tr)
    n = (tr.n_steps - 1) * cfg.n_layers
    assert abs(got - expected) < 4 * math.sqrt(0.25 / n) + 0.005, (got, expected)
    # reuse_p = 1: after the first token every layer repeats its set exactly
    tr1 = synthesize(dataclasses.replace(cfg, reuse_p=1.0, reuse_p_early=1.0, decode_tokens=20))
    assert all((np.sort(tr1.experts[t], axis=1) == np.sort(tr1.experts[0], axis=1)).all() for t in range(20))


def test_sequence_topic_makes_current_sequence_frequency_informative():
    cfg = preset("qwen3-30b-a3b", n_seqs=4, prefill_tokens=0, decode_tokens=120, seed=2)
    tr = synthesize(cfg)
    deep = slice(24, 48)

    def hist(rows):
        ids = tr.experts[rows, deep]  # [steps, 24, k]
        h = np.zeros((24, 128))
        for j in range(24):
            h[j] = np.bincount(ids[:, j].ravel(), minlength=128)
        return h.ravel()

    halves = [(hist(slice(s * 120, s * 120 + 60)), hist(slice(s * 120 + 60, s * 120 + 120))) for s in range(4)]
    same = np.mean([np.corrcoef(a, b)[0, 1] for a, b in halves])
    cross = np.mean([np.corrcoef(halves[i][0], halves[j][1])[0, 1] for i in range(4) for j in range(4) if i != j])
    assert same > cross + 0.2, (same, cross)


def test_drift_decorrelates_popularity_with_lag():
    def lag_reuse(tr, lag):
        a, b = tr.experts[lag:, 24:], tr.experts[:-lag, 24:]
        return (a[..., :, None] == b[..., None, :]).any(-1).mean()

    cfg = preset("qwen3-30b-a3b", n_seqs=1, prefill_tokens=0, decode_tokens=400, seed=4, n_layers=32)
    drifting = synthesize(dataclasses.replace(cfg, drift_share=0.5, drift_tokens=20.0))
    static = synthesize(dataclasses.replace(cfg, drift_share=0.0))
    assert lag_reuse(drifting, 4) - lag_reuse(drifting, 200) > 0.08
    assert abs(lag_reuse(static, 4) - lag_reuse(static, 200)) < 0.03


# ------------------------------------------------------------------------------ gate weights


@pytest.mark.parametrize("tail, temperature", [(0.0, 1.0), (0.5, 0.29), (1.0, 0.05)])
def test_gate_weights_match_brute_force_top_k_of_iid_logits(tail, temperature):
    n, k, reps = 128, 8, 20000
    rng = np.random.default_rng(1)
    got = gate_weights(rng.random((reps, k)), n, tail, temperature).astype(np.float64)
    x = rng.standard_exponential((reps, n))  # brute force: n i.i.d. logits, take the top k
    logits = -np.log(x) if tail == 0 else (1 - x**tail) / tail
    top = -np.sort(-logits, axis=1)[:, :k] / temperature
    ref = np.exp(top - top[:, :1])
    ref /= ref.sum(axis=1, keepdims=True)
    assert (np.diff(got, axis=1) <= 1e-7).all() and np.allclose(got.sum(axis=1), 1, atol=1e-6)
    se = ref.std(axis=0) / math.sqrt(reps)
    assert (np.abs(got.mean(axis=0) - ref.mean(axis=0)) < 5 * se * math.sqrt(2)).all()
    assert np.allclose(got.std(axis=0), ref.std(axis=0), rtol=0.05)


def test_default_gate_weights_close_to_real_qwen3_top6_rank_means():
    # Real Qwen3-30B-A3B (top-6, renormalised) mean weight by rank, from the BigMoeOnEdge decode trace.
    real = np.array([0.2653, 0.2009, 0.166, 0.1407, 0.1211, 0.106])
    cfg = PRESETS["qwen3-30b-a3b"]
    w = gate_weights(np.random.default_rng(0).random((20000, 6)), 128, cfg.gate_tail, cfg.gate_temperature)
    assert np.abs(w.mean(axis=0) - real).max() < 0.01


def test_stats_reports_the_documented_keys(small_trace):
    s = stats(small_trace, lru_fractions=(0.4,))
    assert set(s) >= {"reuse", "reuse_by_layer", "entropy_by_layer", "entropy_early", "entropy_deep",
                      "weight_mean_by_rank", "lru_hit_rate"}
    assert len(s["reuse_by_layer"]) == 48 and len(s["weight_mean_by_rank"]) == 8
    assert s["weight_mean_by_rank"] == sorted(s["weight_mean_by_rank"], reverse=True)


# ------------------------------------------------------------------------------ CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sim.synth", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def test_cli_writes_a_loadable_trace_and_prints_reuse(tmp_path):
    out = tmp_path / "m.npz"
    r = _cli("-o", str(out), "--model", "mixtral-8x7b", "--seqs", "2", "--prefill", "4", "--decode", "30",
             "--predict-accuracy", "0.8", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "reuse" in r.stdout and r.stdout.count("\n") == 1
    tr = load_trace(out)
    assert (tr.meta.model, tr.meta.n_layers, tr.meta.n_experts, tr.meta.top_k) == ("mixtral-8x7b", 32, 8, 2)
    assert tr.n_steps == 68 and tr.predicted is not None
    same = synthesize(preset("mixtral-8x7b", n_seqs=2, prefill_tokens=4, decode_tokens=30, seed=3,
                             predict_accuracy=0.8))
    assert np.array_equal(tr.experts, same.experts)


def test_cli_bad_argument_is_one_line_exit_2_and_no_file(tmp_path):
    out = tmp_path / "bad.npz"
    r = _cli("-o", str(out), "--reuse-p", "1.5")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "reuse_p" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_lagged_reuse_and_distinct_counts_match_python_sets():
    cfg = dataclasses.replace(SMALL, n_seqs=2, prefill_tokens=5, decode_tokens=30, n_layers=5)
    tr = synthesize(cfg)
    for lag in (1, 3, 7):
        hit = n = 0
        for t in range(lag, tr.n_steps):
            if tr.seq[t] != tr.seq[t - lag] or tr.phase[t] != DECODE:
                continue
            for layer in range(5):
                hit += len(set(tr.experts[t, layer].tolist()) & set(tr.experts[t - lag, layer].tolist()))
                n += cfg.top_k
        assert reuse_by_layer(tr, DECODE, lag)[1] == pytest.approx(hit / n, abs=1e-12)
    per_seq = [len({(layer, int(e)) for t in range(tr.n_steps) if tr.seq[t] == s and tr.phase[t] == DECODE
                    for layer in range(5) for e in tr.experts[t, layer]}) for s in range(2)]
    assert distinct_experts(tr) == pytest.approx(np.mean(per_seq))


def test_compare_cli_prints_real_beside_synthetic(tmp_path):
    real = tmp_path / "real.npz"
    save_trace(synthesize(dataclasses.replace(SMALL, n_seqs=1, prefill_tokens=4, decode_tokens=40, top_k=6)), real)
    r = _cli("--compare", str(real), "--seeds", "2")
    assert r.returncode == 0, r.stderr
    lines = {ln.split("  ")[0].strip(): ln.split()[-3:] for ln in r.stdout.splitlines()[2:]}
    assert "reuse lag 1" in lines and "gate weight rank 6" in lines and "gate weight rank 7" not in lines
    r = _cli("--compare", str(tmp_path / "missing.npz"))
    assert r.returncode == 2 and "missing.npz" in r.stderr


def test_default_preset_matches_real_qwen3_trace(shared_qwen_csv):
    """Calibration regression: the real Qwen3-30B-A3B route trace vs the preset at the same shape."""
    from sim.convert import read_route_csv

    rows = {r["statistic"]: r for r in compare(read_route_csv(shared_qwen_csv), seeds=3)}
    for key, tol in [("reuse lag 1", 0.04), ("reuse lag 8", 0.04), ("entropy layer 0", 0.06),
                     ("entropy layers 6-47", 0.03), ("LRU hit rate at 40% of experts", 0.03),
                     ("gate weight rank 1", 0.01)]:
        assert abs(rows[key]["real"] - rows[key]["synth_mean"]) < tol, rows[key]
    assert abs(rows["distinct experts per sequence"]["synth_mean"] / rows["distinct experts per sequence"]["real"] - 1) < 0.1
