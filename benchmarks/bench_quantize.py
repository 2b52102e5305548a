"""Quantization speed of jaxmoe.quants per format, with and without quant_weights (ggml's imatrix path).

Seeded N(0, 1) weights in rows of 4096 and one seeded lognormal importance vector per row length; best
of `--repeats` timings in this process's CPU time (numpy's element-wise work is single-threaded, and
on a shared machine wall time also counts other processes), reported as weights per second.

Examples:
    python benchmarks/bench_quantize.py
    python benchmarks/bench_quantize.py --n-weights 1048576 --repeats 1 --formats q4_k
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dequant import best_time_s  # noqa: E402
from jaxmoe.quants import QUANT_TYPES
from sim.io import InputError, exit_on_input_error

ROW = 4096



def run(n_weights: int, repeats: int, formats: list[str], seed: int = 0) -> list[dict]:
    """One row per format: weights/s of `quantize(x)` and of `quantize(x, quant_weights)`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_weights // ROW, ROW)).astype(np.float32)
    qw = np.exp(rng.normal(0, 1.5, ROW)).astype(np.float32)
    rows = []
    for name in formats:
        cls = QUANT_TYPES[name]
        plain_s = best_time_s(lambda cls=cls: cls.quantize(x), repeats)
        weighted_s = best_time_s(lambda cls=cls: cls.quantize(x, qw), repeats)
        rows.append({"format": name, "n_weights": int(x.size), "plain_weights_per_s": x.size / plain_s,
                     "weighted_weights_per_s": x.size / weighted_s})
    return rows


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    """CLI entry point: prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-weights", type=int, default=1 << 22,
                        help=f"weights per format (multiple of {ROW})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(QUANT_TYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_weights <= 0 or args.n_weights % ROW:
        raise InputError(None, f"--n-weights {args.n_weights} is not a positive multiple of {ROW}")
    if args.repeats < 1:
        raise InputError(None, f"--repeats {args.repeats} must be at least 1")
    unknown = [f for f in args.formats if f not in QUANT_TYPES]
    if unknown:
        raise InputError(None, f"unknown format(s) {unknown}; known: {', '.join(QUANT_TYPES)}")
    print("| format | quantize (M weights/s) | quantize with quant_weights (M weights/s) |")
    print("|---|---|---|")
    for r in run(args.n_weights, args.repeats, args.formats, args.seed):
        plain, weighted = r["plain_weights_per_s"] / 1e6, r["weighted_weights_per_s"] / 1e6
        print(f"| {r['format']} | {plain:.2f} | {weighted:.2f} |")


if __name__ == "__main__":
    main()
