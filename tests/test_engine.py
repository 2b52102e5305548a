"""The logical replay engine: precision rules, cache driving, compiled path, prefetch, accounting."""
from collections import OrderedDict

import numpy as np
import pytest

from sim import engine
from sim.cache import make_policy
from sim.engine import (
    HIT,
    LOADED,
    SKIPPED,
    CacheSpec,
    build_groups,
    calibration_steps,
    oracle_predictions,
    replay,
    replay_reference,
)
from sim.precision import parse_precision, static_slots
from sim.simulate import ReplayConfig, prepare, run, run_prepared
from sim.trace import DECODE, PREFILL, Trace, TraceMeta

EXPERT_BYTES = 1000


# Q4_K_M-style native sizes of random_trace's experts (3 tensors of 1024 weights = 4 super-blocks each;
# ggml: Q4_K 144 and Q6_K 210 bytes per 256 weights): layers alternate Q4_K and Q4_K with a Q6_K ffn_down
Q4_K_M_LAYERS = (("q4_k", 3 * 4 * 144), ("q4_k+q6_k_down", 2 * 4 * 144 + 4 * 210))


def random_trace(n_steps=60, n_layers=3, n_experts=16, k=4, seed=0, n_seqs=2, prefill=5, predicted=False,
                 native="flat") -> Trace:
    """A skewed random routing trace of a small model that only its metadata describes.

    `native`: "flat" (every expert EXPERT_BYTES, no format named) or "q4_k_m" (Q4_K_M_LAYERS by layer,
    with their format names, so that tensor-aware low formats can be sized)."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(n_experts, 0.5), size=n_layers)
    experts = np.empty((n_steps, n_layers, k), np.int16)
    for t in range(n_steps):
        for layer in range(n_layers):
            experts[t, layer] = rng.choice(n_experts, size=k, replace=False, p=pop[layer])
    weights = np.sort(rng.dirichlet(np.ones(k), size=(n_steps, n_layers)), axis=-1)[..., ::-1]
    weights = (weights / weights.sum(-1, keepdims=True)).astype(np.float32)
    seq = np.repeat(np.arange(n_seqs), n_steps // n_seqs + 1)[:n_steps]
    phase = np.full(n_steps, DECODE, np.uint8)
    for s in range(n_seqs):
        phase[np.flatnonzero(seq == s)[:prefill]] = PREFILL
    sizes = dict(expert_bytes=(EXPERT_BYTES,) * n_layers)
    if native == "q4_k_m":
        layers = [Q4_K_M_LAYERS[layer % 2] for layer in range(n_layers)]
        sizes = dict(expert_bytes=tuple(b for _, b in layers), expert_format=tuple(f for f, _ in layers))
    meta = TraceMeta(model="tiny-test-moe", n_layers=n_layers, n_experts=n_experts, top_k=k,
                     expert_weights=256 * 12, provenance="test", **sizes)
    pred = None
    if predicted:
        pred = np.array(experts)
        pred[:, 0] = -1
    return Trace.from_arrays(experts, weights, phase, seq, meta, pred)


def brute_force_lru(groups, sizes_of, capacity):
    """Per-access hits of a byte LRU that never evicts the current group's keys (bypass if no room)."""
    cache: OrderedDict = OrderedDict()
    hits = []
    for g in range(groups.n_groups):
        lo, hi = groups.start[g], groups.start[g + 1]
        keys = [(int(groups.layer[g]), int(e)) for e in groups.expert[lo:hi]]
        protected = set(keys)
        for key in keys:
            size = sizes_of(key)
            if key in cache:
                cache.move_to_end(key)
                hits.append(True)
                continue
            hits.append(False)
            used = sum(cache.values())
            evictable = sum(s for k, s in cache.items() if k not in protected)
            if used - evictable + size > capacity:
                continue  # bypass
            for victim in [k for k in cache if k not in protected]:
                if used + size <= capacity:
                    break
                used -= cache.pop(victim)
            cache[key] = size
    return np.array(hits)


