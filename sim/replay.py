"""`python -m sim.replay TRACE`: replay a routing trace through precision and cache policies.

For every (cache policy, precision policy, expert budget) the replay reports hit rates, bytes moved
over PCIe per decoded token, predicted decode tokens/s and stall fraction on a named GPU, and the
share of gate mass served at low precision or skipped (the quality side joins on these).
Library use: `run(ReplayConfig(...))` returns the same records the CLI prints.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from sim import cost
from sim.engine import (
    HIT, LOADED, SKIPPED, SLOTS, AccessGroups, build_groups, calibration_steps, make_keys, oracle_predictions, replay,
    replay_fast,
    slot_tables, static_slots,
)
from sim.io import InputError, atomic_path, exit_on_input_error
from sim.precision import parse_precision
from sim.profiles import GIB, HardwareProfile, ModelProfile, derived_expert_budget, load_hardware, model_for_trace, parse_bytes
from sim.timeline import GroupCosts, TimelineModel, simulate
from sim.trace import DECODE, PREFILL, Trace, load_trace

PHASES = {"decode": (DECODE,), "prefill": (PREFILL,), "all": (PREFILL, DECODE)}


@dataclass(frozen=True)
class ReplayConfig:
    """One simulated configuration (a trace, a GPU, a budget, a cache and a precision policy)."""

    trace: str | Trace
    capacity_bytes: int | None = None  # None: derived from the GPU's VRAM (or 40 % of experts, see budget_for)
    policy: str = "slru"
    precision: str = "native"
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
    fast: bool = True  # use the compiled cache replay where it applies (identical results)
    policy_params: dict = field(default_factory=dict)


class Prepared:
    """Everything a sweep shares across configurations: trace, profiles, groups, cost tables."""

    def __init__(self, trace: Trace, model: ModelProfile, hw: HardwareProfile, *, calib_fraction: float,
                 ubatch: int, prefetch: str, seed: int, context: int):
        self.trace, self.model, self.hw, self.seed, self.context = trace, model, hw, seed, context
        self.prefetch = prefetch
        calib = calibration_steps(trace, calib_fraction)
        self.calib_steps = calib
        self.calib_trace = trace.select(np.flatnonzero(calib)) if calib.any() else None
        predicted = None
        if prefetch == "none":
            predicted = np.full_like(trace.experts, -1)
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
        self.sizes, self.link_s = slot_tables(model, hw)
        self._compute_cache: dict = {}

    def default_capacity(self) -> tuple[int, str]:
        """The expert budget when none is given, and how it was chosen."""
        derived = derived_expert_budget(self.model, self.hw, self.context)
        total = self.model.total_expert_bytes()
        if derived < total:
            return derived, f"derived from {self.hw.name} VRAM (VRAM − dense − head − KV@{self.context} − reserve)"
        return int(0.4 * total), f"40 % of all expert bytes (the whole model fits in {self.hw.name}'s VRAM)"

    def compute_s(self, layer: np.ndarray, slot: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(per-launch, per-expert) compute seconds per access, priced once per distinct (layer, slot, tokens)."""
        code = (layer.astype(np.int64) * len(SLOTS) + slot) * (1 << 20) + tokens
        uniq, inv = np.unique(code, return_inverse=True)
        vals = np.empty((uniq.size, 2))
        for i, c in enumerate(uniq.tolist()):
            if c not in self._compute_cache:
                t, rest = c % (1 << 20), c >> 20
                lay, s = divmod(rest, len(SLOTS))
                if s == 0:
                    fmt, nbytes = self.model.native_name(lay), self.model.expert_bytes(lay)
                else:
                    fmt, nbytes = SLOTS[s], self.model.expert_bytes(lay, SLOTS[s])
                self._compute_cache[c] = cost.expert_launch_split(self.hw, fmt, t, self.model.expert_weights, nbytes)
            vals[i] = self._compute_cache[c]
        return vals[inv, 0], vals[inv, 1]


def _make_caches(prep: Prepared, cfg: ReplayConfig, capacity: int, low_share: float | None):
    from sim.cache.base import make_policy

    kw = dict(partition=cfg.partition, n_layers=prep.model.n_layers, **cfg.policy_params)
    if low_share is None:
        c = make_policy(cfg.policy, capacity, **kw)
        return c, c
    return (make_policy(cfg.policy, int(capacity * (1 - low_share)), **kw),
            make_policy(cfg.policy, int(capacity * low_share), **kw))


