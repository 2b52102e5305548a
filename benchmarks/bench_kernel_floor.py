"""Structural floor of the v4 expert-FFN launches on a GPU: the same grids reading the same bytes, no arithmetic.

The Q2_K grouped layer (8 experts of Qwen3-30B-A3B shape, M = 1) runs as three launches (activation
quantization, A: gate/up, B: down). This benchmark asks how much of their time is the launch
structure itself, by timing in the same run (CUPTI device time, calls rotating over a 128-expert
bank so the weights come from HBM):

- `empty`: launch A's grid (8 × 48 programs of 4 warps) writing one word each: the cost of a launch;
- `read_a` / `read_b`: launch A's / B's grid loading exactly the planes the kernel loads (qs, sc, d,
  dmin of 16 rows) and folding them into one word per program: the floor of a read-only launch;
- `read_ab`: both reads in one launch (programs j < 48 read gate/up rows, the others down rows);
- `read_a_persistent_pN_sS`: launch A's reads by N programs that each loop over (expert, tile) items,
  compiled with S software-pipelining stages (Triton's `num_stages`); `read_a_prefetch_pN` loads item
  k + 1 before folding item k (a register double buffer carried by the loop);
- `v4_a` / `v4_b` / `v4_layer`: the kernels themselves (`expert_ffn` default configuration);
- `xla_sum_layer_bytes` / `xla_sum_a_bytes`: XLA's reduction over a contiguous buffer of the layer's
  (launch A's) byte count, 16 rotating buffers: how fast one launch can read that many bytes at all;
- `bf16_layer`: bf16 weights of the 8 experts (16 pre-selected sets) and jnp dots, `jaxmoe.kernel_timing`'
  baseline; the HBM copy bandwidth of a 2 GiB device copy is printed in the header.

It prints each row as µs, as achieved GB/s of the plane bytes and as a ratio to `v4_layer`, and writes
the JSON with `--out`.

Examples (GPU only):
    python benchmarks/bench_kernel_floor.py --out results/run10_floor/floor.json
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.io import InputError, exit_on_input_error, write_text_atomic

HIDDEN, FFN, N_EXPERTS, TOP_K, ROWS = 2048, 768, 128, 8, 16


def _fold(*tiles):
    """One uint32 from tiles of any dtype (wrapping sum of their bit patterns): keeps every load alive, ≈ no arithmetic."""
    import jax
    import jax.numpy as jnp

    acc = None
    for t in tiles:
        a = (jax.lax.bitcast_convert_type(t, jnp.uint16) if t.dtype == jnp.float16 else t).astype(jnp.uint32)
        while a.ndim > 1:
            a = jnp.sum(a, axis=-1)
        v = jnp.sum(a, axis=0)
        acc = v if acc is None else acc + v
    return acc


def _load_rows(planes: dict, e, rows) -> list:
    """The tiles of one row tile of a matrix's Q2_K planes, loaded as the kernel does (power-of-2 block runs)."""
    from jax.experimental import pallas as pl

    from jaxmoe.kernels.dequant_fma import _chunks

    words = 16  # qs words per Q2_K super-block
    tiles = []
    for b0, nbt in _chunks(planes["d"].shape[-1]):
        bs = pl.ds(b0, nbt)
        tiles += [planes["qs"][e, rows, pl.ds(b0 * words, nbt * words)], planes["sc"][e, rows, bs, :],
                  planes["d"][e, rows, bs], planes["dmin"][e, rows, bs]]
    return tiles


def _read_rows(planes: dict, e, rows):
    """Load one row tile of a matrix's Q2_K planes as the kernel does → one uint32."""
    return _fold(*_load_rows(planes, e, rows))


