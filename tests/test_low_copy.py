"""HOBBIT's low-copy rule as a policy setting: `reload` (a resident low copy serves only uses ranked
below T1) vs `serve` (it serves any use), each held to a brute-force byte LRU written here."""
from collections import OrderedDict

import numpy as np
import pytest

from sim.engine import HIT, LOADED, SKIPPED, CacheSpec, replay
from sim.io import InputError
from sim.precision import HIGH, LOW, RELOAD, SERVE, SLOTS, parse_precision, static_slots
from sim.simulate import ReplayConfig, prepare
from tests.test_engine import random_trace


def brute_force(groups, policy, sizes, capacity):
    """Per access (result, slot) of a byte LRU holding (layer, expert, slot) entries, the group's keys
    protected, a miss bypassing when it cannot fit; the dynamic rule and the low-copy rule inline."""
    low = SLOTS.index(policy.dynamic_format)
    cache: OrderedDict = OrderedDict()
    res, slot = [], []

    def insert(key, protected):
        size = int(sizes[key[0], key[2]])
        used = sum(cache.values())
        pinned = sum(s for k, s in cache.items() if k in protected)
        if size > capacity - pinned:
            return
        for victim in [k for k in cache if k not in protected]:
            if used + size <= capacity:
                break
            used -= cache.pop(victim)
        cache[key] = size

    for g in range(groups.n_groups):
        layer = int(groups.layer[g])
        lo, hi = groups.start[g], groups.start[g + 1]
        ids = [int(e) for e in groups.expert[lo:hi]]
        protected = {(layer, e, 0) for e in ids} | {(layer, e, low) for e in ids}
        for e, score in zip(ids, groups.score[lo:hi]):
            choice = HIGH if score <= policy.t1 else LOW if score <= policy.t2 else SKIPPED
            hkey, lkey = (layer, e, 0), (layer, e, low)
            low_ok = choice != HIGH or policy.low_copy == SERVE
            if hkey in cache:
                cache.move_to_end(hkey)
                res.append(HIT), slot.append(0)
            elif low_ok and lkey in cache:
                cache.move_to_end(lkey)
                res.append(HIT), slot.append(low)
            elif choice == HIGH:
                insert(hkey, protected)
                cache.pop(lkey, None)  # the high copy supersedes the low one
                res.append(LOADED), slot.append(0)
            elif choice == LOW:
                insert(lkey, protected)
                res.append(LOADED), slot.append(low)
            else:
                res.append(SKIPPED), slot.append(-1)
    return np.array(res), np.array(slot)


def _run(trace, spec, capacity):
    pol = parse_precision(spec)
    prep = prepare(ReplayConfig(trace=trace, precision=spec, capacity_bytes=capacity, calib_fraction=0.0,
                                timeline=False))
    slots = static_slots(None, pol, trace.meta.n_layers, trace.meta.n_experts, 0)
    out = replay(prep.groups, CacheSpec("lru", capacity), pol, slots, prep.sizes, prep.link_s, fast=True)
    return prep, pol, out


@pytest.mark.parametrize("rule", [RELOAD, SERVE])
@pytest.mark.parametrize("seed,capacity", [(0, 3000), (1, 6000), (2, 12000)])
def test_low_copy_rule_matches_brute_force(rule, seed, capacity):
    trace = random_trace(seed=seed, n_steps=80, prefill=0, k=4)
    spec = f"dynamic:0.3:0.85:q2_k:{rule}"
    prep, pol, out = _run(trace, spec, capacity)
    res, slot = brute_force(prep.groups, pol, prep.sizes, capacity)
    np.testing.assert_array_equal(out.result, res)
    np.testing.assert_array_equal(out.slot, slot)


def test_serve_lets_a_low_copy_serve_a_high_ranked_use_and_reload_does_not():
    trace = random_trace(seed=3, n_steps=80, prefill=0, k=4)
    cap = 6000
    prep, _, serve = _run(trace, "dynamic:0.3:0.85:q2_k:serve", cap)
    _, _, reload = _run(trace, "dynamic:0.3:0.85:q2_k", cap)
    high_ranked = prep.groups.score <= 0.3
    low = SLOTS.index("q2_k")
    # serve: some high-ranked uses are hits on the low copy; reload: never
    assert np.any(high_ranked & (serve.result == HIT) & (serve.slot == low))
    assert not np.any(high_ranked & (reload.result == HIT) & (reload.slot == low))
    assert not np.array_equal(serve.result, reload.result)


def test_low_copy_grammar():
    assert parse_precision("dynamic:0.6:0.9").low_copy == RELOAD
    p = parse_precision("dynamic:0.6:0.9:serve")
    assert (p.low_copy, p.dynamic_format) == (SERVE, "q2_k")
    p = parse_precision("dynamic:0.6:0.9:q3_k:serve")
    assert (p.low_copy, p.dynamic_format, p.name) == (SERVE, "q3_k", "dynamic:0.6:0.9:q3_k:serve")
    assert parse_precision("dynamic:0.6:0.9:q2_k:reload").name == "dynamic:0.6:0.9:q2_k"  # the default, unnamed
    assert parse_precision(parse_precision("dynamic:0.5:0.8:serve").name) == parse_precision("dynamic:0.5:0.8:serve")
    for bad in ("dynamic:0.6:0.9:q2_k:q3_k", "dynamic:0.6:0.9:keep", "dynamic:0.6:0.9:serve:q2_k"):
        with pytest.raises(InputError):
            parse_precision(bad)
