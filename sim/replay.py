"""`python -m sim.replay TRACE`: replay a routing trace through precision and cache policies.

For every (cache policy, precision policy, expert budget) the replay reports hit rates, bytes moved
over PCIe per decoded token, predicted decode tokens/s and stall fraction on a named GPU, and the
share of gate mass served at low precision or skipped (the quality side joins on these).
This module is the command line only; the simulator is the library `sim.simulate`
(`run(ReplayConfig(...))` returns the `ReplayRecord` this command prints).

With no --policy, --precision or budget option the command answers the project's question on
the trace: SLRU at the derived budget, native precision against the low-bit policies that
docs/decision.md weighs (COMPARE_PRECISIONS), with Δ tok/s and Δ bytes per token against native.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

from sim.budget import COUNT, parse_budget_list, parse_budget_sweep, sweep_bytes
from sim.cache import POLICY_NAMES
from sim.engine import UNPRICED
from sim.io import InputError, atomic_paths, check_output_path, exit_on_input_error
from sim.precision import parse_precision
from sim.profiles import GIB
from sim.simulate import (
    PHASES,
    SCALAR_FIELDS,
    Prepared,
    ReplayConfig,
    ReplayRecord,
    incompatible,
    prepare,
    run_prepared,
)

DEFAULT_POLICY = "slru"
COMPARE_PRECISIONS = ("native", "static:mass:30%:q3_k", "static:mass:30%:q2_k", "dynamic:0.6:0.9")
DECISION_POINTER = ("Which of these to run, and what each costs in quality (KLD, same top-1): "
                    "docs/decision.md")

EPILOG = """examples:
  python -m sim.replay traces/qwen3.npz
  python -m sim.replay traces/qwen3.npz --policy slru,lru,s3fifo,belady --experts 30%,50%
  python -m sim.replay qwen30b.npz --gpu rtx4070-12gb --budget 9GiB \\
      --precision native,static:mass:30%:q2_k,dynamic:0.6:0.9,static:mass:20%:q3_k+dynamic:0.6:0.9
  python -m sim.replay qwen30b.npz --sweep-budget 4GiB:10GiB:1GiB --json sweep.json
  python -m sim.replay traces/synth-qwen3.npz --prefetch trace --partition per-layer --csv out.csv