def floor_calls(interpret: bool = False):
    """The read-only and empty launches → dict name → f(bank, ids)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    from jaxmoe.kernels.repack import PLANES

    names = PLANES["q2_k"]
    k = len(names)
    n_a, n_b = FFN // ROWS, HIDDEN // ROWS
    n_items = TOP_K * n_a  # launch A's (expert, row tile) items

    def views(p):  # the bytes the kernel reads: qs flat per row, sc as one 16-byte run per super-block
        return [p["qs"].reshape(*p["qs"].shape[:2], -1), p["sc"].reshape(*p["sc"].shape[:3], -1), p["d"], p["dmin"]]

    def call(kernel, grid, n_mats, name, stages=1):
        """f(bank, ids): `kernel` over `grid` on the first n_mats of gate/up/down."""
        def f(bank, ids):
            args = [ids]
            for mat in ("gate", "up", "down")[:n_mats]:
                args += views(bank[mat])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return pl.pallas_call(kernel, grid=grid, out_shape=jax.ShapeDtypeStruct(grid, jnp.uint32),
                                      compiler_params=plt.CompilerParams(num_warps=4, num_stages=stages),
                                      interpret=interpret, name=name)(*args)
        return f

    def mats(refs, n_mats):
        return [dict(zip(names, refs[i * k:(i + 1) * k])) for i in range(n_mats)]

    def empty(ids_ref, o_ref):
        g, j = pl.program_id(0), pl.program_id(1)
        o_ref[g, j] = (ids_ref[g] + j).astype(jnp.uint32)

    def a_body(ids_ref, refs, g, j):
        gate, up = mats(refs, 2)
        rows = pl.ds(j * ROWS, ROWS)
        refs[-1][g, j] = _read_rows(gate, ids_ref[g], rows) ^ _read_rows(up, ids_ref[g], rows)

    def b_body(ids_ref, refs, g, j, j0):
        down = mats(refs, 3)[2]
        refs[-1][g, j] = _read_rows(down, ids_ref[g], pl.ds((j - j0) * ROWS, ROWS))

    def read_a(ids_ref, *refs):
        a_body(ids_ref, refs, pl.program_id(0), pl.program_id(1))

    def read_b(ids_ref, *refs):
        b_body(ids_ref, refs, pl.program_id(0), pl.program_id(1), 0)

    def read_ab(ids_ref, *refs):
        g, j = pl.program_id(0), pl.program_id(1)
        pl.when(j < n_a)(lambda: a_body(ids_ref, refs, g, j))
        pl.when(j >= n_a)(lambda: b_body(ids_ref, refs, g, j, n_a))

    def item(ids_ref, pid, k_trip, n_prog):
        """(expert, rows) of launch A's item pid + k_trip·n_prog (the last trip re-reads a valid item)."""
        i = jnp.minimum(pid + k_trip * n_prog, n_items - 1)
        return ids_ref[i // n_a], pl.ds((i % n_a) * ROWS, ROWS)

    def persistent(n_prog: int):
        """Read-only launch A with n_prog programs, each looping over (expert, tile) items pid + k·n_prog."""
        def kernel(ids_ref, *refs):
            pid = pl.program_id(0)
            gate, up = mats(refs, 2)

            def body(k_trip, acc):
                e, rows = item(ids_ref, pid, k_trip, n_prog)
                return acc ^ _read_rows(gate, e, rows) ^ _read_rows(up, e, rows)

            refs[-1][pid] = jax.lax.fori_loop(0, -(-n_items // n_prog), body, jnp.uint32(0))
        return kernel

    def prefetching(n_prog: int):
        """As `persistent`, with item k+1's tiles loaded before item k's are folded (registers carried by the loop)."""
        def kernel(ids_ref, *refs):
            pid = pl.program_id(0)
            gate, up = mats(refs, 2)

            def load(k_trip):
                e, rows = item(ids_ref, pid, k_trip, n_prog)
                return _load_rows(gate, e, rows), _load_rows(up, e, rows)

            def body(k_trip, carry):
                acc, (g_tiles, u_tiles) = carry
                nxt = load(k_trip + 1)
                return acc ^ _fold(*g_tiles) ^ _fold(*u_tiles), nxt

            refs[-1][pid] = jax.lax.fori_loop(0, -(-n_items // n_prog), body, (jnp.uint32(0), load(0)))[0]
        return kernel

    out = {}
    for n in (132, 264, 396):
        for st in (1, 3):
            out[f"read_a_persistent_p{n}_s{st}"] = call(persistent(n), (n,), 2, f"floor_persistent_{n}_{st}", st)
    for n in (132, 264, 396):
        out[f"read_a_prefetch_p{n}"] = call(prefetching(n), (n,), 2, f"floor_prefetch_{n}")
    return {**out,
            "empty": call(lambda ids_ref, *refs: empty(ids_ref, refs[-1]), (TOP_K, n_a), 0, "floor_empty"),
            "read_a": call(read_a, (TOP_K, n_a), 3, "floor_read_a"),
            "read_b": call(read_b, (TOP_K, n_b), 3, "floor_read_b"),
            "read_ab": call(read_ab, (TOP_K, n_a + n_b), 3, "floor_read_ab")}


def run(reps: int) -> dict:
    """Time every row in one process → results dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmoe import kernel_timing as bk
    from jaxmoe.kernels import expert_ffn as ef

    timer = bk.Timer()
    bank = ef.random_bank("q2_k", N_EXPERTS, HIDDEN, FFN, seed=0)
    rng = np.random.default_rng(0)
    perm = rng.permutation(N_EXPERTS)
    id_sets = [jnp.asarray(np.sort(perm[i:i + TOP_K]), jnp.int32) for i in range(0, N_EXPERTS, TOP_K)]
    x = jnp.asarray(rng.standard_normal((1, HIDDEN)), jnp.bfloat16)
    per_expert = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(bank)) // N_EXPERTS
    a_bytes = per_expert * TOP_K * 2 // 3  # gate + up: two of the three equal-sized matrices
    b_bytes = per_expert * TOP_K // 3
    rows = {}

    def timed(name, fn, args_list, nbytes, tag=None):
        calls = timer.time_calls(jax.jit(fn), args_list, reps)
        s = bk.kernel_time(calls, tag) if tag else bk.summarize(calls)["total_s"]
        rows[name] = {"us": s * 1e6, "bytes": nbytes, "gbps": nbytes / s / 1e9 if nbytes else None}
        bk.log(f"{name}: {s * 1e6:.2f} us")

    for name, f in floor_calls().items():
        nbytes = {"empty": 0, "read_b": b_bytes, "read_ab": a_bytes + b_bytes}.get(name, a_bytes)
        timed(name, f, [(bank, ids) for ids in id_sets], nbytes)
    for name, nbytes in (("xla_sum_layer_bytes", a_bytes + b_bytes), ("xla_sum_a_bytes", a_bytes)):
        # XLA's own reduction over a contiguous buffer of the same size: the best one launch reads it at
        bufs = [jax.random.bits(jax.random.PRNGKey(i), (nbytes // 4,), jnp.uint32) for i in range(16)]
        timed(name, lambda b: jnp.sum(b, dtype=jnp.uint32), [(b,) for b in bufs], nbytes)
        del bufs
    layer = lambda x, bank, ids: ef.expert_ffn(x, bank, ids, fmt="q2_k", implementation="pallas")
    args = [(x, bank, ids) for ids in id_sets]
    timed("v4_layer", layer, args, a_bytes + b_bytes)
    timed("v4_a", layer, args, a_bytes, tag="ffn_up")
    timed("v4_b", layer, args, b_bytes, tag="ffn_down")
    timed("v4_quantize_x", layer, args, 0, tag="ffn_quantize")
    hbm = bk.hbm_bandwidth(timer)
    def bf16(x, wg, wu, wd):  # bench_kernels' baseline: bf16 weights of the 8 experts, jnp dots, no gather
        xb = x.astype(jnp.bfloat16)
        g = jnp.einsum("mk,gnk->gmn", xb, wg, preferred_element_type=jnp.float32)
        u = jnp.einsum("mk,gnk->gmn", xb, wu, preferred_element_type=jnp.float32)
        h = (jax.nn.silu(g) * u).astype(jnp.bfloat16)
        return jnp.einsum("gmk,gnk->gmn", h, wd, preferred_element_type=jnp.float32)

    sets = [ef.random_bank("bf16", TOP_K, HIDDEN, FFN, seed=1 + i) for i in range(16)]
    timed("bf16_layer", bf16, [(x, b["gate"], b["up"], b["down"]) for b in sets], 3 * TOP_K * HIDDEN * FFN * 2)
    ref = rows["v4_layer"]["us"]
    for r in rows.values():
        r["ratio_to_v4_layer"] = r["us"] / ref
    return {"timer": timer.method, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "hbm": hbm, "rows": rows}


@exit_on_input_error
def main(argv=None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--reps", type=int, default=6, help="rounds over the 16 expert groups (default 6)")
    args = p.parse_args(argv)
    if args.reps < 1:
        raise InputError(None, f"--reps must be ≥ 1, not {args.reps}")
    res = run(args.reps)
    print(f"HBM copy {res['hbm']['copy_gbps']:.0f} GB/s ({res['timer']}, {res['device']})")
    print(f"{'row':14} {'us':>8} {'GB/s':>7} {'x v4_layer':>10}")
    for name, r in res["rows"].items():
        gbps = f"{r['gbps']:7.0f}" if r["gbps"] else f"{'':7}"
        print(f"{name:14} {r['us']:8.2f} {gbps} {r['ratio_to_v4_layer']:10.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
