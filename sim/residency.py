"""`python -m sim.residency TRACE --budget B`: check the simulator against an engine's recorded residency.

An engine that records, for every routed expert, whether its own cache already held it (the
route CSV's `residency` column, kept by `sim.convert` as the trace's `residency` array) lets the
cache simulation be validated directly: replay the trace through a cache policy at the engine's
budget (native precision, no prefetch, from an empty cache, no calibration window) and compare,
access by access, "hit" with "was resident". Decode accesses are compared (a decode group is one
token × layer, so its accesses are the trace's selections one for one); prefill batches load each
distinct expert once and have no per-selection counterpart. Accesses whose recorded residency is
unknown (-1) are left out.

Known check: the shared Qwen3-30B-A3B phone trace through a global LRU of 4000 MiB agrees on
every decode access (../shared/traces/bigmoeonedge/README.md).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from sim.budget import BYTES, parse_budget
from sim.cache import POLICY_NAMES
from sim.engine import HIT, CacheSpec, replay
from sim.io import InputError, exit_on_input_error
from sim.precision import parse_precision, static_slots
from sim.simulate import ReplayConfig, prepare
from sim.trace import DECODE, UNKNOWN, Trace, load_trace


@dataclass(frozen=True)
class ResidencyCheck:
    """Agreement of a replay with a recorded residency, over the compared (decode) accesses."""

    accesses: int  # compared accesses (decode, recorded residency known)
    agree: int
    recorded_hit_rate: float
    simulated_hit_rate: float
    first_disagreement: dict | None  # step, layer, slot, expert, recorded, simulated; None when all agree

    @property
    def agreement(self) -> float:
        return self.agree / self.accesses if self.accesses else float("nan")


def compare_residency(trace: Trace, capacity_bytes: int, *, policy: str = "lru", partition: str = "global",
                      model: str | None = None, ubatch: int = 512, policy_params: dict | None = None) -> ResidencyCheck:
    """Replay `trace` through `policy` at `capacity_bytes` and compare hits with `trace.residency`."""
    if trace.residency is None:
        raise InputError(None, "the trace has no recorded residency (convert a route CSV with a residency column)")
    cfg = ReplayConfig(trace=trace, model=model, calib_fraction=0, ubatch=ubatch, partition=partition,
                       timeline=False, policy=policy)
    prep = prepare(cfg)
    g = prep.groups
    native = parse_precision("native")
    slots = static_slots(None, native, prep.model.n_layers, prep.model.n_experts, 0)
    spec = CacheSpec(policy, int(capacity_bytes), partition, prep.model.n_layers, dict(policy_params or {}))
    try:
        out = replay(g, spec, native, slots, prep.sizes, prep.link_s)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(None, f"cache policy {policy!r}: {exc}") from None
    decode_acc = np.repeat(g.phase, np.diff(g.start)) == DECODE
    simulated = out.result[decode_acc] == HIT
    # decode accesses follow the trace's decode selections of present groups in (step, layer, slot) order
    steps = np.flatnonzero(trace.phase == DECODE)
    present = trace.experts[steps, :, 0] >= 0
    t_idx, l_idx = np.nonzero(present)
    k = trace.meta.top_k
    recorded = trace.residency[steps[t_idx], l_idx].reshape(-1)
    if recorded.size != simulated.size:
        raise InputError(None, f"{recorded.size} recorded decode selections but {simulated.size} replayed accesses")
    known = recorded != UNKNOWN
    rec_hit = recorded == 1
    same = (rec_hit == simulated) | ~known
    n = int(known.sum())
    first = None
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        first = {"step": int(steps[t_idx[i // k]]), "layer": int(l_idx[i // k]), "slot": i % k,
                 "expert": int(trace.experts[steps[t_idx[i // k]], l_idx[i // k], i % k]),
                 "recorded": int(recorded[i]), "simulated": int(simulated[i])}
    return ResidencyCheck(
        accesses=n, agree=int((same & known).sum()),
        recorded_hit_rate=float(rec_hit[known].mean()) if n else float("nan"),
        simulated_hit_rate=float(simulated[known].mean()) if n else float("nan"),
        first_disagreement=first,
    )


def build_parser() -> argparse.ArgumentParser:
    """The sim.residency argument parser."""
    ap = argparse.ArgumentParser(
        prog="python -m sim.residency",
        description="Compare a cache replay with the residency an engine recorded for every routed expert.",
        epilog="""examples:
  python -m sim.convert ../shared/traces/bigmoeonedge/qwen.route.csv -o /tmp/q.npz
  python -m sim.residency /tmp/q.npz --budget 4000MiB --policy lru""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("trace", help="npz trace with a residency array (python -m sim.convert keeps a route CSV's column)")
    ap.add_argument("--budget", required=True, help="the engine's expert cache size in bytes (4000MiB)")
    ap.add_argument("--policy", default="lru", help="cache policy the engine used (default: %(default)s)")
    ap.add_argument("--partition", choices=("global", "per-layer"), default="global")
    ap.add_argument("--model", help="built-in model profile (default: from the trace's metadata)")
    return ap


@exit_on_input_error
def main(argv: list[str] | None = None) -> ResidencyCheck:
    """CLI entry point: one line of agreement, one line naming the first disagreement."""
    args = build_parser().parse_args(argv)
    if args.policy not in POLICY_NAMES:
        raise InputError(None, f"unknown cache policy {args.policy!r}; known: {', '.join(POLICY_NAMES)}")
    budget = parse_budget(args.budget)
    if budget.kind != BYTES:
        raise InputError(None, f"--budget {args.budget!r}: give the engine's cache size in bytes (e.g. 4000MiB)")
    trace = load_trace(args.trace)
    if trace.residency is None:
        raise InputError(args.trace, "no recorded residency in this trace (convert a route CSV with a residency column)")
    check = compare_residency(trace, int(budget.value), policy=args.policy, partition=args.partition, model=args.model)
    print(f"{args.trace}: {args.policy} {args.partition} {args.budget}: {check.agree}/{check.accesses} decode accesses "
          f"agree ({check.agreement:.2%}); hit rate recorded {check.recorded_hit_rate:.4f}, "
          f"simulated {check.simulated_hit_rate:.4f}")
    d = check.first_disagreement
    print("first disagreement: none" if d is None else
          f"first disagreement: step {d['step']} layer {d['layer']} slot {d['slot']} expert {d['expert']}: "
          f"recorded {'resident' if d['recorded'] else 'not resident'}, simulated {'hit' if d['simulated'] else 'miss'}")
    sys.stdout.flush()
    return check


if __name__ == "__main__":
    main()
