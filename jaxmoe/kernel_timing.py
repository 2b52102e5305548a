"""Time the fused quantized expert-FFN kernels on a GPU against bf16 and XLA dequantize-then-dot.

The measurement that `jaxmoe.calibrate` turns into the hardware profile's expert-compute table;
`benchmarks/bench_kernels.py` is its stand-alone command line.

Method. Every timed call is a jitted function launched from the host; device time is read with
CUPTI (the activity API that `jax.experimental.mosaic.gpu.profiler.measure` uses), so each number is
the sum of the kernel durations of one call, without host dispatch gaps. Calls rotate over many
experts (ids 0..127 of a 128-expert bank, or 16+ pre-selected weight sets for the baselines) so the
weights come from HBM, not from the 50 MB L2. The HBM ceiling is measured in the same run: a device
copy of 2 GiB (bytes read + written over time) and a 2 GiB reduction (bytes read). Achieved
bandwidth = quantized weight bytes of the selected experts / call time. Without CUPTI the fallback
is host wall-clock around synchronised calls (an upper bound; the JSON says which).

For each format (q2_k, q3_k, q4_k) and M ∈ {1, 2, 4, 8, 16, 64}: grouped layer (G = 8 experts in one
call) for every configuration of `candidates(M)`, the fastest becoming the cell, then a single expert
(G = 1) with that configuration; each launch is also timed on its own through its kernel name.
Everything is compiled ahead of time in a thread pool before timing starts (XLA autotunes the
baselines on the GPU while compiling). Baselines: bf16 jnp dots of the same shapes, and the XLA path
(gather the experts' planes from the same bank, dequantize to bf16 with jnp, the same dots). Each
cell's relative error against the float32 reference is measured at M = 1, 16, 64.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sim.io import InputError, atomic_path

HIDDEN, FFN, N_EXPERTS, TOP_K = 2048, 768, 128, 8
TOKENS = (1, 2, 4, 8, 16, 64)
FORMATS = ("q2_k", "q3_k", "q4_k")
GGUF_EXPERT_BYTES = {"q2_k": 1_548_288, "q3_k": 2_027_520, "q4_k": 2_654_208, "bf16": 9_437_184}


def log(msg: str) -> None:
    """Progress line on stderr (the device run's log)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Timer:
    """Per-call device time via CUPTI kernel activity; host wall-clock fallback."""

    def __init__(self):
        self.method = "host-sync"
        self._ext = None
        try:
            from jax._src.lib import mosaic_gpu as mgpu_lib

            ext = mgpu_lib._mosaic_gpu_ext
            ext._cupti_init()
            ext._cupti_get_timings(True)
            self._ext = ext
            self.method = "cupti"
        except Exception as exc:  # noqa: BLE001 - any failure means: no CUPTI here
            log(f"CUPTI unavailable ({type(exc).__name__}: {exc}); timing with host clock")

    def time_calls(self, fn, arg_sets: list[tuple], reps: int) -> list[list[tuple[str, float]]]:
        """Run fn(*args) for each arg set, `reps` rounds; → per call a list of (kernel name, seconds)."""
        import jax

        jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm
        jax.block_until_ready(fn(*arg_sets[-1]))
        calls = []
        if self._ext is not None:
            self._ext._cupti_init()
            outs = []
            try:
                for _ in range(reps):
                    for args in arg_sets:
                        outs.append(fn(*args))
                jax.block_until_ready(outs)
            finally:
                timings = self._ext._cupti_get_timings(True)
            n = reps * len(arg_sets)
            if timings and len(timings) % n == 0:
                k = len(timings) // n
                for i in range(n):
                    calls.append([(str(name), float(ms) * 1e-3) for name, ms in timings[i * k:(i + 1) * k]])
                return calls
            if timings:  # uneven kernel count per call: attribute the averages by name
                log(f"CUPTI returned {len(timings)} kernels for {n} calls; using per-name averages")
                by_name = {}
                for name, ms in timings:
                    by_name[str(name)] = by_name.get(str(name), 0.0) + float(ms) * 1e-3 / n
                return [list(by_name.items()) for _ in range(n)]
            log("CUPTI returned no kernels; falling back to host clock")
        for _ in range(reps):
            for args in arg_sets:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                calls.append([("host", time.perf_counter() - t0)])
        return calls


def summarize(calls: list[list[tuple[str, float]]]) -> dict:
    """Median per-call total, Pallas-kernel and other-kernel seconds, and each kernel's median."""
    total = [sum(t for _, t in c) for c in calls]
    pallas = [sum(t for n, t in c if "ffn_" in n) for c in calls]
    names = [n for n, _ in calls[0]]
    per_kernel = {}
    for idx, name in enumerate(names):
        vals = [c[idx][1] for c in calls if len(c) > idx]
        per_kernel[f"{idx}:{name[:60]}"] = statistics.median(vals)
    return {"total_s": statistics.median(total), "pallas_s": statistics.median(pallas),
            "other_s": statistics.median(t - p for t, p in zip(total, pallas)),
            "p10_s": float(np.percentile(total, 10)), "p90_s": float(np.percentile(total, 90)),
            "n_calls": len(calls), "kernels": per_kernel}


def kernel_time(calls, tag: str) -> float:
    """Median per-call seconds of the kernels whose name contains `tag`."""
    return statistics.median(sum(t for n, t in c if tag in n) for c in calls)


def hbm_bandwidth(timer: Timer, nbytes: int = 2 * 2**30) -> dict:
    """Device-memory ceilings: copy (read + write bytes / s) and reduction (read bytes / s)."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    xs = [jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.float32) for i in range(2)]
    copy = jax.jit(lambda a: a * 1.0001 + 1.0)
    red = jax.jit(lambda a: jnp.sum(a))
    c = summarize(timer.time_calls(copy, [(a,) for a in xs], reps=5))
    r = summarize(timer.time_calls(red, [(a,) for a in xs], reps=5))
    return {"nbytes": nbytes, "copy_s": c["total_s"], "copy_gbps": 2 * nbytes / c["total_s"] / 1e9,
            "read_s": r["total_s"], "read_gbps": nbytes / r["total_s"] / 1e9, "method": timer.method}


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


def candidates(m: int):
    """Block configurations tried for the grouped layer (G = 8) at m tokens; the fastest total wins.

    Runs 3–9 tried more (results/run3_v3 … run9_v4d: v3 split gate/up with SiLU in launch B, 1-warp
    and 2-warp tilings, mma at M < 16; v4 with 32-row or 8-warp launch A programs, 2-warp or 4-row
    launch B programs, gathered activations; all slower). M ≤ 8: v4 integer kernels, and v3's best for reference;
    M ≥ 16: v3 tensor-core kernels, with and without split gate/up.
    """
    from jaxmoe.kernels.expert_ffn import BlockConfig

    def fma(bu, wu, bd, wd, bm=1, split=False):
        return BlockConfig(block_n_up=bu, num_warps_up=wu, block_n_down=bd, num_warps_down=wd, block_m=bm,
                           variant="fma", split_up=split)

    def mma(bu, bd, bm, split=False):
        return BlockConfig(block_n_up=bu, num_warps_up=4, block_n_down=bd, num_warps_down=4, block_m=bm,
                           variant="mma", split_up=split)

    def int_(bu, wu, bd, wd, bm=1):
        return BlockConfig(block_n_up=bu, num_warps_up=wu, block_n_down=bd, num_warps_down=wd, block_m=bm, variant="int")

    if m == 1:
        return [int_(16, 4, 16, 1), int_(16, 4, 8, 1), int_(16, 8, 16, 1), fma(16, 4, 8, 1)]
    if m < 16:
        return [int_(16, 4, 8, 1, bm=2), int_(16, 4, 16, 1, bm=2), fma(16, 4, 8, 1, bm=2)]
    if m < 64:
        return [mma(32, 64, 16), mma(32, 64, 16, split=True)]
    return [mma(16, 32, 64), mma(32, 32, 64, split=True)]


class Bench:
    """Banks, rotating expert-id sets, ahead-of-time compiled calls and the timer."""

    def __init__(self, formats, reps: int, seed: int = 0, n_threads: int = 14):
        import jax
        import jax.numpy as jnp

        from jaxmoe.kernels import expert_ffn as ef

        self.ef, self.jax, self.jnp = ef, jax, jnp
        self.timer = Timer()
        self.reps = reps
        self.formats = formats
        self.banks = {f: ef.random_bank(f, N_EXPERTS, HIDDEN, FFN, seed=seed + i) for i, f in enumerate(formats)}
        self.rng = np.random.default_rng(seed)
        self.pool = concurrent.futures.ThreadPoolExecutor(n_threads)
        self._ids = {}
        self._x = {}
        self._bf16 = {}

    def plane_bytes_per_expert(self, fmt: str) -> int:
        """Bytes one expert's planes occupy (what the kernel reads)."""
        leaves = self.jax.tree_util.tree_leaves(self.banks[fmt])
        return int(sum(a.nbytes for a in leaves) // N_EXPERTS)

    def id_sets(self, g: int) -> list:
        """Rotating expert-id sets covering the bank (16 groups of 8, or 32 single experts); fixed per g."""
        if g not in self._ids:
            jnp = self.jnp
            if g == 1:
                self._ids[g] = [jnp.array([e], jnp.int32) for e in range(0, N_EXPERTS, 4)]
            else:
                perm = self.rng.permutation(N_EXPERTS)
                self._ids[g] = [jnp.asarray(np.sort(perm[i:i + g]), jnp.int32) for i in range(0, N_EXPERTS - g + 1, g)]
        return self._ids[g]

    def x(self, m: int):
        """Random bf16 activations [m, H] (one fixed draw per m)."""
        if m not in self._x:
            self._x[m] = self.jnp.asarray(self.rng.standard_normal((m, HIDDEN)), self.jnp.bfloat16)
        return self._x[m]

    def bf16_sets(self, g: int) -> list:
        """16 (or 32 for g = 1) sets of bf16 weights of g experts, pre-selected (no gather in the timed call)."""
        if g not in self._bf16:
            sets = []
            for i in range(16 if g > 1 else 32):
                b = self.ef.random_bank("bf16", g, HIDDEN, FFN, seed=1000 + i)
                sets.append((b["gate"], b["up"], b["down"]))
            self._bf16[g] = self.jax.block_until_ready(sets)
        return self._bf16[g]

    def job(self, kind: str, fmt: str, m: int, g: int, cfg=None) -> tuple:
        """(function, argument sets) of one timed cell: kind pallas | xla | bf16 | ref."""
        jax, jnp, ef = self.jax, self.jnp, self.ef
        x = self.x(m)
        if kind == "bf16":
            def ffn(x, wg, wu, wd):
                xb = x.astype(jnp.bfloat16)
                gg = jnp.einsum("mk,gnk->gmn", xb, wg, preferred_element_type=jnp.float32)
                uu = jnp.einsum("mk,gnk->gmn", xb, wu, preferred_element_type=jnp.float32)
                h = (jax.nn.silu(gg) * uu).astype(jnp.bfloat16)
                return jnp.einsum("gmk,gnk->gmn", h, wd, preferred_element_type=jnp.float32)
            return ffn, [(x, *w) for w in self.bf16_sets(g)]
        sets = [(x, self.banks[fmt], ids) for ids in self.id_sets(g)]
        if kind == "pallas":
            fn = lambda x, bank, ids: ef.expert_ffn(x, bank, ids, fmt=fmt, implementation="pallas", block_config=cfg)
        elif kind == "xla":  # XLA's own path: gather the experts' planes, dequantize to bf16, bf16 dots
            fn = lambda x, bank, ids: ef.expert_ffn(x, bank, ids, fmt=fmt, implementation="xla")
        elif kind == "ref":
            fn = lambda x, bank, ids: ef.ffn_reference(x, bank, ids, fmt)
        else:
            raise ValueError(kind)
        return fn, sets

    def compile(self, kind, fmt, m, g, cfg=None):
        """Submit an ahead-of-time compile → future of (compiled, argument sets, seconds)."""
        fn, sets = self.job(kind, fmt, m, g, cfg)

        def work():
            t0 = time.time()
            compiled = self.jax.jit(fn).lower(*sets[0]).compile()
            return compiled, sets, time.time() - t0

        return self.pool.submit(work)

    def time(self, compiled, sets) -> tuple[dict, list]:
        """Per-call device time of a compiled cell on its rotating argument sets."""
        calls = self.timer.time_calls(compiled, sets, self.reps)
        return summarize(calls), calls

    def rel_err(self, compiled, ref_compiled, sets) -> float:
        """Relative error of a compiled cell against the compiled float32 reference on one argument set."""
        args = sets[int(self.rng.integers(0, len(sets)))]
        got = np.asarray(compiled(*args), np.float64)
        ref = np.asarray(ref_compiled(*args), np.float64)
        if not np.all(np.isfinite(got)):
            return float("inf")
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _wait_for_pid(pid: int | None, limit_s: float) -> None:
    """Wait (at most limit_s) until process pid has exited, so that no other GPU work runs while timing."""
    if not pid:
        return
    import os

    t0 = time.time()
    while time.time() - t0 < limit_s:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.5)
    log(f"process {pid} still running after {limit_s:.0f} s; timing anyway")


def run_bench(formats=FORMATS, tokens=TOKENS, quick: bool = False, deadline_s: float = 600.0,
              reps: int | None = None, out_dir: Path | None = None, wait_pid: int | None = None,
              command: str = "") -> dict:
    """Compile (in parallel), tune and time every (format, M, G) cell plus the baselines → results dict.

    Wave 1 compiles every G = 8 candidate, the bf16 / XLA baselines and the float32 references;
    the fastest candidate per (format, M) becomes the cell; wave 2 compiles and times that
    configuration for a single expert (G = 1). With `out_dir` the JSON/CSV are rewritten after every
    timed cell, so a run stopped at its limit keeps what it measured.
    """
    import jax

    t_start = time.time()
    over = lambda: time.time() - t_start > deadline_s  # soft: no further tuning candidates
    hard = lambda: time.time() - t_start > deadline_s + 100  # hard: no further cells
    bench = Bench(formats, reps=reps or (3 if quick else 6))
    log(f"devices {jax.devices()}; timer {bench.timer.method}")
    res = {"meta": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "timer": bench.timer.method,
                    "reps": bench.reps, "quick": quick, "command": command},
           "hbm": None, "tuning": [], "cells": [], "bf16": [], "xla": [], "summary": {}}

    def save():
        res["meta"]["elapsed_s"] = time.time() - t_start
        res["meta"]["deadline_hit"] = over()
        if out_dir is not None:
            res["summary"] = targets(res["cells"], res["bf16"], res["hbm"]) if res["hbm"] else {}
            write_outputs(res, out_dir)

    order = sorted(tokens, key=lambda m: (m not in (1, 16, 64), tokens.index(m)))  # headline counts first
    futs = {}
    for m in order:
        for fmt in formats:
            for cfg in (candidates(m)[:1] if quick else candidates(m)):
                futs[("pallas", fmt, m, TOP_K, cfg)] = bench.compile("pallas", fmt, m, TOP_K, cfg)
        if m in (1, 16, 64) or m == order[0]:
            for fmt in formats:
                futs[("ref", fmt, m, TOP_K, None)] = bench.compile("ref", fmt, m, TOP_K)
        for g in (TOP_K, 1):
            futs[("bf16", "bf16", m, g, None)] = bench.compile("bf16", "bf16", m, g)
            for fmt in formats:
                futs[("xla", fmt, m, g, None)] = bench.compile("xla", fmt, m, g)
    log(f"wave 1: {len(futs)} compiles submitted")
    _wait_for_pid(wait_pid, limit_s=max(10.0, 0.7 * deadline_s))
    # Timing starts once wave 1 has compiled: XLA autotunes the baselines' dots on the GPU while it
    # compiles them, and those kernels would land in this process's CUPTI records.
    concurrent.futures.wait(list(futs.values()), timeout=max(1.0, 0.75 * deadline_s - (time.time() - t_start)))
    log(f"wave 1 compiled: {sum(f.done() for f in futs.values())}/{len(futs)} after {time.time() - t_start:.0f} s")
    hbm = hbm_bandwidth(bench.timer)
    res["hbm"] = hbm
    log(f"HBM copy {hbm['copy_gbps']:.0f} GB/s, read {hbm['read_gbps']:.0f} GB/s")
    save()

    def get(key):
        try:
            return futs[key].result(timeout=max(1.0, deadline_s + 100 - (time.time() - t_start))), None
        except Exception as exc:  # noqa: BLE001 - a cell that fails to compile is recorded, not fatal
            return None, f"{type(exc).__name__}: {str(exc)[:500]}"

    def baseline(kind, fmt, m, g):
        out, err = get((kind, fmt, m, g, None))
        row = {"fmt": fmt, "m": m, "g": g}
        if err:
            row["error"] = err
        else:
            summ, _ = bench.time(out[0], out[1])
            row.update({k: v for k, v in summ.items() if k != "kernels"}, compile_s=out[2])
        (res["bf16"] if kind == "bf16" else res["xla"]).append(row)
        log(f"{kind} {fmt} M={m} G={g}: {row.get('total_s', float('nan')) * 1e6:.1f} us {row.get('error', '')[:200]}")
        return row

    winners = {}
    for m in order:
        for fmt in formats:
            nbytes = bench.plane_bytes_per_expert(fmt)
            best = None
            for cfg in (candidates(m)[:1] if quick else candidates(m)):
                if (over() and best is not None) or hard():
                    break
                out, err = get(("pallas", fmt, m, TOP_K, cfg))
                entry = {"fmt": fmt, "m": m, "g": TOP_K, "config": dataclasses.asdict(cfg)}
                if err:
                    entry["error"] = err
                    log(f"tune {fmt} M={m} G={TOP_K}: FAILED {err[:300]}")
                else:
                    summ, calls = bench.time(out[0], out[1])
                    entry.update({k: v for k, v in summ.items() if k != "kernels"}, compile_s=out[2],
                                 up_s=kernel_time(calls, "ffn_up"), down_s=kernel_time(calls, "ffn_down"))
                    log(f"tune {fmt} M={m} G={TOP_K} up {entry['up_s'] * 1e6:.1f} us down {entry['down_s'] * 1e6:.1f} us "
                        f"total {summ['total_s'] * 1e6:.1f} us (compile {out[2]:.0f} s) {cfg}")
                    if best is None or summ["total_s"] < best[1]["total_s"]:
                        best = (cfg, entry, out)
                res["tuning"].append(entry)
            if best is None:
                continue
            cfg, entry, out = best
            winners[(fmt, m)] = cfg
            futs[("pallas", fmt, m, 1, cfg)] = bench.compile("pallas", fmt, m, 1, cfg)  # wave 2: single expert
            row = {"fmt": fmt, "m": m, "g": TOP_K, "config": dataclasses.asdict(cfg), "weight_bytes": nbytes * TOP_K,
                   "gguf_bytes": GGUF_EXPERT_BYTES[fmt] * TOP_K,
                   **{k: entry[k] for k in ("total_s", "pallas_s", "other_s", "p10_s", "p90_s", "n_calls", "up_s", "down_s")}}
            ref, _ = get(("ref", fmt, m, TOP_K, None)) if ("ref", fmt, m, TOP_K, None) in futs else (None, None)
            if ref is not None:
                row["rel_err"] = bench.rel_err(out[0], ref[0], out[1])
            row["gbps"] = row["weight_bytes"] / row["total_s"] / 1e9
            row["pallas_gbps"] = row["weight_bytes"] / row["pallas_s"] / 1e9 if row["pallas_s"] > 0 else None
            row["pct_hbm_copy"] = 100 * row["gbps"] / hbm["copy_gbps"]
            row["pct_hbm_read"] = 100 * row["gbps"] / hbm["read_gbps"]
            res["cells"].append(row)
            log(f"cell {fmt} M={m} G={TOP_K}: total {row['total_s'] * 1e6:.1f} us (pallas {row['pallas_s'] * 1e6:.1f}) "
                f"{row['gbps']:.0f} GB/s err {row.get('rel_err', float('nan')):.1e}")
            save()
        baseline("bf16", "bf16", m, TOP_K)
        for fmt in formats:
            baseline("xla", fmt, m, TOP_K)
        save()
    # wave 2 (compiles submitted as each winner was found): single expert, and the G = 1 baselines
    for m in order:
        for fmt in formats:
            if (fmt, m) not in winners or hard():
                continue
            cfg = winners[(fmt, m)]
            out, err = get(("pallas", fmt, m, 1, cfg))
            row = {"fmt": fmt, "m": m, "g": 1, "config": dataclasses.asdict(cfg),
                   "weight_bytes": bench.plane_bytes_per_expert(fmt), "gguf_bytes": GGUF_EXPERT_BYTES[fmt]}
            if err:
                row["error"] = err
            else:
                summ, calls = bench.time(out[0], out[1])
                row.update({k: v for k, v in summ.items() if k != "kernels"}, up_s=kernel_time(calls, "ffn_up"),
                           down_s=kernel_time(calls, "ffn_down"))
                row["gbps"] = row["weight_bytes"] / row["total_s"] / 1e9
                row["pct_hbm_copy"] = 100 * row["gbps"] / hbm["copy_gbps"]
                row["pct_hbm_read"] = 100 * row["gbps"] / hbm["read_gbps"]
            res["cells"].append(row)
            log(f"cell {fmt} M={m} G=1: total {row.get('total_s', float('nan')) * 1e6:.1f} us {row.get('error', '')[:200]}")
        if not hard():
            baseline("bf16", "bf16", m, 1)
            for fmt in formats:
                baseline("xla", fmt, m, 1)
        save()
    bf16_by = {(r["m"], r["g"]): r.get("total_s") for r in res["bf16"]}
    xla_by = {(r["fmt"], r["m"], r["g"]): r.get("total_s") for r in res["xla"]}
    for row in res["cells"]:
        b, x = bf16_by.get((row["m"], row["g"])), xla_by.get((row["fmt"], row["m"], row["g"]))
        if b and "total_s" in row:
            row["speedup_vs_bf16"] = b / row["total_s"]
        if x and "total_s" in row:
            row["xla_s"] = x
            row["speedup_vs_xla"] = x / row["total_s"]
    bench.pool.shutdown(wait=False, cancel_futures=True)
    save()
    res["summary"] = targets(res["cells"], res["bf16"], hbm)
    return res


