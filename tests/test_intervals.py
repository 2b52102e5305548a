"""Bootstrap intervals: vectorised counts against a brute-force loop, and analytic edge cases."""
import numpy as np
import pandas as pd
import pytest

from analysis.intervals import (
    block_units, paired_frame, paired_ratio_interval, ratio_interval, resample_counts, resample_indices,
    speedup_interval, unit_of_steps,
)


def units(seed=1, n=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 500, n).astype(float)
    time_a = tokens / rng.uniform(20, 40, n)
    time_b = time_a * rng.uniform(0.8, 1.05, n)
    return tokens, time_a, time_b


def brute_percentile_interval(stat, n, R, seed):
    idx = resample_indices(n, R, seed)
    samples = np.array([stat(idx[r]) for r in range(R)])
    return np.percentile(samples, [2.5, 97.5])


def test_counts_are_the_drawn_indices():
    idx = resample_indices(7, 50, seed=3)
    c = resample_counts(7, 50, seed=3)
    for r in range(50):
        np.testing.assert_array_equal(c[r], np.bincount(idx[r], minlength=7))
    assert c.sum(axis=1).tolist() == [7] * 50


def test_ratio_and_paired_intervals_match_brute_force_loop():
    tokens, ta, tb = units()
    n, R, seed = tokens.size, 500, 11
    iv = ratio_interval(tokens, ta, n_resamples=R, seed=seed)
    lo, hi = brute_percentile_interval(lambda i: tokens[i].sum() / ta[i].sum(), n, R, seed)
    assert iv.estimate == pytest.approx(tokens.sum() / ta.sum())
    assert (iv.lo, iv.hi) == pytest.approx((lo, hi), rel=1e-12)

    d = speedup_interval(ta, tokens, tb, tokens, n_resamples=R, seed=seed)
    lo, hi = brute_percentile_interval(
        lambda i: (tokens[i].sum() / tb[i].sum()) / (tokens[i].sum() / ta[i].sum()) - 1, n, R, seed)
    assert d.estimate == pytest.approx(ta.sum() / tb.sum() - 1)
    assert (d.lo, d.hi) == pytest.approx((lo, hi), rel=1e-10)
    assert d.lo < d.estimate < d.hi

    hits_a, hits_b, acc = tokens * 0.7, tokens * 0.8 - 3, tokens * 8
    h = paired_ratio_interval(hits_a, acc, hits_b, acc, relative=False, n_resamples=R, seed=seed)
    lo, hi = brute_percentile_interval(lambda i: hits_b[i].sum() / acc[i].sum() - hits_a[i].sum() / acc[i].sum(),
                                       n, R, seed)
    assert (h.lo, h.hi) == pytest.approx((lo, hi), rel=1e-10)


def test_identical_configurations_give_exactly_zero():
    tokens, ta, _ = units()
    d = speedup_interval(ta, tokens, ta.copy(), tokens.copy(), seed=5)
    assert (d.estimate, d.lo, d.hi) == (0.0, 0.0, 0.0)
    h = paired_ratio_interval(tokens, ta, tokens, ta, relative=False)
    assert (h.estimate, h.lo, h.hi) == (0.0, 0.0, 0.0)


def test_constant_per_unit_ratio_gives_a_degenerate_interval():
    tokens, ta, _ = units()
    d = speedup_interval(ta, tokens, ta * 0.5, tokens)  # every unit runs in half the time
    assert (d.estimate, d.lo, d.hi) == (1.0, 1.0, 1.0)
    r = ratio_interval(3.0 * ta, ta)  # every unit has the same rate → every resample too
    assert r.lo == pytest.approx(3.0, rel=1e-14) and r.hi == pytest.approx(3.0, rel=1e-14)


def test_deterministic_for_a_seed_and_paired_is_narrower_than_unpaired():
    tokens, ta, tb = units(n=40)
    a = speedup_interval(ta, tokens, tb, tokens, seed=2)
    assert a == speedup_interval(ta, tokens, tb, tokens, seed=2)
    assert a != speedup_interval(ta, tokens, tb, tokens, seed=3)
    # unpaired: independent draws for a and b; the ratio of two independent intervals is wider
    ra = ratio_interval(tokens, ta, seed=2)
    rb = ratio_interval(tokens, tb, seed=9)
    assert (a.hi - a.lo) < (rb.hi / ra.lo - rb.lo / ra.hi)