def run_prepared(prep: Prepared, cfg: ReplayConfig) -> dict:
    """Simulate one configuration on prepared data; returns one result record."""
    policy = parse_precision(cfg.precision)
    g = prep.groups
    model = prep.model
    capacity = cfg.capacity_bytes if cfg.capacity_bytes is not None else prep.default_capacity()[0]
    try:
        hi_slots = static_slots(prep.calib_trace, policy, model.n_layers, model.n_experts, cfg.seed)
    except ValueError as exc:
        raise InputError(None, f"precision {cfg.precision!r}: {exc}") from None
    if cfg.policy == "belady" and policy.is_dynamic:
        raise InputError(None, "belady needs the whole future access sequence, which dynamic precision "
                               "changes online (skips); use native or static precision with belady")
    try:
        caches = _make_caches(prep, cfg, capacity, policy.low_pool_share)
        fast = None if not cfg.fast else replay_fast(g, cfg.policy, dict(cfg.policy_params), cfg.partition,
                                                     model.n_layers, capacity, policy, hi_slots, prep.sizes)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(None, f"cache policy {cfg.policy!r}: {exc}") from None
    acc_layer = np.repeat(g.layer, np.diff(g.start))
    if fast is not None:
        return summarize(prep, cfg, policy.name, capacity, fast, acc_layer)
    acc_layer = np.repeat(g.layer, np.diff(g.start))
    acc_slot_hi = hi_slots[acc_layer, g.expert]
    keys = make_keys(acc_layer, g.expert, acc_slot_hi)
    calib_acc = np.repeat(g.calib, np.diff(g.start))
    acc_sizes = prep.sizes[acc_layer, acc_slot_hi]
    for c in {id(c): c for c in caches}.values():
        if cfg.policy == "static":  # pin the hottest entries of the calibration window
            c.fit(keys[calib_acc], acc_sizes[calib_acc])
        if cfg.policy == "belady":  # the whole future, with sizes and groups (exact for equal sizes)
            c.prepare(keys, acc_sizes, g.start[:-1])
    out = replay(g, caches, policy, hi_slots, prep.sizes, prep.link_s)
    return summarize(prep, cfg, policy.name, capacity, out, acc_layer)


