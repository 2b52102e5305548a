"""The numba fast path replays exactly like the Python classes (groups, bypass, admits)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cache import make_key, make_policy
from sim.cache.fast import FAST_POLICIES, replay_hits, replay_hits_python


@st.composite
def streams(draw):
    """A random stream: keys from a small pool (fixed size per key), group starts, admit flags."""
    pool = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 2)),
                         min_size=1, max_size=12, unique=True))
    keys = [make_key(*t) for t in pool]
    size_of = {k: draw(st.integers(0, 5)) for k in keys}
    n = draw(st.integers(0, 120))
    idx = draw(st.lists(st.integers(0, len(keys) - 1), min_size=n, max_size=n))
    stream = np.array([keys[i] for i in idx], np.int64)
    sizes = np.array([size_of[k] for k in stream], np.int64)
    starts = np.array(sorted(draw(st.lists(st.integers(0, n), max_size=n // 2 + 2))), np.int64)
    admit = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), np.int64) == 0
    cap = draw(st.integers(0, 25))
    return stream, sizes, starts, admit, cap


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=streams(), share=st.sampled_from([0.0, 0.25, 0.8, 1.0]))
def test_fast_path_equals_python_class(s, share):
    keys, sizes, starts, admit, cap = s
    for policy, params in (("lru", {}), ("slru", {"protected_share": share})):
        fast = replay_hits(policy, keys, sizes, starts, cap, is_admit=admit, **params)
        cache = make_policy(policy, cap, **params)
        slow = replay_hits_python(cache, keys, sizes, starts, is_admit=admit)
        np.testing.assert_array_equal(fast, slow)


def test_fast_path_on_a_large_sparse_key_space_uses_the_unique_fallback():
    rng = np.random.default_rng(3)
    keys = np.array([make_key(int(l), int(e), 0) for l, e in zip(rng.integers(0, 300, 400), rng.integers(0, 60000, 400))])
    keys = np.concatenate([keys, keys[::-1]])
    sizes = np.ones(len(keys), np.int64)
    starts = np.arange(0, len(keys), 4)
    for policy in FAST_POLICIES:
        slow = replay_hits_python(make_policy(policy, 50), keys, sizes, starts)
        np.testing.assert_array_equal(replay_hits(policy, keys, sizes, starts, 50), slow)


def test_python_fallback_for_other_policies_and_input_checks():
    keys = np.array([make_key(0, e, 0) for e in (0, 1, 0, 2, 1, 0)])
    sizes = np.ones(6, np.int64)
    starts = np.array([0, 2, 4])
    # belady is prepared with the stream itself: cap 2 keeps 0 and 1, bypasses 2 (never used again)
    assert replay_hits("belady", keys, sizes, starts, 2).tolist() == [False, False, True, False, True, True]
    # s3fifo, cap 2 (small queue target 0.2 bytes): 0 1 miss; 0 hits (freq 1); 2: small head 0 was hit
    # -> main, 1 -> ghost; 1 misses, from the ghost into main, evicting 2 (0 is protected); 0 hits
    assert replay_hits("s3fifo", keys, sizes, starts, 2).tolist() == [False, False, True, False, False, True]
    with pytest.raises(TypeError, match="calibration"):
        replay_hits("static", keys, sizes, starts, 2)
    got = replay_hits("static", keys, sizes, starts, 1, calibration=(keys, sizes))  # pins expert 0
    assert got.tolist() == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="group_starts"):
        replay_hits("lru", keys, sizes, np.array([3, 1]), 2)
    with pytest.raises(ValueError, match="same length|one length"):
        replay_hits("lru", keys, sizes[:3], starts, 2)
    with pytest.raises(TypeError):
        replay_hits("lru", keys, sizes, starts, 2, protected_share=0.5)