def targets(cells: list[dict], bf16: list[dict], hbm: dict) -> dict:
    """The headline checks: Q2_K grouped layer at M = 1 vs HBM, vs bf16, vs Q4_K."""
    pick = lambda f: next((c for c in cells if c["fmt"] == f and c["m"] == 1 and c["g"] == TOP_K and "total_s" in c), None)
    if hbm is None:
        return {}
    q2, q4 = pick("q2_k"), pick("q4_k")
    out = {}
    if q2:
        out["q2_k_layer_m1_total_s"] = q2["total_s"]
        out["q2_k_layer_m1_pallas_s"] = q2["pallas_s"]
        out["q2_k_layer_m1_pct_hbm_copy"] = q2["pct_hbm_copy"]
        out["q2_k_layer_m1_pct_hbm_copy_pallas_only"] = 100 * (q2["pallas_gbps"] or 0) / hbm["copy_gbps"]
        out["q2_k_layer_m1_speedup_vs_bf16"] = q2.get("speedup_vs_bf16")
        out["target_60pct_hbm"] = q2["pct_hbm_copy"] >= 60
        out["target_4x_bf16"] = (q2.get("speedup_vs_bf16") or 0) >= 4
    if q2 and q4:
        out["q4_k_layer_m1_total_s"] = q4["total_s"]
        out["target_faster_than_q4_k"] = q2["total_s"] < q4["total_s"]
    return out


