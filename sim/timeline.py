"""Timeline: a simpy model of the PCIe link and the GPU compute stream over access groups.

The compute stream runs the groups in order. For each group it computes the layer's dense part
(attention, router, norms); the router's choice is then known, so the group's demand misses go to
the link as one copy job, followed by the prefetch job for the next layer. The group's experts
compute once its copies have landed (its own demand job, or the prefetch job that brought an
expert it uses); the wait is stall time. After the last layer of a decode token the output head
runs. The link serves jobs in FIFO order (like simpy's `Cable` example, a resource of its own):
several copy engines share one PCIe link's bandwidth, so they are modelled as one link whose
per-copy fixed cost is divided among the engines (see `sim.engine.slot_tables`). Runs of groups
that neither copy nor wait are merged into one timeout: the same schedule with fewer events.

Engine behaviours (a `TimelineModel`, read from a hardware profile's optional "timeline" object):
- `overlap_resident`: the group's resident (hit) experts compute while its missing ones copy; only
  the missing experts wait for the copy job (an engine that launches its hits first, as
  jaxmoe.offload does). Off: the whole group waits for its copies (the original model).
- `copy_job_fixed_s`: a fixed cost added to each group's demand copy job (per-layer copy batching:
  issue and stream synchronisation paid once per layer, on top of each expert's link time).
- `split_launches`: a layer's resident and missing experts of one format are separate launches, each
  paying the launch's fixed part, whether or not they overlap the copies (jaxmoe.offload launches its
  hits before it issues the copies and its misses after they land). Implied by `overlap_resident`.
- `copy_job_per_format`: each format with misses in a layer is a copy job of its own, each paying
  `copy_job_fixed_s` (jaxmoe.offload's jax path: one `device_put` and one scatter per kernel path).
The last two are priced in `sim.cost.group_costs` (launch parts and demand link seconds); the
schedule below is the same.

`reference_schedule` computes the same schedule as a plain recurrence; tests hold the two equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy


@dataclass(frozen=True)
class GroupCosts:
    """Per-group costs in seconds, in compute order."""

    dense_s: np.ndarray  # float64 [G] attention + router + norms of the layer
    compute_s: np.ndarray  # float64 [G] the group's expert FFNs (+ output head after a token's last layer)
    demand_link_s: np.ndarray  # float64 [G] copy-engine time of the group's demand misses (0: none)
    prefetch_link_s: np.ndarray  # float64 [G] copy-engine time of the prefetch issued with this group
    wait_group: np.ndarray  # int64 [G] group whose prefetch job must land before this one computes; -1 none
    resident_compute_s: np.ndarray | None = None  # float64 [G] the part of compute_s whose experts were resident


@dataclass(frozen=True)
class TimelineModel:
    """Engine behaviours the timeline can model (defaults: the original model)."""

    overlap_resident: bool = False
    copy_job_fixed_s: float = 0.0
    split_launches: bool = False
    copy_job_per_format: bool = False

    @property
    def separate_miss_launch(self) -> bool:
        """Resident and missing experts of one format are priced as two launches."""
        return self.overlap_resident or self.split_launches

    @classmethod
    def from_profile(cls, raw: dict) -> "TimelineModel":
        """The "timeline" object of a hardware profile JSON (absent: defaults)."""
        t = (raw or {}).get("timeline") or {}
        return cls(overlap_resident=bool(t.get("overlap_resident", False)),
                   copy_job_fixed_s=float(t.get("copy_job_fixed_s", 0.0)),
                   split_launches=bool(t.get("split_launches", False)),
                   copy_job_per_format=bool(t.get("copy_job_per_format", False)))


@dataclass(frozen=True)
class Schedule:
    """When each group finished, and how long the compute stream waited on the link."""

    end_s: np.ndarray  # float64 [G] time the group's expert compute finished
    stall_s: np.ndarray  # float64 [G] time the compute stream waited for copies before the group
    link_busy_s: float


class PcieLink:
    """A FIFO copy link, a resource of its own: `submit(seconds)` → event fired when the job lands.

    FIFO service makes a job's landing time known when it is submitted (it starts when the link
    frees up), so each job is one simpy timeout rather than a queue-and-server process pair.
    """

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.free_at_s = 0.0
        self.busy_s = 0.0

    def submit(self, seconds: float) -> simpy.Event:
        self.free_at_s = max(self.free_at_s, self.env.now) + seconds
        self.busy_s += seconds
        return self.env.timeout(self.free_at_s - self.env.now)


def resident_part(c: GroupCosts, m: TimelineModel) -> list:
    if m.overlap_resident and c.resident_compute_s is not None:
        return np.minimum(c.resident_compute_s, c.compute_s).tolist()
    return [0.0] * c.dense_s.size


def _compute_stream(env: simpy.Environment, link: PcieLink, c: GroupCosts, end_s: np.ndarray, stall_s: np.ndarray,
                    m: TimelineModel):
    dense, compute = c.dense_s.tolist(), c.compute_s.tolist()
    resident = resident_part(c, m)
    demand, prefetch, wait_group = c.demand_link_s.tolist(), c.prefetch_link_s.tolist(), c.wait_group.tolist()
    prefetch_done: dict[int, simpy.Event] = {}
    n = len(dense)
    g = 0
    while g < n:
        # Groups that neither use the link nor wait on it run back to back: one timeout for the run.
        run_s, first = 0.0, g
        while g < n and demand[g] == 0 and prefetch[g] == 0 and (wait_group[g] < 0 or wait_group[g] not in prefetch_done):
            run_s += dense[g] + compute[g]
            end_s[g] = run_s  # relative; shifted below
            g += 1
        if g > first:
            t0 = env.now
            yield env.timeout(run_s)
            end_s[first:g] += t0
            if g == n:
                break
        yield env.timeout(dense[g])
        ready = link.submit(demand[g] + m.copy_job_fixed_s) if demand[g] > 0 else None
        if prefetch[g] > 0:
            prefetch_done[g] = link.submit(prefetch[g])
        if ready is None and wait_group[g] >= 0:
            ready = prefetch_done.get(wait_group[g])
        if resident[g] > 0 and ready is not None:
            yield env.timeout(resident[g])  # resident experts compute while the copies land
        if ready is not None and not ready.processed:
            t0 = env.now
            yield ready
            stall_s[g] = env.now - t0
        yield env.timeout(compute[g] - (resident[g] if ready is not None else 0.0))
        end_s[g] = env.now
        for old in [k for k in prefetch_done if k < g - 1 and prefetch_done[k].processed]:
            del prefetch_done[old]  # landed: later groups never wait on it
        g += 1


def simulate(costs: GroupCosts, model: TimelineModel | None = None) -> Schedule:
    """Run the simpy model over all groups."""
    env = simpy.Environment()
    link = PcieLink(env)
    n = costs.dense_s.size
    end_s = np.zeros(n)
    stall_s = np.zeros(n)
    env.process(_compute_stream(env, link, costs, end_s, stall_s, model or TimelineModel()))
    env.run()
    return Schedule(end_s=end_s, stall_s=stall_s, link_busy_s=link.busy_s)


def reference_schedule(costs: GroupCosts, model: TimelineModel | None = None) -> Schedule:
    """The same schedule as a plain recurrence (the independent reference for `simulate`)."""
    m = model or TimelineModel()
    t = link_free = busy = 0.0
    n = costs.dense_s.size
    end_s, stall_s = np.zeros(n), np.zeros(n)
    pf_done: dict[int, float] = {}
    overlap = m.overlap_resident and costs.resident_compute_s is not None
    for g in range(n):
        t += costs.dense_s[g]
        ready = None
        if costs.demand_link_s[g] > 0:
            job = costs.demand_link_s[g] + m.copy_job_fixed_s
            link_free = max(link_free, t) + job
            busy += job
            ready = link_free
        if costs.prefetch_link_s[g] > 0:
            link_free = max(link_free, t) + costs.prefetch_link_s[g]
            busy += costs.prefetch_link_s[g]
            pf_done[g] = link_free
        if ready is None and costs.wait_group[g] >= 0:
            ready = pf_done.get(int(costs.wait_group[g]))
        res = min(costs.resident_compute_s[g], costs.compute_s[g]) if overlap and ready is not None else 0.0
        t += res
        if ready is not None and ready > t:
            stall_s[g] = ready - t
            t = ready
        t += costs.compute_s[g] - res
        end_s[g] = t
    return Schedule(end_s=end_s, stall_s=stall_s, link_busy_s=busy)
