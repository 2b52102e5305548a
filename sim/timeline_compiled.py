"""The timeline's compiled path: `sim.timeline.simulate`'s schedule in one numba loop, bit for bit.

`schedule(costs)` returns the same `Schedule` as the simpy model (tests/test_timeline_compiled.py
holds every float equal, not just close): it repeats simpy's own arithmetic — a timeout advances
the clock by `now + delay`, a link job lands at `now + (free_at - now)`, a run of groups that
neither copy nor wait is one timeout of their summed time, and a landed prefetch job is forgotten
once it is older than the previous group — so that sweeps give the same numbers on either path.
The simpy model stays the readable definition; this is its fast twin for long traces.
"""
from __future__ import annotations

import numba
import numpy as np

from sim.timeline import GroupCosts, Schedule, TimelineModel, resident_part


@numba.njit(cache=True)
def _schedule(dense, compute, resident, demand, prefetch, wait_group, job_fixed):  # pragma: no cover - compiled
    n = dense.shape[0]
    end_s = np.zeros(n)
    stall_s = np.zeros(n)
    pf_time = np.zeros(n)  # landing time of the prefetch job issued with group k
    live = np.zeros(n, np.bool_)  # k still in simpy's prefetch_done dict
    keys = np.empty(n, np.int64)  # the live ks, in insertion order
    n_keys = 0
    now = 0.0
    free_at = 0.0
    busy = 0.0
    g = 0
    while g < n:
        run_s = 0.0
        first = g
        while g < n and demand[g] == 0 and prefetch[g] == 0 and (wait_group[g] < 0 or not live[wait_group[g]]):
            run_s += dense[g] + compute[g]
            end_s[g] = run_s
            g += 1
        if g > first:
            t0 = now
            now = now + run_s
            for j in range(first, g):
                end_s[j] += t0
            if g == n:
                break
        now = now + dense[g]
        ready = -1.0
        has_ready = False
        if demand[g] > 0:
            job = demand[g] + job_fixed
            free_at = max(free_at, now) + job
            busy += job
            ready = now + (free_at - now)
            has_ready = True
        if prefetch[g] > 0:
            free_at = max(free_at, now) + prefetch[g]
            busy += prefetch[g]
            pf_time[g] = now + (free_at - now)
            if not live[g]:
                live[g] = True
                keys[n_keys] = g
                n_keys += 1
        w = wait_group[g]
        if not has_ready and w >= 0 and live[w]:
            ready = pf_time[w]
            has_ready = True
        res = resident[g] if has_ready else 0.0
        if res > 0:
            now = now + res  # resident experts compute while the copies land
        if has_ready and ready > now:
            stall_s[g] = ready - now
            now = ready
        now = now + (compute[g] - res)
        end_s[g] = now
        m = 0
        for j in range(n_keys):  # forget landed jobs older than the previous group
            k = keys[j]
            if k < g - 1 and pf_time[k] <= now:
                live[k] = False
            else:
                keys[m] = k
                m += 1
        n_keys = m
        g += 1
    return end_s, stall_s, busy


def schedule(costs: GroupCosts, model: TimelineModel | None = None) -> Schedule:
    """The simpy model's schedule (`sim.timeline.simulate`), computed by the compiled loop."""
    f = np.ascontiguousarray
    m = model or TimelineModel()
    resident = resident_part(costs, m)
    end_s, stall_s, busy = _schedule(f(costs.dense_s, np.float64), f(costs.compute_s, np.float64),
                                     f(resident, np.float64),
                                     f(costs.demand_link_s, np.float64), f(costs.prefetch_link_s, np.float64),
                                     f(costs.wait_group, np.int64), float(m.copy_job_fixed_s))
    return Schedule(end_s=end_s, stall_s=stall_s, link_busy_s=float(busy))