budgets: --budget takes bytes (9GiB, 9.5GB, 4000MiB); --experts takes a count of native-size
experts or a percentage of all experts (3300, 40%); --sweep-budget START:STOP:STEP in either unit.
Without any, the budget is derived from the GPU (VRAM − dense − head − KV cache − reserve), or is
40 % of the experts when the whole model would fit. `vram` names the derived budget explicitly.
With no --policy/--precision/budget option: slru, native vs static:mass:30%:{q3_k,q2_k} and
dynamic:0.6:0.9 at the default budget, with Δ columns against native.
Cache policy belady with a dynamic precision policy is skipped with a note (belady needs the future).
precision: native | static:SIGNAL:X%:FMT (SIGNAL freq|weight|mass|random, FMT q2_k|q3_k|q2_k_gu|q3_k_gu) |
dynamic:T1:T2[:FMT][:reload|serve] | combinations joined by + | +pools:split:S for a separate low-precision pool.
FMT q2_k / q3_k: the whole expert at Q2_K / Q3_K; q2_k_gu / q3_k_gu (tensor-aware): only ffn_gate and ffn_up
at Q2_K / Q3_K, ffn_down kept at the layer's native format (Q4_K, or Q6_K in Q4_K_M's Q6_K-down layers).
"""


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _parse_budgets(args):
    """The budget options, parsed before any work (sim.budget); at most one of them may be given."""
    given = [o for o in ("budget", "experts", "sweep_budget") if getattr(args, o)]
    if len(given) > 1:
        raise InputError(None, "give one of --budget, --experts, --sweep-budget")
    if args.sweep_budget:
        return ("sweep", parse_budget_sweep(args.sweep_budget))
    if args.budget:
        return ("list", parse_budget_list(args.budget, option="--budget"))
    if args.experts:
        return ("list", parse_budget_list(args.experts, bare=COUNT, option="--experts"))
    return ("default", None)


def _budget_values(prep: Prepared, parsed, args) -> list[tuple[int, str]]:
    """(bytes, how it was chosen) per budget."""
    how, budgets = parsed
    if how == "sweep":
        return [(v, "sweep") for v in sweep_bytes(budgets, prep.model, prep.hw, prep.context, args.sweep_budget)]
    if how == "list":
        out = []
        for b in budgets:
            cap = b.resolve(prep.model, prep.hw, prep.context)
            if cap is None:
                raise InputError(None, f"budget {b.text}: every expert fits in {prep.hw.name}'s VRAM; give a size or a share")
            out.append((cap, b.text))
        return out
    return [prep.default_capacity()]


def _native_partner(records: list[ReplayRecord]) -> dict[int, ReplayRecord]:
    """For each non-native record, the native record of the same policy and budget (where run)."""
    native = {(r.policy, r.capacity_bytes): r for r in records if r.precision == "native"}
    return {i: native[(r.policy, r.capacity_bytes)] for i, r in enumerate(records)
            if r.precision != "native" and (r.policy, r.capacity_bytes) in native}


def _fmt_table(records: list[ReplayRecord]) -> str:
    """A readable fixed-width table of result records (with Δ vs native where a native row exists)."""
    partner = _native_partner(records)
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
    if partner:
        cols += [("Δ tok/s", "delta_tokens_per_s", "{:+.1%}"), ("Δ MB/token", "delta_bytes_per_token", "{:+.1%}")]
    rows = []
    for i, r in enumerate(records):
        row = []
        for _, key, fmt in cols:
            if key.startswith("delta_"):
                base = partner.get(i)
                field_ = key[len("delta_"):]
                a = None if base is None else getattr(r, field_)
                b = None if base is None else getattr(base, field_)
                v = (a / b - 1) if a is not None and b else None
            else:
                v = getattr(r, key)
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


def _fmt_per_layer(records: list[ReplayRecord]) -> str:
    """Hit rate per layer, one row per configuration (layers as columns, 12 per block)."""
    n = len(records[0].per_layer_hit_rate)
    lines = []
    for lo in range(0, n, 12):
        cols = range(lo, min(n, lo + 12))
        lines.append("layer hit rate".ljust(34) + "".join(f"{c:>6d}" for c in cols))
        for r in records:
            label = f"{r.policy} {r.precision}"[:32].ljust(34)
            vals = (r.per_layer_hit_rate[c] for c in cols)
            lines.append(label + "".join("     –" if v is None else f"{v:6.2f}" for v in vals))
    return "\n".join(lines)


def _write_outputs(records: list[ReplayRecord], json_path: str | None, csv_path: str | None) -> None:
    """Write the JSON and CSV outputs, all or none."""
    dicts = [r.as_dict() for r in records]
    texts = {}
    if json_path:
        texts[json_path] = json.dumps(dicts, indent=1) + "\n"
    if csv_path:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(SCALAR_FIELDS), extrasaction="ignore")
        w.writeheader()
        w.writerows(dicts)
        texts[csv_path] = buf.getvalue()
    if not texts:
        return
    with atomic_paths(list(texts)) as tmps:
        for tmp, text in zip(tmps, texts.values()):
            tmp.write_text(text)


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
    ap.add_argument("--policy", help=f"cache policies, comma-separated (default: {DEFAULT_POLICY})")
    ap.add_argument("--precision", help="precision policies, comma-separated (default: native, or the comparison "
                                        "above when no --policy or budget option is given either)")
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
def main(argv: list[str] | None = None) -> list[ReplayRecord]:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    compare = not (args.policy or args.precision or args.budget or args.experts or args.sweep_budget)
    policies = _split(args.policy or DEFAULT_POLICY)
    precisions = list(COMPARE_PRECISIONS) if compare else _split(args.precision or "native")
    for pol in policies:
        if pol not in POLICY_NAMES:
            raise InputError(None, f"unknown cache policy {pol!r}; known: {', '.join(POLICY_NAMES)}")
    parsed_prec = {prec: parse_precision(prec) for prec in precisions}  # fail fast on a typo
    budgets_given = _parse_budgets(args)
    outputs = {}
    for option, path in (("--json", args.json), ("--csv", args.csv)):
        if path:
            checked = check_output_path(path, option).resolve()
            if checked in outputs.values():
                raise InputError(path, f"{option}: the same file as another output")
            outputs[option] = checked
    if Path(args.trace).resolve() in outputs.values():
        raise InputError(args.trace, "an output path is the trace itself")
    base = ReplayConfig(
        trace=args.trace, gpu=args.gpu, model=args.model, partition=args.partition, prefetch=args.prefetch,
        phase=args.phase, calib_fraction=args.calib_fraction, ubatch=args.ubatch, context=args.context,
        seed=args.seed, timeline=not args.no_timeline,
        policy_params={} if args.protected_share is None else {"protected_share": args.protected_share},
    )
    prep = prepare(base)
    for prec, parsed in parsed_prec.items():
        if parsed.is_static and prep.calib_trace is None:
            raise InputError(None, f"precision {prec!r} needs a calibration window (--calib-fraction > 0)")
    budgets = _budget_values(prep, budgets_given, args)
    smallest = int(prep.sizes[prep.sizes != UNPRICED].min())  # a slot the model cannot size is no expert
    for cap, how in budgets:
        if cap < smallest:
            raise InputError(None, f"budget {how} = {cap} bytes holds no expert (the smallest is {smallest} bytes): "
                                   "every access would miss")
    pairs, notes = [], []
    for pol in policies:
        for prec in precisions:
            why = incompatible(pol, parsed_prec[prec])
            if why:
                notes.append(f"note: skipped {pol} with {prec}: {why}")
            else:
                pairs.append((pol, prec))
    if not pairs:
        raise InputError(None, notes[0][len("note: "):])
    for note in notes:
        print(note, file=sys.stderr)
    configs = [replace(base, policy=pol, precision=parsed_prec[prec], capacity_bytes=cap)
               for cap, _ in budgets for pol, prec in pairs]
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
                print(f"  [{i + 1}/{len(configs)}] {cfg.policy} {cfg.precision.name}", file=sys.stderr)
    print(_fmt_table(records))
    if args.per_layer:
        print(_fmt_per_layer(records))
    _write_outputs(records, args.json, args.csv)
    if compare:
        print(DECISION_POINTER)
    return records


if __name__ == "__main__":
    main()