def _replay(trace, policy="lru", precision="native", capacity=8000, partition="global", calib=0.0, **params):
    cfg = ReplayConfig(trace=trace, policy=policy, precision=precision, capacity_bytes=capacity,
                       partition=partition, calib_fraction=calib, timeline=False, policy_params=params)
    prep = prepare(cfg)
    pol = parse_precision(precision)
    slots = static_slots(prep.calib_trace, pol, trace.meta.n_layers, trace.meta.n_experts, 0)
    spec = CacheSpec(policy, capacity, partition, trace.meta.n_layers, params)
    ref = replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s, fast=False)
    fast = replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s, fast=True)
    return prep, ref, fast


@pytest.mark.parametrize("capacity", [3000, 8000, 20000])
def test_native_lru_matches_brute_force(capacity):
    trace = random_trace(seed=capacity)
    prep, ref, fast = _replay(trace, capacity=capacity)
    expected = brute_force_lru(prep.groups, lambda key: EXPERT_BYTES, capacity)
    np.testing.assert_array_equal(ref.result == HIT, expected)
    np.testing.assert_array_equal(fast.result, ref.result)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", ["lru", "slru"])
@pytest.mark.parametrize("precision", ["native", "static:freq:50%:q2_k", "static:random:25%:q3_k"])
@pytest.mark.parametrize("partition", ["global", "per-layer"])
def test_compiled_path_equals_reference(seed, policy, precision, partition):
    trace = random_trace(seed=seed, n_steps=50)
    capacity = [2500, 6000, 9000, 15000, 4000, 30000][seed]
    _, ref, fast = _replay(trace, policy, precision, capacity, partition, calib=0.3)
    np.testing.assert_array_equal(fast.result, ref.result)
    np.testing.assert_array_equal(fast.slot, ref.slot)


def test_dynamic_rule_by_hand():
    # One layer, one decode token repeated: weights 0.5, 0.3, 0.15, 0.05 in rank order give HOBBIT
    # scores 0, 0.5, 0.8, 0.95. With T1 = 0.6, T2 = 0.9 and room for everything: ranks 0-1 load at
    # native precision, rank 2 loads at q2_k, rank 3 is skipped. On the repeat, ranks 0-2 hit (rank 2
    # on its q2_k copy) and rank 3 is skipped again (it is never resident).
    experts = np.array([[[3, 1, 2, 0]]] * 2, np.int16)
    weights = np.array([[[0.5, 0.3, 0.15, 0.05]]] * 2, np.float32)
    meta = TraceMeta(model="tiny", n_layers=1, n_experts=4, top_k=4, expert_bytes=(EXPERT_BYTES,), expert_weights=3072)
    trace = Trace.from_arrays(experts, weights, [DECODE, DECODE], [0, 0], meta)
    prep, ref, fast = _replay(trace, precision="dynamic:0.6:0.9", capacity=10**6)
    np.testing.assert_array_equal(fast.result, ref.result)  # the compiled path agrees
    assert ref.result.tolist() == [LOADED, LOADED, LOADED, SKIPPED, HIT, HIT, HIT, SKIPPED]
    assert ref.slot.tolist() == [0, 0, 1, -1, 0, 0, 1, -1]
    rec = run_prepared(prep, ReplayConfig(trace=trace, precision="dynamic:0.6:0.9", capacity_bytes=10**6,
                                          calib_fraction=0, timeline=False))
    assert rec.low_precision_mass == pytest.approx(0.15, abs=1e-6)
    assert rec.skipped_mass == pytest.approx(0.05, abs=1e-6)
    assert rec.hits == 3 and rec.misses == 3 and rec.skipped == 2


def test_static_demotion_matches_brute_force():
    trace = random_trace(seed=3, n_steps=80)
    calib = trace.select(slice(0, 40))
    for signal in ("freq", "weight", "mass"):
        slots = static_slots(calib, parse_precision(f"static:{signal}:25%:q2_k"), 3, 16, 0)
        for layer in range(3):
            stats = {}
            for t in range(calib.n_steps):
                for e, w in zip(calib.experts[t, layer].tolist(), calib.weights[t, layer].tolist()):
                    n, m = stats.get(e, (0, 0.0))
                    stats[e] = (n + 1, m + w)
            def score(e, stats=stats, signal=signal):
                n, m = stats.get(e, (0, 0.0))
                return {"freq": n, "mass": m, "weight": m / n if n else 0.0}[signal]
            expected = sorted(range(16), key=lambda e: (score(e), e))[:4]
            assert sorted(np.flatnonzero(slots[layer]).tolist()) == sorted(expected), (signal, layer)