def summarize(prep: Prepared, cfg: ReplayConfig, precision_name: str, capacity: int, out, acc_layer) -> dict:
    """Turn a replay outcome into a result record (running the timeline when asked)."""
    g, model, hw = prep.groups, prep.model, prep.hw
    n_per_group = np.diff(g.start)
    group_of = np.repeat(np.arange(g.n_groups), n_per_group)
    served = out.result != SKIPPED
    slot = np.where(served, out.slot, 0)
    loaded = out.result == LOADED
    acc_bytes = np.where(loaded, prep.sizes[acc_layer, slot], 0)
    acc_link = np.where(loaded, prep.link_s[acc_layer, slot], 0.0)
    launch_s, per_expert_s = prep.compute_s(acc_layer, slot, g.acc_tokens)
    tl = TimelineModel.from_profile(hw.raw)
    # a group's served experts of one format share one launch: its fixed part is paid once
    # (an engine that computes resident experts during the copies launches them apart from the missing ones)
    first_of_launch = np.zeros(slot.size, dtype=bool)
    launch_code = (group_of.astype(np.int64) * len(SLOTS) + slot) * (2 if tl.overlap_resident else 1) \
        + (loaded if tl.overlap_resident else 0)
    _, first_idx = np.unique(np.where(served, launch_code, -1), return_index=True)
    first_of_launch[first_idx] = True
    acc_comp = np.where(served, per_expert_s + np.where(first_of_launch, launch_s, 0.0), 0.0)
    counted_g = ~g.calib & np.isin(g.phase, PHASES[cfg.phase])
    counted = counted_g[group_of]
    low = served & (slot > 0)
    tokens = int(np.isin(prep.trace.phase[~prep.calib_steps], PHASES[cfg.phase]).sum())
    hits = int((counted & (out.result == HIT)).sum())
    accesses = int(counted.sum())
    demand_bytes = int(acc_bytes[counted].sum())
    prefetch_bytes = int(out.prefetch_bytes[counted_g].sum())
    mass_total = float(g.mass[counted].sum())
    layer_acc = np.bincount(acc_layer[counted], minlength=model.n_layers)
    layer_hit = np.bincount(acc_layer[counted & (out.result == HIT)], minlength=model.n_layers)
    rec = dict(
        policy=cfg.policy,
        precision=precision_name,
        partition=cfg.partition,
        prefetch=cfg.prefetch,
        gpu=hw.name,
        model=model.name,
        phase=cfg.phase,
        capacity_bytes=int(capacity),
        capacity_experts=round(capacity / float(prep.sizes[:, 0].mean()), 1),
        capacity_fraction=round(capacity / model.total_expert_bytes(), 4),
        accesses=accesses,
        hits=hits,
        misses=int((counted & loaded).sum()),
        skipped=int((counted & (out.result == SKIPPED)).sum()),
        hit_rate=hits / accesses if accesses else float("nan"),
        demand_bytes=demand_bytes,
        prefetch_bytes=prefetch_bytes,
        bytes_moved=demand_bytes + prefetch_bytes,
        tokens=tokens,
        bytes_per_token=(demand_bytes + prefetch_bytes) / tokens if tokens else float("nan"),
        low_precision_mass=float(g.mass[counted & low].sum()) / mass_total if mass_total else 0.0,
        skipped_mass=float(g.mass[counted & ~served].sum()) / mass_total if mass_total else 0.0,
        per_layer_hit_rate=[round(float(h) / a, 6) if a else None for h, a in zip(layer_hit, layer_acc)],
    )
    if cfg.timeline:
        head = cost.head_s(hw, model.head_bytes)
        dense = np.array([cost.dense_s(hw, int(t), int(model.dense_bytes[la])) for t, la in zip(g.tokens.tolist(), g.layer.tolist())]) \
            if np.any(g.phase == PREFILL) else _decode_dense(prep)
        costs = GroupCosts(
            dense_s=dense,
            compute_s=np.bincount(group_of, weights=acc_comp, minlength=g.n_groups) + np.where(g.token_end, head, 0.0),
            demand_link_s=np.bincount(group_of, weights=acc_link, minlength=g.n_groups),
            prefetch_link_s=out.prefetch_link_s,
            wait_group=out.wait_group,
            resident_compute_s=np.bincount(group_of, weights=np.where(loaded, 0.0, acc_comp), minlength=g.n_groups)
            if tl.overlap_resident else None,
        )
        sched = simulate(costs, tl)
        span = np.diff(np.r_[0.0, sched.end_s])
        counted_s = float(span[counted_g].sum())
        rec.update(
            tokens_per_s=tokens / counted_s if counted_s > 0 and tokens else float("nan"),
            stall_fraction=float(sched.stall_s[counted_g].sum()) / counted_s if counted_s > 0 else float("nan"),
            decode_s=float(span[~g.calib & (g.phase == DECODE)].sum()),
            prefill_s=float(span[~g.calib & (g.phase == PREFILL)].sum()),
        )
    return rec


def _decode_dense(prep: Prepared) -> np.ndarray:
    per_layer = np.array([cost.dense_s(prep.hw, 1, int(b)) for b in prep.model.dense_bytes])
    return per_layer[prep.groups.layer]


def prepare(cfg: ReplayConfig) -> Prepared:
    """Load the trace and profiles of `cfg` and build its access groups."""
    trace = load_trace(cfg.trace) if not isinstance(cfg.trace, Trace) else cfg.trace
    model = model_for_trace(trace.meta, cfg.model)
    hw = load_hardware(cfg.gpu)
    if cfg.phase not in PHASES:
        raise InputError(None, f"--phase {cfg.phase!r}: use decode, prefill or all")
    return Prepared(trace, model, hw, calib_fraction=cfg.calib_fraction, ubatch=cfg.ubatch,
                    prefetch=cfg.prefetch, seed=cfg.seed, context=cfg.context)


def run(cfg: ReplayConfig) -> dict:
    """Simulate one configuration end to end; returns one result record."""
    return run_prepared(prepare(cfg), cfg)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