def write_outputs(res: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write bench_kernels.json and bench_kernels.csv (one row per cell) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / "bench_kernels.json", out_dir / "bench_kernels.csv"
    with atomic_path(jpath) as tmp:
        tmp.write_text(json.dumps(res, indent=1, default=str))
    cols = ["fmt", "m", "g", "total_s", "pallas_s", "up_s", "down_s", "other_s", "weight_bytes", "gbps",
            "pct_hbm_copy", "pct_hbm_read", "speedup_vs_bf16", "speedup_vs_xla", "xla_s", "rel_err", "config"]
    with atomic_path(cpath) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in res["cells"]:
            w.writerow({**row, "xla_s": row.get("xla", {}).get("total_s"),
                        "config": json.dumps(row.get("config"))})
    return jpath, cpath


def print_table(res: dict) -> None:
    """Short table of the cells (stdout)."""
    print(f"HBM copy {res['hbm']['copy_gbps']:.0f} GB/s, read {res['hbm']['read_gbps']:.0f} GB/s "
          f"(timer {res['meta']['timer']})")
    print(f"{'fmt':5} {'M':>3} {'G':>2} {'var':4} {'total_us':>9} {'up_us':>7} {'down_us':>7} {'GB/s':>6} {'%copy':>6} "
          f"{'x_bf16':>6} {'x_xla':>6} {'err':>8}")
    for r in res["cells"]:
        if "total_s" not in r:
            print(f"{r['fmt']:5} {r['m']:3} {r['g']:2} ERROR {r.get('error', '')[:80]}")
            continue
        print(f"{r['fmt']:5} {r['m']:3} {r['g']:2} {r['config']['variant']:4} {r['total_s'] * 1e6:9.1f} "
              f"{r.get('up_s', 0) * 1e6:7.1f} {r.get('down_s', 0) * 1e6:7.1f} {r['gbps']:6.0f} {r['pct_hbm_copy']:6.1f} "
              f"{r.get('speedup_vs_bf16', float('nan')):6.2f} {r.get('speedup_vs_xla', float('nan')):6.2f} "
              f"{r.get('rel_err', float('nan')):8.1e}")
    for r in res["bf16"]:
        print(f"bf16  {r['m']:3} {r['g']:2}      {r.get('total_s', float('nan')) * 1e6:9.1f}")
    print("targets:", json.dumps(res["summary"]))


def parse_list(text: str, allowed=None, kind=str) -> tuple:
    """Parse a comma-separated CLI list; InputError names a bad item."""
    try:
        items = tuple(kind(t.strip()) for t in text.split(",") if t.strip())
    except ValueError:
        raise InputError(None, f"cannot parse list {text!r}") from None
    if not items or (allowed and any(i not in allowed for i in items)):
        raise InputError(None, f"bad list {text!r}; allowed: {', '.join(map(str, allowed or ()))}")
    if kind is int and any(i < 1 for i in items):
        raise InputError(None, f"token counts must be ≥ 1: {text!r}")
    return items