def test_perfect_oracle_prefetch_leaves_only_first_layer_misses():
    trace = random_trace(seed=5, n_steps=40, prefill=0, n_seqs=1)
    rec = run(ReplayConfig(trace=trace, policy="lru", capacity_bytes=10**7, prefetch="oracle:1.0", calib_fraction=0))
    prep = prepare(ReplayConfig(trace=trace, prefetch="oracle:1.0", calib_fraction=0))
    layer0 = prep.groups.layer == 0
    first_use_layer0 = len(np.unique(trace.experts[:, 0]))
    assert rec.misses == first_use_layer0  # every other expert was prefetched before it was needed
    assert rec.prefetch_bytes > 0 and layer0.any()


def test_oracle_predictions_accuracy_and_validity():
    trace = random_trace(seed=7, n_steps=200)
    pred = oracle_predictions(trace, 0.6, seed=1)
    assert abs((pred == trace.experts).mean() - 0.6) < 0.03
    s = np.sort(pred.astype(int), axis=-1)
    assert not (s[..., 1:] == s[..., :-1]).any()
    assert np.array_equal(pred, oracle_predictions(trace, 0.6, seed=1))


def test_record_accounting_and_determinism():
    trace = random_trace(seed=11, n_steps=80, predicted=True)
    cfg = ReplayConfig(trace=trace, policy="slru", capacity_bytes=9000, precision="static:mass:30%:q2_k+dynamic:0.5:0.8",
                       prefetch="trace", gpu="rtx4070-12gb")
    a, b = run(cfg), run(cfg)
    assert a == b
    assert a.hits + a.misses + a.skipped == a.accesses
    assert a.bytes_moved == a.demand_bytes + a.prefetch_bytes
    assert 0 < a.low_precision_mass < 1 and 0 <= a.skipped_mass < 1
    assert a.tokens_per_s > 0 and 0 <= a.stall_fraction < 1


def test_split_pools_respect_their_shares():
    trace = random_trace(seed=2, n_steps=60)
    rec = run(ReplayConfig(trace=trace, policy="lru", capacity_bytes=6000, calib_fraction=0.3,
                           precision="static:freq:50%:q2_k+pools:split:0.25", timeline=False))
    shared = run(ReplayConfig(trace=trace, policy="lru", capacity_bytes=6000, calib_fraction=0.3,
                              precision="static:freq:50%:q2_k", timeline=False))
    assert rec.accesses == shared.accesses and rec.hit_rate != shared.hit_rate


def test_calibration_window_by_sequence_and_by_step():
    trace = random_trace(n_steps=40, n_seqs=4)
    calib = calibration_steps(trace, 0.25)
    assert set(trace.seq[calib].tolist()) == {0} and not np.isin(trace.seq[~calib], [0]).any()
    one = random_trace(n_steps=40, n_seqs=1)
    assert calibration_steps(one, 0.25).sum() == 10


def test_prefill_groups_merge_a_batch():
    trace = random_trace(seed=1, n_steps=30, prefill=6, n_seqs=1)
    groups = build_groups(trace, np.zeros(trace.n_steps, bool), ubatch=4)
    pre = np.flatnonzero(groups.phase == PREFILL)
    assert len(pre) == 2 * 3  # ceil(6 / 4) batches × 3 layers
    g0 = pre[0]
    lo, hi = groups.start[g0], groups.start[g0 + 1]
    touched = trace.experts[:4, 0].ravel().tolist()
    by_last_use = sorted(set(touched), key=lambda e: max(i for i, x in enumerate(touched) if x == e))
    assert groups.expert[lo:hi].tolist() == by_last_use
    assert groups.acc_tokens[lo:hi].sum() == 4 * trace.meta.top_k
    assert groups.mass[lo:hi].sum() == pytest.approx(4.0, abs=1e-5)