EPILOG = """examples:
  python -m sim.replay traces/qwen3.npz
  python -m sim.replay traces/qwen3.npz --policy slru,lru,s3fifo,belady --experts 30%,50%
  python -m sim.replay qwen30b.npz --gpu rtx4070-12gb --budget 9GiB \\
      --precision native,static:mass:30%:q2_k,dynamic:0.6:0.9,static:mass:20%:q3_k+dynamic:0.6:0.9
  python -m sim.replay qwen30b.npz --sweep-budget 4GiB:10GiB:1GiB --json sweep.json
  python -m sim.replay traces/qwen3.npz --prefetch trace --partition per-layer --csv out.csv

budgets: --budget takes bytes (9GiB, 9.5GB, 4000MiB); --experts takes a count of native-size
experts or a percentage of all experts (3300, 40%); --sweep-budget START:STOP:STEP in either unit.
Without any, the budget is derived from the GPU (VRAM − dense − head − KV cache − reserve), or is
40 % of the experts when the whole model would fit.
precision: native | static:SIGNAL:X%:FMT (SIGNAL freq|weight|mass|random, FMT q2_k|q3_k) |
dynamic:T1:T2[:FMT] | combinations joined by + | +pools:split:S for a separate low-precision pool.
"""


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _budget_values(prep: Prepared, args) -> list[tuple[int, str]]:
    native_mean = float(prep.sizes[:, 0].mean())
    total = prep.model.total_expert_bytes()

    def one(text: str, unit: str) -> int:
        if unit == "bytes":
            return parse_bytes(text)
        t = text.strip()
        if t.endswith("%"):
            try:
                return int(float(t[:-1]) / 100 * total)
            except ValueError:
                raise InputError(None, f"--experts: cannot parse {text!r}") from None
        try:
            return int(float(t) * native_mean)
        except ValueError:
            raise InputError(None, f"--experts: cannot parse {text!r} (a count such as 3300 or a share such as 40%)") from None

    if args.sweep_budget:
        parts = args.sweep_budget.split(":")
        if len(parts) != 3:
            raise InputError(None, f"--sweep-budget {args.sweep_budget!r}: use START:STOP:STEP, e.g. 2GiB:10GiB:1GiB or 10%:90%:10%")
        unit = "experts" if (parts[0].strip().endswith("%") or parts[0].strip().replace(".", "").isdigit()) else "bytes"
        lo, hi, step = (one(p, unit) for p in parts)
        if step <= 0 or hi < lo:
            raise InputError(None, f"--sweep-budget {args.sweep_budget!r}: need STEP > 0 and STOP ≥ START")
        values = list(range(lo, hi + 1, step))
        return [(v, "sweep") for v in values]
    if args.budget:
        return [(one(b, "bytes"), "--budget") for b in _split(args.budget)]
    if args.experts:
        return [(one(e, "experts"), "--experts") for e in _split(args.experts)]
    cap, why = prep.default_capacity()
    return [(cap, why)]


