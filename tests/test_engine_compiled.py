"""The compiled engine (sim.engine_compiled, sim.engine_belady) equals the reference engine access for access.

Random small traces (prefill and decode, several sequences, trace predictions) through every
compiled cache policy × precision policies (native, static, dynamic, combinations, split pools; every
low format, the tensor-aware `_gu` ones included; belady: native and static, one pool) × partitions ×
prefetch modes × capacities: every field of the Outcome must be equal, exactly.
The hypothesis profile (tests/conftest.py: `ci` / `dev`) sets how many examples run.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.engine import CacheSpec, replay
from sim.engine_compiled import COMPILED_POLICIES, replay_compiled
from sim.precision import parse_precision, static_slots
from sim.simulate import ReplayConfig, prepare
from tests.test_engine import random_trace

PRECISIONS = (
    "native",
    "static:freq:50%:q2_k",
    "static:random:25%:q3_k",
    "dynamic:0.6:0.9",
    "dynamic:0.3:0.7:q3_k",
    "dynamic:0:0.5",
    "static:mass:30%:q2_k+dynamic:0.5:0.8",
    "static:mass:30%:q3_k+dynamic:0.5:0.8:q3_k",
    "static:freq:50%:q2_k+pools:split:0.25",
    "dynamic:0.6:0.9+pools:split:0.4",
    "static:mass:30%:q3_k+dynamic:0.4:0.9+pools:split:0.3",
    # HOBBIT's `serve` low-copy rule: a resident low copy also serves a use ranked <= T1
    "dynamic:0.6:0.9:q2_k:serve",
    "static:mass:30%:q3_k+dynamic:0.3:0.8:q2_k:serve",
    "dynamic:0.5:0.9:q3_k:serve+pools:split:0.3",
    # tensor-aware low formats (their own slots; drawn on traces with Q4_K_M-style sizes)
    "static:mass:30%:q2_k_gu",
    "dynamic:0.5:0.8:q3_k_gu",
    "static:freq:50%:q3_k_gu+dynamic:0.4:0.9:q2_k_gu",
    "static:mass:30%:q2_k+dynamic:0.5:0.8:q2_k_gu+pools:split:0.3",
    "dynamic:0.6:0.9:q2_k_gu+pools:split:0.4",
)
POLICIES = tuple(sorted(COMPILED_POLICIES)) + ("belady",)
BELADY_PRECISIONS = tuple(p for p in PRECISIONS if "dynamic" not in p and "pools" not in p)  # what belady runs with
PARAMS = {
    "slru": ({}, {"protected_share": 0.0}, {"protected_share": 0.5}, {"protected_share": 1.0}),
    "s3fifo": ({}, {"small_share": 0.3, "ghost_share": 0.5}, {"move_to_main_threshold": 2}),
    "hobbit": ({}, {"w_recency": 0.2, "w_frequency": 2.0, "w_high_precision": 1.0, "w_layer_distance": 0.5},
               {"w_recency": 0.0},  # no recency term: the compiled victim search cannot stop early
               {"w_frequency": -1.0}),  # a negative weight: the compiled search scans every entry
}


def _outcomes(trace, policy, precision, capacity, partition, prefetch, params, calib=0.3):
    prep = prepare(ReplayConfig(trace=trace, calib_fraction=calib, prefetch=prefetch, seed=1))
    pol = parse_precision(precision)
    slots = static_slots(prep.calib_trace, pol, trace.meta.n_layers, trace.meta.n_experts, 0)
    spec = CacheSpec(policy, capacity, partition, trace.meta.n_layers, params)
    ref = replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s, fast=False)
    fast = replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s, fast=True)
    return ref, fast


def _assert_same(ref, fast):
    for name in ("result", "slot", "prefetch_bytes", "prefetch_loads", "prefetch_link_s", "wait_group"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(ref, name), err_msg=name)


@st.composite
def cases(draw):
    policy = draw(st.sampled_from(POLICIES))
    precision = draw(st.sampled_from(BELADY_PRECISIONS if policy == "belady" else PRECISIONS))
    return dict(
        seed=draw(st.integers(0, 10**6)),
        n_layers=draw(st.integers(1, 4)),
        n_experts=draw(st.integers(4, 12)),
        k=draw(st.integers(1, 4)),
        n_seqs=draw(st.integers(1, 3)),
        prefill=draw(st.integers(0, 6)),
        policy=policy,
        params=draw(st.sampled_from(PARAMS.get(policy, ({},)))),
        precision=precision,
        # a tensor-aware format needs named native formats to size its ffn_down
        native="q4_k_m" if "_gu" in precision else draw(st.sampled_from(("flat", "q4_k_m"))),
        capacity=draw(st.one_of(st.integers(0, 16000), st.integers(1500, 9000))),  # 1.5 to 9 experts: evictions
        partition=draw(st.sampled_from(("global", "per-layer"))),
        prefetch=draw(st.sampled_from(("none", "trace", "oracle:0.7", "oracle:1.0"))),
    )


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases())
def test_compiled_engine_equals_reference(c):
    # sim.engine.oracle_predictions needs room for k wrong experts beside the true k (else it loops)
    k = min(c["k"], c["n_experts"] // 2)
    trace = random_trace(n_steps=30, n_layers=c["n_layers"], n_experts=c["n_experts"], k=k, seed=c["seed"],
                         n_seqs=c["n_seqs"], prefill=c["prefill"], predicted=True, native=c["native"])
    ref, fast = _outcomes(trace, c["policy"], c["precision"], c["capacity"], c["partition"], c["prefetch"], c["params"])
    _assert_same(ref, fast)


def test_lfu_priority_that_falls_with_the_age():
    """Found by a random CI draw (2026-12-06): LFU-DA's age L can fall (a protected entry keeps an old
    low K and is evicted later), so a hit's K = count + L can be below its old K; the compiled heap
    re-placed a touched entry only downwards and served 2 of 270 accesses as hits the reference loads."""
    c = dict(seed=11, n_layers=3, n_experts=11, k=3, n_seqs=1, prefill=1)
    trace = random_trace(n_steps=30, n_layers=c["n_layers"], n_experts=c["n_experts"], k=c["k"], seed=c["seed"],
                         n_seqs=c["n_seqs"], prefill=c["prefill"], predicted=True)
    ref, fast = _outcomes(trace, "lfu", "static:mass:30%:q3_k+dynamic:0.4:0.9+pools:split:0.3", 9000, "global",
                          "oracle:0.7", {})
    _assert_same(ref, fast)


@pytest.mark.parametrize("policy, precision", [
    (p, q) for p in POLICIES for q in (
        ("native", "static:mass:30%:q3_k", "static:mass:30%:q2_k_gu") if p == "belady" else
        ("native", "static:mass:30%:q3_k+dynamic:0.5:0.8", "dynamic:0.6:0.9+pools:split:0.4",
         "static:mass:30%:q3_k_gu+dynamic:0.5:0.8:q2_k_gu"))])
def test_compiled_engine_on_a_qwen_shaped_trace(policy, precision):
    """Many groups, 128 experts, top-8, oracle prefetch: long eviction chains on both paths."""
    from sim.synth import preset, synthesize

    trace = synthesize(preset("qwen3-30b-a3b", n_seqs=2, prefill_tokens=16, decode_tokens=24, seed=4))
    cap = int(0.2 * trace.meta.n_layers * trace.meta.n_experts * 2_654_208)  # 20 % of the Q4_K experts
    ref, fast = _outcomes(trace, policy, precision, cap, "global", "oracle:0.8", {})
    _assert_same(ref, fast)


@pytest.mark.parametrize("policy", sorted(COMPILED_POLICIES))
def test_int64_rows_and_the_lfu_rerun_give_the_same_outcome(policy, monkeypatch):
    """M's rows are int32 where their values are bounded (sim.engine_compiled._m_dtype); the int64 rows a
    longer trace gets, and the int64 rerun after an LFU priority outgrew int32 (forced here by lowering
    the limit to 3), must replay exactly as the reference does."""
    import sim.engine_compiled as ec
    from sim.synth import preset, synthesize

    trace = synthesize(preset("qwen3-30b-a3b", n_seqs=2, prefill_tokens=8, decode_tokens=16, seed=5))
    cap = int(0.2 * trace.meta.n_layers * trace.meta.n_experts * 2_654_208)
    prep = prepare(ReplayConfig(trace=trace, calib_fraction=0.3, prefetch="oracle:0.8", seed=1))
    spec = CacheSpec(policy, cap, "global", trace.meta.n_layers, {})
    for precision in ("native", "static:mass:30%:q3_k+dynamic:0.5:0.8"):  # a specialised entry, the generic one
        pol = parse_precision(precision)
        slots = static_slots(prep.calib_trace, pol, trace.meta.n_layers, trace.meta.n_experts, 0)
        ref = replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s, fast=False)
        dtypes, limits = [], []
        monkeypatch.setattr(ec, "_m_dtype", lambda *a, f=ec._m_dtype: dtypes.append(f(*a)) or dtypes[-1])
        _assert_same(ref, replay_compiled(prep.groups, spec, pol, slots, prep.sizes, prep.link_s))
        assert dtypes == [np.int32]  # this trace's rows are int32
        monkeypatch.setattr(ec, "_m_dtype", lambda *a: np.int64)
        _assert_same(ref, replay_compiled(prep.groups, spec, pol, slots, prep.sizes, prep.link_s))
        monkeypatch.undo()
        monkeypatch.setattr(ec, "_k_max", lambda dt: limits.append(np.dtype(dt)) or (3 if dt == np.int32 else 2**62))
        _assert_same(ref, replay_compiled(prep.groups, spec, pol, slots, prep.sizes, prep.link_s))
        assert limits == [np.dtype(np.int32)] + ([np.dtype(np.int64)] if policy == "lfu" else [])
        monkeypatch.undo()


def test_belady_counts_a_victim_once():
    """Found by comparing the compiled belady with the reference: the class's heap kept an item from an
    earlier stay of a key that was admitted again with the same next use, and the admission test counted
    that key's bytes twice (so it admitted what needed an entry ranked better to go)."""
    trace = random_trace(n_steps=30, n_layers=4, n_experts=9, k=3, seed=342, n_seqs=2, prefill=1, predicted=True)
    ref, fast = _outcomes(trace, "belady", "static:random:25%:q3_k", 2200, "global", "oracle:0.7", {})
    _assert_same(ref, fast)