def test_coverage_of_a_known_mean_is_near_95_percent():
    rng = np.random.default_rng(0)
    true_rate = 1.0  # tokens / time with tokens = 1 per unit and time ~ Exp(1): Σ1/Σt → 1
    inside = 0
    trials = 300
    for k in range(trials):
        t = rng.exponential(1.0, 60)
        iv = ratio_interval(np.ones(60), t, n_resamples=400, seed=k)
        inside += iv.lo <= true_rate <= iv.hi
    assert 0.88 <= inside / trials <= 0.99


def test_block_units():
    np.testing.assert_array_equal(block_units(np.arange(9), 4), [0 + 1 + 2 + 3, 4 + 5 + 6 + 7 + 8])  # 1 < half: merged
    np.testing.assert_array_equal(block_units(np.arange(10), 4), [6, 22, 8 + 9])  # 2 = half: kept
    np.testing.assert_array_equal(block_units(np.ones(10), 3), [3, 3, 4])
    np.testing.assert_array_equal(block_units(np.ones(11), 4), [4, 4, 3])  # 3 ≥ half a block: kept
    assert block_units(np.ones(5), 100).tolist() == [5]
    with pytest.raises(ValueError):
        block_units(np.ones(3), 0)


def frame():
    tokens, ta, tb = units(n=10)
    rows = []
    for gpu, scale in (("g1", 1.0), ("g2", 2.0)):
        for cfg, t in (("native", ta), ("static", tb)):
            for u in range(10):
                rows.append(dict(gpu=gpu, config=cfg, unit=u, time_s=t[u] * scale, tokens=tokens[u],
                                 hits=tokens[u] * (0.6 if cfg == "native" else 0.7), accesses=tokens[u] * 8))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter


def test_paired_frame_matches_direct_calls_and_contract():
    df = frame()
    out = paired_frame(df, ["gpu"], "native", seed=4, n_resamples=300)
    assert list(out.columns) == ["gpu", "config", "n_units", "tok_s", "tok_s_lo", "tok_s_hi", "delta", "delta_lo",
                                 "delta_hi", "hit_rate", "hit_rate_lo", "hit_rate_hi", "hit_delta", "hit_delta_lo",
                                 "hit_delta_hi", "few_units"]
    base = out[out.config == "native"]
    assert (base[["delta", "delta_lo", "delta_hi", "hit_delta", "hit_delta_lo", "hit_delta_hi"]] == 0).all().all()
    tokens, ta, tb = units(n=10)
    want = speedup_interval(ta, tokens, tb, tokens, seed=4, n_resamples=300)
    got = out[(out.gpu == "g1") & (out.config == "static")].iloc[0]
    assert (got.delta, got.delta_lo, got.delta_hi) == pytest.approx((want.estimate, want.lo, want.hi))
    # scaling every time by 2 halves tok/s but leaves Δ unchanged
    g2 = out[(out.gpu == "g2") & (out.config == "static")].iloc[0]
    assert (g2.delta, g2.delta_lo, g2.delta_hi) == pytest.approx((got.delta, got.delta_lo, got.delta_hi))
    assert g2.tok_s == pytest.approx(got.tok_s / 2)
    assert got.hit_delta == pytest.approx(0.1 / 8) and not got.few_units  # 10 units ≥ MIN_UNITS


def test_paired_frame_rejects_unmatched_units_and_missing_baseline():
    df = frame()
    with pytest.raises(ValueError, match="baseline"):
        paired_frame(df, ["gpu"], "nope")
    bad = df.drop(df[(df.config == "static") & (df.unit == 3)].index)
    with pytest.raises(ValueError, match="units"):
        paired_frame(bad, ["gpu"], "native")
    with pytest.raises(ValueError, match="missing"):
        paired_frame(df.drop(columns="tokens"), ["gpu"], "native")


def test_unit_of_steps_sequences_or_blocks_agree_with_block_units():
    np.testing.assert_array_equal(unit_of_steps(np.array([3, 3, 5, 5, 5, 9])), [0, 0, 1, 1, 1, 2])
    one = np.zeros(10, dtype=int)
    ids = unit_of_steps(one, block_tokens=4)
    np.testing.assert_array_equal(ids, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    vals = np.arange(10.0)
    np.testing.assert_array_equal(np.bincount(ids, weights=vals), block_units(vals, 4))
    np.testing.assert_array_equal(np.bincount(unit_of_steps(np.zeros(9), 4), weights=np.arange(9.0)),
                                  block_units(np.arange(9.0), 4))