def _fmt_table(records: list[dict]) -> str:
    """A readable fixed-width table of result records."""
    cols = [
        ("policy", "policy", "{}"),
        ("precision", "precision", "{}"),
        ("budget GiB", "capacity_bytes", None),
        ("experts", "capacity_experts", "{:.0f}"),
        ("hit rate", "hit_rate", "{:.3f}"),
        ("MB/token", "bytes_per_token", None),
        ("tok/s", "tokens_per_s", "{:.1f}"),
        ("stall", "stall_fraction", "{:.0%}"),
        ("low mass", "low_precision_mass", "{:.1%}"),
        ("skip mass", "skipped_mass", "{:.1%}"),
    ]
    rows = []
    for r in records:
        row = []
        for _, key, fmt in cols:
            v = r.get(key)
            if v is None:
                row.append("–")
            elif key == "capacity_bytes":
                row.append(f"{v / GIB:.2f}")
            elif key == "bytes_per_token":
                row.append(f"{v / 1e6:.1f}")
            else:
                row.append(fmt.format(v))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, ((h, _, _), w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _fmt_per_layer(records: list[dict]) -> str:
    """Hit rate per layer, one row per configuration (layers as columns, 12 per block)."""
    n = len(records[0]["per_layer_hit_rate"])
    lines = []
    for lo in range(0, n, 12):
        cols = range(lo, min(n, lo + 12))
        lines.append("layer hit rate".ljust(34) + "".join(f"{c:>6d}" for c in cols))
        for r in records:
            label = f"{r['policy']} {r['precision']}"[:32].ljust(34)
            vals = (r["per_layer_hit_rate"][c] for c in cols)
            lines.append(label + "".join("     –" if v is None else f"{v:6.2f}" for v in vals))
    return "\n".join(lines)


def _write_outputs(records: list[dict], json_path: str | None, csv_path: str | None) -> None:
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(records, indent=1) + "\n")
    if csv_path:
        flat = [{k: v for k, v in r.items() if k != "per_layer_hit_rate"} for r in records]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
        with atomic_path(csv_path) as tmp:
            tmp.write_text(buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    """The sim.replay argument parser."""
    ap = argparse.ArgumentParser(
        prog="python -m sim.replay",
        description="Replay an expert-routing trace through precision and cache policies and a PCIe/compute timeline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("trace", help="routing trace (.npz, see docs/trace-format.md; import others with python -m sim.convert)")
    ap.add_argument("--gpu", default="rtx3060-12gb", help="hardware profile name or JSON path (default: %(default)s)")
    ap.add_argument("--model", help="built-in model profile (default: from the trace's metadata)")
    ap.add_argument("--budget", help="expert budget(s) in bytes, comma-separated: 9GiB,10GiB")
    ap.add_argument("--experts", help="expert budget(s) as native-size expert counts or percentages: 3300,40%%")
    ap.add_argument("--sweep-budget", help="START:STOP:STEP budgets, in bytes (2GiB:10GiB:1GiB) or experts (10%%:90%%:10%%)")
    ap.add_argument("--policy", default="slru", help="cache policies, comma-separated (default: %(default)s)")
    ap.add_argument("--precision", default="native", help="precision policies, comma-separated (default: %(default)s)")
    ap.add_argument("--partition", choices=("global", "per-layer"), default="global", help="one cache, or one per layer")
    ap.add_argument("--protected-share", type=float, help="SLRU protected segment's share of the capacity")
    ap.add_argument("--prefetch", default="none", help="none | trace (the trace's predicted experts) | oracle:P")
    ap.add_argument("--phase", choices=tuple(PHASES), default="decode", help="which phase the hit statistics count")
    ap.add_argument("--calib-fraction", type=float, default=0.25,
                    help="share of the trace used to learn static policies and warm the cache (default: %(default)s)")
    ap.add_argument("--ubatch", type=int, default=512, help="prefill micro-batch in tokens (default: %(default)s)")
    ap.add_argument("--context", type=int, default=4096, help="context length for the KV-cache budget (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed for random signals and oracle prefetch")
    ap.add_argument("--no-timeline", action="store_true", help="hit rates and bytes only (skip the simpy timeline)")
    ap.add_argument("--per-layer", action="store_true", help="also print each configuration's hit rate per layer")
    ap.add_argument("--json", help="write one record per configuration to this JSON file")
    ap.add_argument("--csv", help="write one row per configuration to this CSV file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap


@exit_on_input_error
def main(argv: list[str] | None = None) -> list[dict]:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    if not 0 <= args.calib_fraction < 1:
        raise InputError(None, "--calib-fraction must be in [0, 1)")
    base = ReplayConfig(
        trace=args.trace, gpu=args.gpu, model=args.model, partition=args.partition, prefetch=args.prefetch,
        phase=args.phase, calib_fraction=args.calib_fraction, ubatch=args.ubatch, context=args.context,
        seed=args.seed, timeline=not args.no_timeline,
        policy_params={} if args.protected_share is None else {"protected_share": args.protected_share},
    )
    prep = prepare(base)
    policies = _split(args.policy)
    precisions = _split(args.precision)
    from sim.cache import POLICY_NAMES

    for pol in policies:
        if pol not in POLICY_NAMES:
            raise InputError(None, f"unknown cache policy {pol!r}; known: {', '.join(sorted(POLICY_NAMES))}")
    for prec in precisions:
        parsed = parse_precision(prec)  # fail fast on a typo
        if parsed.is_static and prep.calib_trace is None:
            raise InputError(None, f"precision {prec!r} needs a calibration window (--calib-fraction > 0)")
        if parsed.is_dynamic and "belady" in policies:
            raise InputError(None, "belady needs the whole future access sequence, which dynamic precision "
                                   "changes online (skips); use native or static precision with belady")
    budgets = _budget_values(prep, args)
    configs = [replace(base, policy=pol, precision=prec, capacity_bytes=cap)
               for cap, _ in budgets for pol in policies for prec in precisions]
    print(f"{Path(args.trace).name}: {prep.trace.n_steps} steps, {prep.model.name}, gpu {prep.hw.name}; "
          f"budget {budgets[0][1] if len(budgets) == 1 else f'{len(budgets)} values'}", file=sys.stderr)
    records = []
    show = not args.quiet and len(configs) > 1 and sys.stderr.isatty()
    if show:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("simulating", total=len(configs))
            for cfg in configs:
                records.append(run_prepared(prep, cfg))
                bar.advance(task)
    else:
        for i, cfg in enumerate(configs):
            records.append(run_prepared(prep, cfg))
            if not args.quiet and len(configs) > 1:
                print(f"  [{i + 1}/{len(configs)}] {cfg.policy} {cfg.precision}", file=sys.stderr)
    print(_fmt_table(records))
    if args.per_layer:
        print(_fmt_per_layer(records))
    _write_outputs(records, args.json, args.csv)
    return records


if __name__ == "__main__":
    main()