def test_belady_split_pools_run_the_reference_and_bad_parameters_are_refused():
    trace = random_trace(seed=1, n_steps=10)
    prep = prepare(ReplayConfig(trace=trace, calib_fraction=0.3))
    pol = parse_precision("static:freq:50%:q2_k+pools:split:0.25")
    slots = static_slots(prep.calib_trace, pol, 3, 16, 0)
    assert replay_compiled(prep.groups, CacheSpec("belady", 5000, n_layers=3), pol, slots, prep.sizes, prep.link_s) is None
    pol = parse_precision("native")
    slots = static_slots(None, pol, 3, 16, 0)
    with pytest.raises(TypeError):
        replay_compiled(prep.groups, CacheSpec("belady", 5000, n_layers=3, params={"x": 1}), pol, slots, prep.sizes,
                        prep.link_s)
    with pytest.raises(TypeError):
        replay_compiled(prep.groups, CacheSpec("lru", 5000, n_layers=3, params={"x": 1}), pol, slots, prep.sizes, prep.link_s)
    with pytest.raises(ValueError):
        replay_compiled(prep.groups, CacheSpec("slru", 5000, n_layers=3, params={"protected_share": 2.0}), pol, slots,
                        prep.sizes, prep.link_s)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("partition", ["global", "per-layer"])
