"""sim.cost.group_costs: launch parts and copy jobs per engine behaviour, by hand and against a brute force."""
import dataclasses

import numpy as np
import pytest

from sim import cost
from sim.engine import HIT, LOADED, SKIPPED, AccessGroups, CacheSpec, Outcome, replay
from sim.precision import parse_precision, static_slots
from sim.simulate import ReplayConfig, prepare
from sim.timeline import TimelineModel
from tests.test_engine import random_trace

BEHAVIOURS = [TimelineModel(), TimelineModel(split_launches=True), TimelineModel(copy_job_per_format=True),
              TimelineModel(split_launches=True, copy_job_per_format=True),
              TimelineModel(overlap_resident=True, copy_job_per_format=True)]


class FlatCompute:
    """Every expert launch costs 10 s fixed plus 1 s per expert, whatever its layer, format or tokens."""

    def price(self, codes, tok_vals):
        return np.tile([10.0, 1.0], (codes.size, 1))


def one_group(slots, results):
    n = len(slots)
    groups = AccessGroups(layer=np.zeros(1, np.int32), seq=np.zeros(1, np.int32), step=np.zeros(1, np.int32),
                          phase=np.zeros(1, np.uint8), tokens=np.ones(1, np.int32), token_end=np.zeros(1, bool),
                          calib=np.zeros(1, bool), start=np.array([0, n], np.int64),
                          expert=np.arange(n, dtype=np.int32), score=np.zeros(n), mass=np.zeros(n),
                          acc_tokens=np.ones(n, np.int32), predicted=np.full((1, 1), -1, np.int16))
    outcome = Outcome(result=np.array(results, np.int8), slot=np.array(slots, np.int8),
                      prefetch_bytes=np.zeros(1, np.int64), prefetch_loads=np.zeros(1, np.int64),
                      prefetch_link_s=np.zeros(1), wait_group=np.full(1, -1, np.int64))
    return groups, outcome


@pytest.fixture(scope="module")
def prep():
    # the executor profile: its launches have a fixed part (the RTX profiles price launches per expert only)
    return prepare(ReplayConfig(trace=random_trace(seed=5, n_steps=80), calib_fraction=0.25, gpu="h100-offload-jax"))


def test_hand_priced_launches_and_copy_jobs(prep):
    # one layer: native hit, native miss, two q-slot-2 misses, one q-slot-1 hit; 3 s of link per miss
    groups, outcome = one_group([0, 0, 2, 2, 1], [HIT, LOADED, LOADED, LOADED, HIT])
    link_s = np.full((prep.model.n_layers, cost.N_SLOTS), 3.0)
    price = lambda tl: cost.group_costs(groups, outcome, prep.model, prep.hw, link_s, FlatCompute(), None,
                                        decode_only=True, tl=tl)
    # one launch per format (slots 0, 2, 1): 5 experts + 3 fixed parts; three misses' link
    c = price(TimelineModel(copy_job_fixed_s=0.5))
    assert (c.compute_s[0], c.demand_link_s[0], c.resident_compute_s) == (35.0, 9.0, None)
    # split_launches: slot 0's hit and miss are two launches (4 fixed parts); the hits' part is resident
    c = price(TimelineModel(split_launches=True, copy_job_fixed_s=0.5))
    assert (c.compute_s[0], c.demand_link_s[0], c.resident_compute_s[0]) == (45.0, 9.0, 22.0)
    # copy_job_per_format: misses in two formats (0 and 2) are two jobs; the timeline pays the first
    c = price(TimelineModel(copy_job_per_format=True, copy_job_fixed_s=0.5))
    assert (c.compute_s[0], c.demand_link_s[0]) == (35.0, 9.5)
    # a skipped access costs nothing and starts no launch or job
    groups, outcome = one_group([0, -1, 2], [HIT, SKIPPED, HIT])
    c = price(TimelineModel(split_launches=True, copy_job_per_format=True, copy_job_fixed_s=0.5))
    assert (c.compute_s[0], c.demand_link_s[0], c.resident_compute_s[0]) == (22.0, 0.0, 22.0)


def brute_force_costs(groups, outcome, compute, link_s, tl):
    """Per group: compute, demand link and resident seconds, from dicts of launches and copy jobs."""
    comp, link, resident = (np.zeros(groups.n_groups) for _ in range(3))
    for g in range(groups.n_groups):
        lay = int(groups.layer[g])
        launches, jobs = set(), set()
        for a in range(groups.start[g], groups.start[g + 1]):
            r, s = int(outcome.result[a]), int(outcome.slot[a])
            if r == SKIPPED:
                continue
            fixed, per_expert = compute.split(lay, s, int(groups.acc_tokens[a]))
            launch = (s, r == LOADED and (tl.overlap_resident or tl.split_launches))
            part = per_expert + (fixed if launch not in launches else 0.0)
            launches.add(launch)
            comp[g] += part
            if r == LOADED:
                link[g] += link_s[lay, s]
                jobs.add(s)
            else:
                resident[g] += part
        if tl.copy_job_per_format:
            link[g] += max(len(jobs) - 1, 0) * tl.copy_job_fixed_s
    return comp, link, resident


@pytest.mark.parametrize("tl", BEHAVIOURS, ids=repr)
def test_group_costs_equal_brute_force_on_a_replay(prep, tl):
    tl = dataclasses.replace(tl, copy_job_fixed_s=2e-5)
    pol = parse_precision("static:mass:30%:q2_k+dynamic:0.5:0.8")
    slots = static_slots(prep.calib_trace, pol, 3, 16, 0)
    out = replay(prep.groups, CacheSpec("slru", 9000, n_layers=3), pol, slots, prep.sizes, prep.link_s)
    c = cost.group_costs(prep.groups, out, prep.model, prep.hw, prep.link_s, prep.compute, None,
                         decode_only=False, tl=tl)
    comp, link, resident = brute_force_costs(prep.groups, out, prep.compute, prep.link_s, tl)
    head = np.where(prep.groups.token_end, cost.head_s(prep.hw, prep.model.head_bytes), 0.0)
    np.testing.assert_allclose(c.compute_s, comp + head, rtol=1e-12)
    np.testing.assert_allclose(c.demand_link_s, link, rtol=1e-12, atol=1e-15)
    if tl.separate_miss_launch:
        np.testing.assert_allclose(c.resident_compute_s, resident, rtol=1e-12, atol=1e-15)
    else:
        assert c.resident_compute_s is None
    # the replay has what the behaviours price differently: a format with hits and misses, two formats missing
    assert prep.compute.split(0, 0, 1)[0] > 0
    both = two = 0
    for g in range(prep.groups.n_groups):
        r, s = (x[prep.groups.start[g]:prep.groups.start[g + 1]] for x in (out.result, out.slot))
        both += any(((r == HIT) & (s == f)).any() and ((r == LOADED) & (s == f)).any() for f in set(s.tolist()))
        two += len(set(s[r == LOADED].tolist())) > 1
    assert both > 10 and two > 10


def test_behaviours_read_from_a_profile_default_to_the_original_model():
    assert TimelineModel.from_profile({"timeline": {"copy_job_fixed_s": 1e-5}}) == TimelineModel(copy_job_fixed_s=1e-5)
    m = TimelineModel.from_profile({"timeline": {"split_launches": True, "copy_job_per_format": True}})
    assert m.split_launches and m.copy_job_per_format and m.separate_miss_launch and not m.overlap_resident
    assert TimelineModel(overlap_resident=True).separate_miss_launch
