"""The simpy timeline against a plain recurrence, and hand-computed schedules."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.timeline import GroupCosts, TimelineModel, reference_schedule, simulate


def costs(dense, compute, demand, prefetch, wait):
    return GroupCosts(np.array(dense, float), np.array(compute, float), np.array(demand, float),
                      np.array(prefetch, float), np.array(wait, np.int64))


def test_hand_schedule():
    # g0: dense 1, demand copy 3 lands at 4 → stall 3, compute 2 → ends 6; it also prefetches 5 for g1,
    #     queued behind the demand copy: lands at 4 + 5 = 9.
    # g1: dense 1 (6→7), no demand, waits for g0's prefetch (lands 9) → stall 2, compute 1 → ends 10.
    # g2: dense 1 (10→11), no copies → compute 1 → ends 12.
    c = costs([1, 1, 1], [2, 1, 1], [3, 0, 0], [5, 0, 0], [-1, 0, -1])
    for sched in (simulate(c), reference_schedule(c)):
        assert sched.end_s.tolist() == [6, 10, 12]
        assert sched.stall_s.tolist() == [3, 2, 0]
        assert sched.link_busy_s == 8


def test_prefetch_already_landed_costs_nothing():
    c = costs([1, 10], [1, 1], [0, 0], [2, 0], [-1, 0])
    s = simulate(c)
    assert s.stall_s.tolist() == [0, 0] and s.end_s.tolist() == [2, 13]


group = st.tuples(
    st.floats(0, 5), st.floats(0, 5),
    st.one_of(st.just(0.0), st.floats(0.01, 5)), st.one_of(st.just(0.0), st.floats(0.01, 5)),
    st.integers(-1, 3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(group, min_size=1, max_size=40))
def test_simpy_equals_recurrence(groups):
    dense, compute, demand, prefetch, back = zip(*groups)
    wait = [g - b if b >= 0 and g - b >= 0 and b > 0 else -1 for g, b in enumerate(back)]
    c = costs(dense, compute, demand, prefetch, wait)
    a, b = simulate(c), reference_schedule(c)
    np.testing.assert_allclose(a.end_s, b.end_s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.stall_s, b.stall_s, rtol=1e-12, atol=1e-9)
    assert a.link_busy_s == pytest.approx(b.link_busy_s)
    # the compute stream never finishes before its own work is done
    assert a.end_s[-1] >= sum(dense) + sum(compute) - 1e-9


def test_hand_schedule_overlap_resident_and_job_fixed_cost():
    # g0: dense 1; copy job 3 + fixed 0.5 lands at 4.5; resident experts (1 of compute 2) run 1→2, stall 2.5,
    #     missing part 1 → ends 5.5.  g1: no copies: dense 1, compute 1 → 7.5 (resident split unused).
    c = GroupCosts(np.array([1.0, 1.0]), np.array([2.0, 1.0]), np.array([3.0, 0.0]), np.array([0.0, 0.0]),
                   np.array([-1, -1]), resident_compute_s=np.array([1.0, 1.0]))
    m = TimelineModel(overlap_resident=True, copy_job_fixed_s=0.5)
    for sched in (simulate(c, m), reference_schedule(c, m)):
        assert sched.end_s.tolist() == [5.5, 7.5]
        assert sched.stall_s.tolist() == [2.5, 0.0]
        assert sched.link_busy_s == 3.5
    # without the settings the same costs give the original schedule: wait for all copies, then compute 2
    assert simulate(c).end_s.tolist() == [6.0, 8.0]


def test_timeline_model_from_profile():
    assert TimelineModel.from_profile({}) == TimelineModel()
    m = TimelineModel.from_profile({"timeline": {"overlap_resident": True, "copy_job_fixed_s": 2e-5}})
    assert m.overlap_resident and m.copy_job_fixed_s == 2e-5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(group, st.floats(0, 5)), min_size=1, max_size=40), st.booleans(), st.floats(0, 2))
def test_simpy_equals_recurrence_with_engine_settings(groups, overlap, job_fixed):
    rows, resident = zip(*groups)
    dense, compute, demand, prefetch, back = zip(*rows)
    wait = [g - b if b >= 0 and g - b >= 0 and b > 0 else -1 for g, b in enumerate(back)]
    c = costs(dense, compute, demand, prefetch, wait)
    c = GroupCosts(c.dense_s, c.compute_s, c.demand_link_s, c.prefetch_link_s, c.wait_group,
                   resident_compute_s=np.array(resident, float))
    m = TimelineModel(overlap_resident=overlap, copy_job_fixed_s=job_fixed)
    a, b = simulate(c, m), reference_schedule(c, m)
    np.testing.assert_allclose(a.end_s, b.end_s, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a.stall_s, b.stall_s, rtol=1e-12, atol=1e-9)
    assert a.link_busy_s == pytest.approx(b.link_busy_s)
    # overlapping can only help: never later than the original model with the same job cost
    base = reference_schedule(c, TimelineModel(copy_job_fixed_s=job_fixed))
    assert b.end_s[-1] <= base.end_s[-1] + 1e-9
    assert a.end_s[-1] >= sum(dense) + sum(compute) - 1e-9
