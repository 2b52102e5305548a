"""Dequantization speed of jaxmoe.quants per format, against gguf-py's `gguf.quants.dequantize` in the same run.

Both run single-threaded numpy on the same bytes (quantized from seeded N(0, 1) weights); the best of
`--repeats` timings is reported as weights per second. Times are this process's CPU time
(`time.process_time`: numpy's element-wise work is single-threaded, and on a shared machine wall time
also counts other processes). Also prints our quantizer's speed.

Examples:
    python benchmarks/bench_dequant.py
    python benchmarks/bench_dequant.py --n-weights 8388608 --repeats 5 --formats q4_k q2_k
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.quants import QUANT_TYPES
from sim.io import InputError, exit_on_input_error, write_text_atomic


def best_time_s(fn, repeats: int) -> float:
    """Smallest CPU time of `repeats` calls of `fn`."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def run(n_weights: int, repeats: int, formats: list[str], seed: int = 0) -> list[dict]:
    """Time dequantization (ours and gguf's) and our quantization; one row per format."""
    import gguf
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_weights // 4096, 4096)).astype(np.float32)
    rows = []
    for name in formats:
        cls = QUANT_TYPES[name]
        t0 = time.process_time()
        q = cls.quantize(x)
        quant_s = time.process_time() - t0
        qtype = gguf.GGMLQuantizationType[name.upper()]
        ours_s = best_time_s(lambda cls=cls, q=q: cls.dequantize(q, x.shape), repeats)
        gguf_s = best_time_s(lambda q=q, qtype=qtype: gguf_dequantize(q, qtype), repeats)
        rows.append({
            "format": name,
            "n_weights": int(x.size),
            "dequant_weights_per_s": x.size / ours_s,
            "gguf_dequant_weights_per_s": x.size / gguf_s,
            "speedup_vs_gguf": gguf_s / ours_s,
            "quant_weights_per_s": x.size / quant_s,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of `run`'s rows."""
    lines = ["| format | dequant (M weights/s) | gguf dequant (M weights/s) | ratio ours/gguf | quantize (M weights/s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['dequant_weights_per_s'] / 1e6:.0f} | "
                     f"{r['gguf_dequant_weights_per_s'] / 1e6:.0f} | {r['speedup_vs_gguf']:.2f} | "
                     f"{r['quant_weights_per_s'] / 1e6:.2f} |")
    return "\n".join(lines)


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-weights", type=int, default=1 << 22, help="weights per format (multiple of 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement; the best is kept")
    parser.add_argument("--formats", nargs="+", default=list(QUANT_TYPES), help="formats to time")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.n_weights <= 0 or args.n_weights % 4096:
        raise InputError(None, f"--n-weights must be a positive multiple of 4096, got {args.n_weights}")
    if args.repeats < 1:
        raise InputError(None, f"--repeats must be ≥ 1, got {args.repeats}")
    unknown = [f for f in args.formats if f not in QUANT_TYPES]
    if unknown:
        raise InputError(None, f"unknown format(s) {unknown}; known: {', '.join(QUANT_TYPES)}")
    rows = run(args.n_weights, args.repeats, args.formats)
    print(format_table(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