def test_replays_shared_engine_residency(shared_qwen_csv, tmp_path):
    """The real Qwen3-30B-A3B trace (28 prefill tokens in one batch, then 128 decode tokens) through
    our engine's global LRU of 4000 MiB, from an empty cache, reproduces the engine's own `residency`
    column on every decode access (the README's decode hit rate 0.803)."""
    import pandas as pd

    from sim.convert import main as convert_main
    from sim.trace import load_trace

    out = tmp_path / "q.npz"
    convert_main([str(shared_qwen_csv), "-o", str(out)])
    cfg = ReplayConfig(trace=load_trace(out), policy="lru", capacity_bytes=4000 * 2**20, calib_fraction=0, timeline=False)
    prep = prepare(cfg)
    cache = make_policy("lru", 4000 * 2**20)
    outcome = replay_reference(prep.groups, (cache, cache), parse_precision("native"),
                     np.zeros((48, 128), np.int8), prep.sizes, prep.link_s)
    decode_acc = np.repeat(prep.groups.phase, np.diff(prep.groups.start)) == DECODE
    rows = pd.read_csv(shared_qwen_csv, comment="#")
    decode = rows[rows.phase == 1].sort_values(["step", "layer", "slot"], kind="stable")
    np.testing.assert_array_equal((outcome.result[decode_acc] == HIT).astype(int), decode.residency.to_numpy())
    assert run_prepared(prep, cfg).hit_rate == pytest.approx(0.803, abs=5e-4)


@pytest.mark.parametrize("seed", range(3))
def test_belady_bounds_every_online_policy_through_the_engine(seed):
    trace = random_trace(seed=seed, n_steps=50)
    hits = {}
    for policy in ("belady", "lru", "slru", "lfu", "s3fifo", "hobbit"):
        rec = run(ReplayConfig(trace=trace, policy=policy, capacity_bytes=8000, calib_fraction=0, timeline=False))
        hits[policy] = rec.hits
    assert all(hits["belady"] >= h for h in hits.values()), hits


def test_one_launch_per_format_per_group(tmp_path):
    """A group's experts of one format share one kernel launch: time = dense + copies + a + n·b."""
    import json
    from pathlib import Path

    from sim import cost
    from sim.profiles import load_hardware

    doc = json.loads((Path(__file__).resolve().parents[1] / "sim/profiles/rtx3060-12gb.json").read_text())
    doc["expert_compute"] = {"shape": {"hidden": 2048, "ffn": 768}, "tokens": [1, 16],
                             "seconds": {"q4_k": [10e-6, 20e-6], "q2_k": [9e-6, 18e-6]},
                             "grouped_seconds": {"q4_k": [24e-6, 34e-6], "q2_k": [16e-6, 30e-6]}, "grouped_experts": 8}
    gpu = tmp_path / "g.json"
    gpu.write_text(json.dumps(doc))
    experts = np.array([[[3, 1, 2, 0]]], np.int16)
    weights = np.array([[[0.4, 0.3, 0.2, 0.1]]], np.float32)
    meta = TraceMeta(model="tiny", n_layers=1, n_experts=4, top_k=4, expert_bytes=(EXPERT_BYTES,),
                     expert_weights=3 * 2048 * 768)
    trace = Trace.from_arrays(experts, weights, [DECODE], [0], meta)
    hw = load_hardware(str(gpu))
    for precision, launches in [("native", [("q4_k", 4)]), ("dynamic:0.5:1.0", [("q4_k", 2), ("q2_k", 2)])]:
        rec = run(ReplayConfig(trace=trace, gpu=str(gpu), capacity_bytes=10**9, calib_fraction=0, precision=precision))
        prep = prepare(ReplayConfig(trace=trace, gpu=str(gpu), calib_fraction=0))
        link = sum(n * float(prep.link_s[0, 0 if f == "q4_k" else 1]) for f, n in launches)
        compute = 0.0
        for fmt, n in launches:
            nbytes = prep.model.expert_bytes(0) if fmt == "q4_k" else prep.model.expert_bytes(0, fmt)
            a, b = cost.expert_launch_split(hw, fmt, 1, prep.model.expert_weights, nbytes)
            compute += a + n * b
        expected = cost.dense_s(hw, 1, prep.model.dense_bytes[0]) + link + compute
        assert rec.decode_s == pytest.approx(expected, rel=1e-12), precision
