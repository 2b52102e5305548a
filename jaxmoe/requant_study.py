"""Re-quantization study: does Q4_K → Q3_K / Q2_K compound error compared with quantizing floats directly?

The engine in question holds experts as Q4_K (from the GGUF file) and would re-quantize cold ones to
Q3_K or Q2_K, since the original float weights are gone. This measures, on synthetic weights, the
error of each path against the original float32 weights:

    float → Q4_K, float → Q3_K, float → Q2_K                 (direct)
    float → Q4_K → float → Q3_K, float → Q4_K → float → Q2_K (compounded)

on Gaussian weights and on heavy-tailed Student-t (df = 3) weights, both with standard deviation
0.02 (a typical LLM linear-layer scale; the errors scale with it). Quantization is ggml's reference
algorithm (jaxmoe.quants). Reported per path: RMSE against the float weights, relative RMSE (RMSE /
RMS of the weights), the ratio to the direct path of the same target format, and the RMSE against
the path's own input (for Q4_K → Q2_K: the Q4_K weights, i.e. what the engine's native copy loses).

Examples:
    python -m jaxmoe.requant_study
    python -m jaxmoe.requant_study --n-weights 4194304 --seed 1 --json requant.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jaxmoe.quants import QK_K, get_quant
from sim.formats import FORMATS
from sim.io import InputError, exit_on_input_error, write_text_atomic

WEIGHT_STD = 0.02  # standard deviation of the synthetic weights
ROW_WEIGHTS = 4096  # weights per row of the synthetic tensor (whole super-blocks)
PATHS = (  # (label, chain of formats applied in order)
    ("float → Q4_K", ("q4_k",)),
    ("float → Q3_K", ("q3_k",)),
    ("float → Q2_K", ("q2_k",)),
    ("Q4_K → Q3_K", ("q4_k", "q3_k")),
    ("Q4_K → Q2_K", ("q4_k", "q2_k")),
)


def synthetic_weights(distribution: str, n_weights: int, rng: np.random.Generator) -> np.ndarray:
    """float32 weights of std WEIGHT_STD: 'gaussian' or 'student_t3' (Student-t, df=3, rescaled)."""
    if distribution == "gaussian":
        x = rng.standard_normal(n_weights)
    elif distribution == "student_t3":
        x = rng.standard_t(3, n_weights) / np.sqrt(3.0)  # Var of t(3) is 3
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    return (x * WEIGHT_STD).astype(np.float32)


def apply_chain(x: np.ndarray, chain: tuple[str, ...]) -> np.ndarray:
    """Quantize and dequantize `x` through each format of `chain` in turn; float32 result."""
    y = x
    for fmt in chain:
        cls = get_quant(fmt)
        y = cls.dequantize(cls.quantize(y), y.shape)
    return y


def run(n_weights: int, seed: int) -> list[dict]:
    """All distributions × paths → rows with rmse, rel_rmse, ratio_vs_direct and bits per weight."""
    rng = np.random.default_rng(seed)
    rows = []
    for distribution in ("gaussian", "student_t3"):
        x = synthetic_weights(distribution, n_weights, rng)
        x = x.reshape(-1, ROW_WEIGHTS) if n_weights % ROW_WEIGHTS == 0 else x.reshape(-1, QK_K)
        x64 = x.astype(np.float64)
        rms = float(np.sqrt(np.mean(x64 ** 2)))
        cache: dict[tuple[str, ...], np.ndarray] = {}
        direct_rmse: dict[str, float] = {}
        for label, chain in PATHS:
            prefix = chain[:-1]
            y = apply_chain(cache[prefix] if prefix else x, chain[-1:])
            cache[chain] = y
            rmse = float(np.sqrt(np.mean((y.astype(np.float64) - x64) ** 2)))
            src = cache[prefix].astype(np.float64) if prefix else x64
            rmse_vs_source = float(np.sqrt(np.mean((y.astype(np.float64) - src) ** 2)))
            if len(chain) == 1:
                direct_rmse[chain[-1]] = rmse
            rows.append({
                "distribution": distribution,
                "path": label,
                "formats": list(chain),
                "bits_per_weight": FORMATS[chain[-1]].bits_per_weight,
                "n_weights": int(x.size),
                "rmse": rmse,
                "rel_rmse": rmse / rms,
                "ratio_vs_direct": rmse / direct_rmse[chain[-1]],
                "rmse_vs_source": rmse_vs_source,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of `run`'s rows."""
    lines = ["| weights | path | bits/weight | RMSE | relative RMSE | RMSE / direct | RMSE vs its input |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['distribution']} | {r['path']} | {r['bits_per_weight']:.4g} | {r['rmse']:.3e} | "
                     f"{r['rel_rmse']:.4f} | {r['ratio_vs_direct']:.3f} | {r['rmse_vs_source']:.3e} |")
    return "\n".join(lines)


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    """CLI entry point: print the table; optionally write the rows as JSON."""
    parser = argparse.ArgumentParser(prog="python -m jaxmoe.requant_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-weights", type=int, default=1 << 20,
                        help="weights per distribution, a multiple of 256 (default 1048576)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.n_weights <= 0 or args.n_weights % QK_K:
        raise InputError(None, f"--n-weights must be a positive multiple of {QK_K}, got {args.n_weights}")
    if args.seed < 0:
        raise InputError(None, f"--seed must be ≥ 0, got {args.seed}")
    rows = run(args.n_weights, args.seed)
    print(format_table(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
