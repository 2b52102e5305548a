"""The simulator as a library: a configuration in, one typed result record out.

`run(ReplayConfig(...))` loads a trace and profiles, replays it through a precision policy and a
cache policy (`sim.engine`), prices every access group (`sim.cost`) and runs the PCIe/compute
timeline (`sim.timeline`); it returns a `ReplayRecord`. A sweep prepares the trace once per GPU
(`prepare`) and calls `run_prepared` per configuration. `python -m sim.replay` is the command line
over this module; `analysis.sweep` derives its CSV columns from `ReplayRecord`'s fields.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numba
import numpy as np

from sim import cost, timeline, timeline_compiled
from sim.budget import default_budget
from sim.cache.registry import PARTITIONS, policy_class
from sim.engine import (
    HIT,
    LOADED,
    SKIPPED,
    AccessGroups,
    CacheSpec,
    Outcome,
    build_groups,
    calibration_steps,
    check_priced,
    oracle_predictions,
    replay,
)
from sim.io import InputError
from sim.precision import PrecisionPolicy, parse_precision, static_slots
from sim.profiles import HardwareProfile, ModelProfile, load_hardware, model_for_trace
from sim.trace import DECODE, PREFILL, Trace, load_trace

PHASES = {"decode": (DECODE,), "prefill": (PREFILL,), "all": (PREFILL, DECODE)}
MAX_UBATCH = 1 << 16  # a prefill micro-batch beyond this is a typo, not a configuration


@dataclass(frozen=True)
class ReplayConfig:
    """One simulated configuration (a trace, a GPU, a budget, a cache and a precision policy)."""

    trace: str | Trace
    capacity_bytes: int | None = None  # None: sim.budget.default_budget (VRAM-derived, or 40 % of experts)
    policy: str = "slru"
    precision: str | PrecisionPolicy = "native"  # a spec (sim.precision grammar) or an already parsed policy
    gpu: str = "rtx3060-12gb"
    model: str | None = None  # built-in model profile; None: from the trace's metadata
    partition: str = "global"
    prefetch: str = "none"  # none | trace | oracle:P
    phase: str = "decode"
    calib_fraction: float = 0.25
    ubatch: int = 512
    context: int = 4096
    seed: int = 0
    timeline: bool = True
    fast: bool = True  # compiled engine (belady with split pools: the reference) and timeline; identical results
    policy_params: dict = field(default_factory=dict)
    unit_block: int = 64  # tokens per resampling unit of a one-sequence trace (ReplayRecord.units)


@dataclass(frozen=True)
class ReplayRecord:
    """The result of one configuration. Timeline fields are None when the timeline was not run.

    Masses are shares of the counted accesses' gate mass; `per_layer_hit_rate` has None for a
    layer without counted accesses. Field order is the order of the CLI's JSON/CSV and of the
    sweep's columns.
    """

    policy: str
    precision: str
    partition: str
    prefetch: str
    gpu: str
    model: str
    phase: str
    capacity_bytes: int
    capacity_experts: float  # the budget in native-size experts
    capacity_fraction: float  # the budget as a share of all expert bytes
    accesses: int
    hits: int
    misses: int
    skipped: int
    hit_rate: float
    demand_bytes: int
    prefetch_bytes: int
    bytes_moved: int
    tokens: int
    bytes_per_token: float
    low_precision_mass: float
    skipped_mass: float
    per_layer_hit_rate: list
    tokens_per_s: float | None = None
    stall_fraction: float | None = None
    decode_s: float | None = None
    prefill_s: float | None = None
    # per resampling unit (a sequence; blocks of UNIT_BLOCK_TOKENS steps for a one-sequence trace) of the
    # counted window: {"unit", "tokens", "hits", "accesses", "time_s"} lists (time_s None without the
    # timeline), for bootstrap intervals (analysis.intervals); not a CSV column
    units: dict | None = None

    def as_dict(self) -> dict:
        """The record as a plain dict (JSON-ready)."""
        return asdict(self)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ReplayRecord))
SCALAR_FIELDS: tuple[str, ...] = tuple(n for n in RECORD_FIELDS if n not in ("per_layer_hit_rate", "units"))
UNIT_BLOCK_TOKENS = ReplayConfig.unit_block  # default block of a one-sequence trace's resampling units


def step_units(seq: np.ndarray, block: int = UNIT_BLOCK_TOKENS) -> np.ndarray:
    """int64 [steps]: each step's resampling unit: its sequence's index when there are ≥ 2 sequences, else
    its block of `block` steps (a last block shorter than half is merged), as analysis.intervals.unit_of_steps."""
    uniq, ids = np.unique(np.asarray(seq), return_inverse=True)
    if uniq.size >= 2:
        return ids.astype(np.int64)
    ids = np.arange(len(seq)) // block
    n_full, rest = divmod(len(seq), block)
    if rest and rest < block / 2 and n_full >= 1:
        ids[ids == n_full] = n_full - 1
    return ids.astype(np.int64)


def incompatible(cache_policy: str, precision: PrecisionPolicy) -> str | None:
    """Why a (cache policy, precision policy) pair cannot run, or None.

    A policy that needs the future access stream (Belady) cannot run with dynamic precision,
    which changes that stream online (skips, low-precision copies).
    """
    if precision.is_dynamic and policy_class(cache_policy).needs_future:
        return (f"{cache_policy} needs the whole future access sequence, which dynamic precision changes "
                "online (skips); use native or static precision with it")
    return None


class Prepared:
    """Everything a sweep shares across configurations: trace, profiles, groups, cost tables."""

    def __init__(self, trace: Trace, model: ModelProfile, hw: HardwareProfile, *, calib_fraction: float,
                 ubatch: int, prefetch: str, seed: int, context: int):
        self.trace, self.model, self.hw, self.seed, self.context = trace, model, hw, seed, context
        self.prefetch = prefetch
        calib = calibration_steps(trace, calib_fraction)
        self.calib_steps = calib
        m = int(np.count_nonzero(calib))  # the window is a prefix of the steps: views, not a copy
        self.calib_trace = (trace.select(slice(0, m)) if calib[:m].all() else trace.select(np.flatnonzero(calib))) if m else None
        predicted = None
        if prefetch == "none":  # no predictions: a read-only view of -1 (no copy of the trace's shape)
            predicted = np.broadcast_to(np.array(-1, dtype=trace.experts.dtype), trace.experts.shape)
        elif prefetch == "trace":
            if trace.predicted is None:
                raise InputError(None, "--prefetch trace: the trace has no predicted experts")
        elif prefetch.startswith("oracle:"):
            try:
                p = float(prefetch.split(":", 1)[1])
            except ValueError:
                p = -1.0
            if not 0 <= p <= 1:
                raise InputError(None, f"--prefetch {prefetch!r}: accuracy must be in [0, 1]")
            predicted = oracle_predictions(trace, p, seed)
        else:
            raise InputError(None, f"--prefetch {prefetch!r}: use none, trace or oracle:P")
        self.groups: AccessGroups = build_groups(trace, calib, ubatch=ubatch, predicted=predicted)
        self.sizes, self.link_s = cost.slot_tables(model, hw)
        self.compute = cost.ComputeTable(model, hw)

    def default_capacity(self) -> tuple[int, str]:
        """The expert budget when none is given, and how it was chosen (sim.budget.default_budget)."""
        return default_budget(self.model, self.hw, self.context)


def check_config(cfg: ReplayConfig) -> None:
    """Range-check the numeric and named options of a configuration (InputError names the option)."""
    if cfg.phase not in PHASES:
        raise InputError(None, f"--phase {cfg.phase!r}: use decode, prefill or all")
    if cfg.partition not in PARTITIONS:
        raise InputError(None, f"--partition {cfg.partition!r}: use {' or '.join(PARTITIONS)}")
    if not 1 <= cfg.ubatch <= MAX_UBATCH:
        raise InputError(None, f"--ubatch {cfg.ubatch}: a prefill micro-batch must be 1..{MAX_UBATCH} tokens")
    if cfg.context < 0:
        raise InputError(None, f"--context {cfg.context}: a context length must be ≥ 0 tokens")
    if not 0 <= cfg.calib_fraction < 1 or math.isnan(cfg.calib_fraction):
        raise InputError(None, f"--calib-fraction {cfg.calib_fraction}: must be in [0, 1)")
    if cfg.seed < 0:
        raise InputError(None, f"--seed {cfg.seed}: must be ≥ 0")
    if cfg.capacity_bytes is not None and cfg.capacity_bytes < 0:
        raise InputError(None, f"capacity {cfg.capacity_bytes}: a budget must be ≥ 0 bytes")


def prepare(cfg: ReplayConfig) -> Prepared:
    """Check `cfg`, load its trace and profiles, and build its access groups."""
    check_config(cfg)
    trace = load_trace(cfg.trace) if not isinstance(cfg.trace, Trace) else cfg.trace
    model = model_for_trace(trace.meta, cfg.model)
    hw = load_hardware(cfg.gpu)
    return Prepared(trace, model, hw, calib_fraction=cfg.calib_fraction, ubatch=cfg.ubatch,
                    prefetch=cfg.prefetch, seed=cfg.seed, context=cfg.context)


def run_prepared(prep: Prepared, cfg: ReplayConfig) -> ReplayRecord:
    """Simulate one configuration on prepared data; returns its record."""
    policy = cfg.precision if isinstance(cfg.precision, PrecisionPolicy) else parse_precision(cfg.precision)
    model = prep.model
    capacity = cfg.capacity_bytes if cfg.capacity_bytes is not None else prep.default_capacity()[0]
    try:
        check_priced(prep.sizes, policy.low_formats(), model)
        hi_slots = _static_slots(prep, policy, cfg.seed)
    except ValueError as exc:
        raise InputError(None, f"precision {policy.name!r}: {exc}") from None
    try:
        why = incompatible(cfg.policy, policy)
        if why:
            raise InputError(None, why)
        spec = CacheSpec(cfg.policy, int(capacity), cfg.partition, model.n_layers, dict(cfg.policy_params))
        out = replay(prep.groups, spec, policy, hi_slots, prep.sizes, prep.link_s, fast=cfg.fast)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(None, f"cache policy {cfg.policy!r}: {exc}") from None
    return summarize(prep, cfg, policy.name, capacity, out)


def _static_slots(prep: Prepared, policy: PrecisionPolicy, seed: int) -> np.ndarray:
    """sim.precision.static_slots of the prepared calibration window, computed once per static part of a
    precision policy (signal, fraction, format) and seed, and shared read-only by the configurations
    that differ only in their dynamic part, pools or cache policy."""
    model = prep.model
    if not policy.is_static:
        return static_slots(prep.calib_trace, policy, model.n_layers, model.n_experts, seed)
    cache = prep.__dict__.setdefault("_static_slots", {})
    key = (policy.static_signal, policy.static_fraction, policy.static_format, seed, id(prep.calib_trace))
    if key not in cache:
        slots = static_slots(prep.calib_trace, policy, model.n_layers, model.n_experts, seed)
        slots.flags.writeable = False
        cache[key] = (slots, prep.calib_trace)  # the window is kept alive with its id
    return cache[key][0]


def _counted_view(prep: Prepared, phase: str, unit_block: int) -> dict:
    """What `summarize` needs that does not depend on the replay's outcome (counted groups and accesses,
    per-layer counted accesses, the counted gate mass, tokens and the resampling units' tokens and
    accesses), computed once per (prepared trace, phase, unit block) and reused by every configuration.
    Keyed on the identity of the groups, trace, calibration mask and model it was computed from."""
    g = prep.groups
    cache = prep.__dict__.setdefault("_counted_views", {})
    key = (phase, unit_block)
    hit = cache.get(key)
    if hit is not None and hit["src"][0] is g and hit["src"][1] is prep.trace and hit["src"][2] is prep.calib_steps \
            and hit["src"][3] is prep.model:
        return hit
    n_layers = prep.model.n_layers
    counted_g = ~g.calib & np.isin(g.phase, PHASES[phase])
    counted = np.zeros(g.expert.size, dtype=bool)
    layer_acc = np.zeros(n_layers, dtype=np.int64)
    g_acc = np.zeros(g.n_groups, dtype=np.int64)
    _count(g.start, g.layer, counted_g, counted, layer_acc, g_acc)
    unit_of_step = step_units(prep.trace.seq, unit_block)
    step_counted = ~prep.calib_steps & np.isin(prep.trace.phase, PHASES[phase])
    n_units = int(unit_of_step.max()) + 1
    g_unit = unit_of_step[g.step]
    u_tokens = np.bincount(unit_of_step[step_counted], minlength=n_units)
    u_acc = np.bincount(g_unit, weights=g_acc.astype(np.float64), minlength=n_units).astype(np.int64)
    keep = np.flatnonzero(u_tokens > 0)
    for a in (counted_g, layer_acc, g_unit, keep):
        a.flags.writeable = False
    view = {
        "src": (g, prep.trace, prep.calib_steps, prep.model),
        "counted_g": counted_g,
        "layer_acc": layer_acc,
        "accesses": int(layer_acc.sum()),
        "mass_total": float(g.mass[counted].sum()),
        "tokens": int(np.isin(prep.trace.phase[~prep.calib_steps], PHASES[phase]).sum()),
        "n_units": n_units,
        "g_unit": g_unit,
        "keep": keep,
        "u_tokens": u_tokens[keep].tolist(),
        "u_acc": u_acc[keep].tolist(),
    }
    cache[key] = view
    return view


def summarize(prep: Prepared, cfg: ReplayConfig, precision_name: str, capacity: int, out: Outcome) -> ReplayRecord:
    """Turn a replay outcome into a record (running the timeline when asked)."""
    g, model, hw = prep.groups, prep.model, prep.hw
    view = _counted_view(prep, cfg.phase, cfg.unit_block)
    counted_g, layer_acc, g_unit, keep, n_units = (view["counted_g"], view["layer_acc"], view["g_unit"],
                                                   view["keep"], view["n_units"])
    low_w = np.empty(g.expert.size, dtype=np.float64)  # uninitialised: only the pages written are touched
    skip_w = np.empty(g.expert.size, dtype=np.float64)
    layer_hit = np.zeros(model.n_layers, dtype=np.int64)
    u_hits = np.zeros(n_units, dtype=np.int64)  # counted hits per resampling unit
    hits, misses, skipped, demand_bytes, n_low = _tally(g.start, g.layer, counted_g, out.result, out.slot, prep.sizes,
                                                        g_unit, g.mass, low_w, skip_w, layer_hit, u_hits)
    tokens = view["tokens"]
    accesses = view["accesses"]
    prefetch_bytes = int(out.prefetch_bytes[counted_g].sum())
    mass_total = view["mass_total"]
    # the selected gate masses in access order, summed by numpy (pairwise) as g.mass[mask].sum() sums them;
    # an empty selection sums to 0.0
    low_mass = float(low_w[:n_low].sum()) if n_low else 0.0
    skip_mass = float(skip_w[:skipped].sum()) if skipped else 0.0
    rec = {
        "policy": cfg.policy,
        "precision": precision_name,
        "partition": cfg.partition,
        "prefetch": cfg.prefetch,
        "gpu": hw.name,
        "model": model.name,
        "phase": cfg.phase,
        "capacity_bytes": int(capacity),
        "capacity_experts": round(capacity / float(prep.sizes[:, 0].mean()), 1),
        "capacity_fraction": round(capacity / model.total_expert_bytes(), 4),
        "accesses": accesses,
        "hits": hits,
        "misses": misses,
        "skipped": skipped,
        "hit_rate": hits / accesses if accesses else float("nan"),
        "demand_bytes": demand_bytes,
        "prefetch_bytes": prefetch_bytes,
        "bytes_moved": demand_bytes + prefetch_bytes,
        "tokens": tokens,
        "bytes_per_token": (demand_bytes + prefetch_bytes) / tokens if tokens else float("nan"),
        "low_precision_mass": low_mass / mass_total if mass_total else 0.0,
        "skipped_mass": skip_mass / mass_total if mass_total else 0.0,
        "per_layer_hit_rate": [round(float(h) / a, 6) if a else None for h, a in zip(layer_hit, layer_acc)],
    }
    units = {"unit": keep.tolist(), "tokens": list(view["u_tokens"]), "hits": u_hits[keep].tolist(),
             "accesses": list(view["u_acc"]), "time_s": None}
    rec["units"] = units
    if cfg.timeline:
        tl = timeline.TimelineModel.from_profile(hw.raw)
        costs = cost.group_costs(g, out, model, hw, prep.link_s, prep.compute, None,
                                 decode_only=not np.any(g.phase == PREFILL), tl=tl)
        sched = timeline_compiled.schedule(costs, tl) if cfg.fast else timeline.simulate(costs, tl)
        span = np.diff(np.r_[0.0, sched.end_s])
        counted_s = float(span[counted_g].sum())
        rec.update(
            tokens_per_s=tokens / counted_s if counted_s > 0 and tokens else float("nan"),
            stall_fraction=float(sched.stall_s[counted_g].sum()) / counted_s if counted_s > 0 else float("nan"),
            decode_s=float(span[~g.calib & (g.phase == DECODE)].sum()),
            prefill_s=float(span[~g.calib & (g.phase == PREFILL)].sum()),
        )
        units["time_s"] = np.bincount(g_unit[counted_g], weights=span[counted_g], minlength=n_units)[keep].tolist()
    return ReplayRecord(**rec)


@numba.njit(cache=True)
def _count(start, layer, counted_g, counted, layer_acc, g_acc):  # pragma: no cover - compiled
    """The counted accesses (mask), per layer and per group: what does not depend on the replay."""
    for g in range(layer.shape[0]):
        if not counted_g[g]:
            continue
        la = layer[g]
        for a in range(start[g], start[g + 1]):
            counted[a] = True
        layer_acc[la] += start[g + 1] - start[g]
        g_acc[g] += start[g + 1] - start[g]


@numba.njit(cache=True)
def _tally(start, layer, counted_g, result, slot, sizes, g_unit, mass, low_w, skip_w, layer_hit,
           u_hits):  # pragma: no cover - compiled
    """One pass over the counted accesses' outcomes: the gate masses of the low-precision and of the skipped
    accesses (packed in order into low_w, skip_w), hit counts (per layer and per resampling unit), demand
    bytes and the number of low-precision accesses."""
    hits = misses = skipped = demand = n_low = 0
    for g in range(layer.shape[0]):
        if not counted_g[g]:
            continue
        la = layer[g]
        gh = 0
        for a in range(start[g], start[g + 1]):
            r = result[a]
            if r == HIT:
                gh += 1
            elif r == LOADED:
                misses += 1
                demand += sizes[la, slot[a]]
            else:
                skip_w[skipped] = mass[a]
                skipped += 1
            if r != SKIPPED and slot[a] > 0:
                low_w[n_low] = mass[a]
                n_low += 1
        hits += gh
        layer_hit[la] += gh
        u_hits[g_unit[g]] += gh
    return hits, misses, skipped, demand, n_low


def run(cfg: ReplayConfig) -> ReplayRecord:
    """Simulate one configuration end to end; returns its record."""
    return run_prepared(prepare(cfg), cfg)
