"""Benchmark the fused quantized expert-FFN kernels on a GPU against bf16 and XLA dequantize-then-dot.

The command line of `jaxmoe.kernel_timing` (whose docstring gives the method): tunes every
(format, M) cell over the candidate configurations, times the winners for 8 experts and for one,
and writes bench_kernels.json / bench_kernels.csv. `python -m jaxmoe.calibrate` runs the same
measurement and turns it into the simulator's hardware profile.

Examples (GPU only):
  python benchmarks/bench_kernels.py --out-dir /tmp/bench            # full run (a few minutes)
  python benchmarks/bench_kernels.py --formats q2_k --tokens 1 --quick --out-dir /tmp/bench
  python benchmarks/bench_kernels.py --probe                         # Pallas Triton + dp2a compile check
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from jaxmoe.kernel_timing import (
    FORMATS,
    TOKENS,
    parse_list,
    print_table,
    run_bench,
    write_outputs,
)
from sim.io import exit_on_input_error


def probe() -> None:
    """Print JAX's devices, compile a trivial Pallas Triton kernel and check dp2a against its emulation."""
    import warnings

    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    from jaxmoe.kernels import int_dot

    print("jax", jax.__version__, jax.devices(), flush=True)

    def kern(q_ref, lo_ref, hi_ref, o_ref):
        o_ref[...] = int_dot._dp2a_pair(q_ref[...], lo_ref[...], hi_ref[...], use_asm=True)

    rng = np.random.default_rng(0)
    q, lo, hi = (jnp.asarray(rng.integers(0, 2**32, size=(64, 8), dtype=np.uint32)) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        f = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((64, 8), jnp.int32),
                           compiler_params=plt.CompilerParams(num_warps=1))
        got = np.asarray(jax.jit(f)(q, lo, hi))
    want = np.asarray(int_dot._dp2a_pair(q, lo, hi, use_asm=False))
    print("probe: pallas triton + dp2a", "OK" if np.array_equal(got, want) else "MISMATCH", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_kernels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="results", help="folder for bench_kernels.json / .csv (default: results)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of q2_k,q3_k,q4_k")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts M")
    p.add_argument("--quick", action="store_true", help="fewer configurations and repetitions")
    p.add_argument("--deadline-s", type=float, default=600.0, help="stop tuning after this many seconds")
    p.add_argument("--probe", action="store_true", help="only check that a Pallas Triton kernel with dp2a compiles")
    p.add_argument("--wait-pid", type=int, default=None,
                   help="before timing, wait for this process (e.g. GPU tests compiling alongside) to exit")
    return p.parse_args(argv)


@exit_on_input_error
def main(argv=None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    if args.probe:
        probe()
        return 0
    formats = parse_list(args.formats, FORMATS)
    tokens = parse_list(args.tokens, kind=int)
    command = "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = run_bench(formats, tokens, quick=args.quick, deadline_s=args.deadline_s, out_dir=Path(args.out_dir),
                    wait_pid=args.wait_pid, command=command)
    jpath, cpath = write_outputs(res, Path(args.out_dir))
    print_table(res)
    print(f"wrote {jpath} and {cpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