@pytest.mark.parametrize("precision", ["native", "static:freq:50%:q2_k+pools:split:0.4",
                                       "static:mass:30%:q3_k+dynamic:0.4:0.9+pools:split:0.3",
                                       "static:freq:50%:q3_k_gu+dynamic:0.4:0.9:q2_k_gu+pools:split:0.3"])
def test_static_pinning_matches_the_class_fit(seed, partition, precision):
    """The kernel's vectorised pinning equals StaticPinned.fit per pool and per layer."""
    trace = random_trace(seed=seed, n_steps=60, n_layers=3, n_experts=12, k=3, predicted=True,
                         native="q4_k_m" if "_gu" in precision else "flat")
    ref, fast = _outcomes(trace, "static", precision, [2500, 6000, 9000, 15000][seed], partition, "trace", {})
    _assert_same(ref, fast)


@pytest.mark.parametrize("precision", ["native", "dynamic:0.5:0.8+pools:split:0.4"])
def test_hobbit_per_layer_with_more_partitions_than_trace_layers(precision):
    """The compiled hobbit sizes its uses histograms per partition, trace layers or not."""
    trace = random_trace(seed=3, n_steps=40, n_layers=3, n_experts=8, k=2, n_seqs=2, prefill=3, predicted=True)
    prep = prepare(ReplayConfig(trace=trace, prefetch="trace"))
    pol = parse_precision(precision)
    slots = static_slots(prep.calib_trace, pol, 3, 8, 0)
    spec = CacheSpec("hobbit", 6000, "per-layer", 5, {})
    _assert_same(replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s, fast=False),
                 replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s, fast=True))
