"""Benchmark the full replay (engine + simpy timeline) on a 10 k-token Qwen3-30B-A3B decode trace.

    python benchmarks/bench_replay.py [--tokens 10000] [--reference-tokens 500]

Prints accesses/s of: the hit-rate-only replay (compiled cache path, no timeline), the full replay
with the simpy timeline, and the pure-Python reference engine on a slice, with ratios measured in
this run. The issue's target: full timeline ≥ 250 k accesses/s (3.8 M accesses in under 15 s).
"""
from __future__ import annotations

import argparse
import time

from sim.simulate import ReplayConfig, prepare, run_prepared
from sim.synth import preset, synthesize


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000, help="decode tokens (10 sequences)")
    ap.add_argument("--reference-tokens", type=int, default=500, help="decode tokens for the Python reference")
    args = ap.parse_args()

    trace, synth_s = timed(lambda: synthesize(preset("qwen3-30b-a3b", n_seqs=10, prefill_tokens=0, decode_tokens=args.tokens // 10, seed=0)))
    print(f"synthesized {trace.n_steps} tokens, {trace.n_accesses:,} accesses in {synth_s:.1f} s")
    base = ReplayConfig(trace=trace, policy="slru", calib_fraction=0.0, gpu="rtx3060-12gb")
    prep, prep_s = timed(lambda: prepare(base))
    run_prepared(prep, ReplayConfig(trace=trace, policy="slru", calib_fraction=0.0, timeline=False,
                                    capacity_bytes=10**9))  # compile the numba kernels once
    n = prep.groups.expert.size
    rows = []
    for label, cfg in [
        ("hit-rate only (compiled cache)", ReplayConfig(trace=trace, policy="slru", calib_fraction=0.0, timeline=False)),
        ("full: cache + simpy timeline", ReplayConfig(trace=trace, policy="slru", calib_fraction=0.0)),
    ]:
        rec, secs = timed(lambda cfg=cfg: run_prepared(prep, cfg))
        rows.append((label, n, secs + prep_s, rec.hit_rate))
    small = synthesize(preset("qwen3-30b-a3b", n_seqs=1, prefill_tokens=0, decode_tokens=args.reference_tokens, seed=0))
    sprep = prepare(ReplayConfig(trace=small, calib_fraction=0.0))
    ref_cfg = ReplayConfig(trace=small, policy="slru", calib_fraction=0.0, timeline=False, fast=False)
    rec, secs = timed(lambda: run_prepared(sprep, ref_cfg))
    rows.append(("Python reference engine (no timeline)", sprep.groups.expert.size, secs, rec.hit_rate))
    print(f"{'path':40s} {'accesses':>10s} {'seconds':>8s} {'accesses/s':>12s} {'hit rate':>8s}")
    for label, acc, secs, hr in rows:
        print(f"{label:40s} {acc:>10,d} {secs:>8.2f} {acc / secs:>12,.0f} {hr:>8.3f}")
    full_rate = rows[1][1] / rows[1][2]
    ref_rate = rows[2][1] / rows[2][2]
    print(f"(prepare: {prep_s:.2f} s, counted in both rows above)")
    print(f"full timeline: {full_rate / 1e3:.0f} k accesses/s (target ≥ 250 k); "
          f"compiled hit-rate path is {rows[0][1] / rows[0][2] / ref_rate:.0f}× the Python reference engine")


if __name__ == "__main__":
    main()
