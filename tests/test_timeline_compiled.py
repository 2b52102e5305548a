"""The compiled timeline (sim.timeline_compiled) gives the simpy model's schedule bit for bit."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.timeline import GroupCosts, TimelineModel, reference_schedule, simulate
from sim.timeline_compiled import schedule

# durations from a small grid as well as arbitrary floats: equal landing and clock times are the
# cases where simpy's event order decides, so they must come up often
duration = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), st.floats(0, 5))
copy = st.one_of(st.just(0.0), st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.01, 5))
group = st.tuples(duration, duration, copy, copy, st.integers(-1, 4))


@settings(deadline=None)
@given(st.lists(group, min_size=1, max_size=60))
def test_compiled_schedule_equals_simpy_exactly(groups):
    dense, compute, demand, prefetch, back = zip(*groups)
    wait = [g - b if b > 0 and g - b >= 0 else -1 for g, b in enumerate(back)]
    c = GroupCosts(np.array(dense, float), np.array(compute, float), np.array(demand, float),
                   np.array(prefetch, float), np.array(wait, np.int64))
    a, b = simulate(c), schedule(c)
    assert a.end_s.tolist() == b.end_s.tolist()
    assert a.stall_s.tolist() == b.stall_s.tolist()
    assert a.link_busy_s == b.link_busy_s


@settings(deadline=None)
@given(st.lists(st.tuples(group, duration), min_size=1, max_size=60), st.sampled_from([0.0, 0.25, 1.0]))
def test_compiled_schedule_equals_simpy_with_engine_settings(groups, job_fixed):
    """overlap_resident and copy_job_fixed_s (the executor's engine behaviours): same floats on both paths."""
    rows, resident = zip(*groups)
    dense, compute, demand, prefetch, back = zip(*rows)
    wait = [g - b if b > 0 and g - b >= 0 else -1 for g, b in enumerate(back)]
    c = GroupCosts(np.array(dense, float), np.array(compute, float), np.array(demand, float),
                   np.array(prefetch, float), np.array(wait, np.int64), resident_compute_s=np.array(resident, float))
    m = TimelineModel(overlap_resident=True, copy_job_fixed_s=job_fixed)
    a, b = simulate(c, m), schedule(c, m)
    assert a.end_s.tolist() == b.end_s.tolist()
    assert a.stall_s.tolist() == b.stall_s.tolist()
    assert a.link_busy_s == b.link_busy_s
    r = reference_schedule(c, m)  # the plain recurrence: equal up to float association
    np.testing.assert_allclose(b.end_s, r.end_s, rtol=1e-9, atol=1e-9)


def test_compiled_schedule_on_a_replay_with_prefetch():
    """Costs of a real replay (oracle prefetch, dynamic precision): same floats from both timelines."""
    from sim import cost
    from sim.engine import replay, CacheSpec
    from sim.precision import parse_precision, static_slots
    from sim.simulate import ReplayConfig, prepare
    from tests.test_engine import random_trace

    trace = random_trace(seed=3, n_steps=120, predicted=True)
    prep = prepare(ReplayConfig(trace=trace, calib_fraction=0.25, prefetch="oracle:0.7"))
    pol = parse_precision("static:mass:30%:q2_k+dynamic:0.5:0.8")
    slots = static_slots(prep.calib_trace, pol, 3, 16, 0)
    out = replay(prep.groups, CacheSpec("slru", 9000, n_layers=3), pol, slots, prep.sizes, prep.link_s)
    acc_layer = np.repeat(prep.groups.layer, np.diff(prep.groups.start))
    c = cost.group_costs(prep.groups, out, prep.model, prep.hw, prep.link_s, prep.compute, acc_layer, decode_only=False)
    assert (c.prefetch_link_s > 0).any() and (c.wait_group >= 0).any()
    a, b = simulate(c), schedule(c)
    assert a.end_s.tolist() == b.end_s.tolist() and a.stall_s.tolist() == b.stall_s.tolist()
