"""Benchmark the fused quantized expert-FFN kernels on a GPU against bf16 and XLA dequantize-then-dot.

Method. Every timed call is a jitted function launched from the host; device time is read with
CUPTI (the activity API that `jax.experimental.mosaic.gpu.profiler.measure` uses), so each number is
the sum of the kernel durations of one call, without host dispatch gaps. Calls rotate over many
experts (ids 0..127 of a 128-expert bank, or 16+ pre-selected weight sets for the baselines) so the
weights come from HBM, not from the 50 MB L2. The HBM ceiling is measured in the same run: a device
copy of 2 GiB (bytes read + written over time) and a 2 GiB reduction (bytes read). Achieved
bandwidth = quantized weight bytes of the selected experts / call time. Without CUPTI the fallback
is host wall-clock around synchronised calls (an upper bound; the JSON says which).

For each format (q2_k, q3_k, q4_k) and M ∈ {1, 2, 4, 8, 16, 64}: single expert (G = 1) and grouped
layer (G = 8 experts in one call). A few block configurations are tried at M = 1, 16, 64 and the
fastest launch-A and launch-B settings are kept (each launch is timed on its own through its
kernel name). Baselines: bf16 jnp dots of the same shapes, and the XLA path (dequantize the
selected experts to bf16 with jnp, then the same dots).

Examples:
  python -m jaxmoe.bench_kernels --out-dir results/            # full run on a GPU (a few minutes)
  python -m jaxmoe.bench_kernels --formats q2_k --tokens 1 --quick
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sim.io import InputError, atomic_path, exit_on_input_error

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


def probe() -> None:
    """Print JAX's devices, compile a trivial Pallas Triton kernel and check dp4a against its emulation."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from jaxmoe.kernels import expert_ffn as ef

    print("jax", jax.__version__, jax.devices(), flush=True)

    def kern(a_ref, b_ref, o_ref):
        o_ref[...] = ef._dp4a(a_ref[...], b_ref[...], use_asm=True)

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(0, 2**32, size=(64, 8), dtype=np.uint32))
    b = jnp.asarray(rng.integers(0, 2**32, size=(64, 8), dtype=np.uint32))
    from jax.experimental.pallas import triton as plt
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        f = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((64, 8), jnp.int32),
                           compiler_params=plt.CompilerParams(num_warps=1))
        got = np.asarray(jax.jit(f)(a, b))
    want = np.asarray(ef._dp4a(a, b, use_asm=False))
    print("probe: pallas triton + dp4a", "OK" if np.array_equal(got, want) else "MISMATCH", flush=True)


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


def tuning_candidates(m: int, g: int, quick: bool):
    """Block configurations tried for (tokens, experts); each launch keeps its own best within a variant."""
    from jaxmoe.kernels.expert_ffn import BlockConfig

    def mk(bu, wu, bd, wd, bm=8, variant="vec", su=1, sd=1):
        return BlockConfig(block_n_up=bu, num_warps_up=wu, num_stages_up=su, block_n_down=bd, num_warps_down=wd,
                           num_stages_down=sd, block_m=bm, variant=variant)

    if m <= 4:
        c = [mk(16, 4, 32, 2), mk(32, 8, 64, 4), mk(16, 2, 16, 1)] if g > 1 else [mk(16, 4, 32, 2)]
    elif m <= 16:
        c = [mk(16, 4, 32, 2, bm=4), mk(16, 4, 32, 2, bm=8), mk(32, 2, 64, 4, bm=8, variant="loop", su=2, sd=2)]
    else:
        c = [mk(16, 4, 32, 2, bm=4), mk(16, 4, 32, 4, bm=8), mk(16, 1, 32, 1, bm=16, variant="loop")]
    return c[:2] if quick else c


def merge_best(results: list[tuple]) -> "object":
    """From (config, up_s, down_s) tuples: the best launch A, with the best launch B of the same variant."""
    best_up = min(results, key=lambda r: r[1])[0]
    best_down = min((r for r in results if r[0].variant == best_up.variant), key=lambda r: r[2])[0]
    return dataclasses.replace(best_up, block_n_down=best_down.block_n_down, num_warps_down=best_down.num_warps_down,
                               num_stages_down=best_down.num_stages_down)


class Bench:
    """Holds banks, pre-selected baseline weight sets and the timer; measures cells."""

    def __init__(self, formats, reps: int, seed: int = 0):
        import jax
        import jax.numpy as jnp

        from jaxmoe.kernels import expert_ffn as ef

        self.ef, self.jax, self.jnp = ef, jax, jnp
        self.timer = Timer()
        self.reps = reps
        self.formats = formats
        self.banks = {f: ef.random_bank(f, N_EXPERTS, HIDDEN, FFN, seed=seed + i) for i, f in enumerate(formats)}
        self.rng = np.random.default_rng(seed)
        self._sets = {}
        self._fns = {}

    def plane_bytes_per_expert(self, fmt: str) -> int:
        """Bytes one expert's planes occupy (what the kernel reads)."""
        leaves = self.jax.tree_util.tree_leaves(self.banks[fmt])
        return int(sum(a.nbytes for a in leaves) // N_EXPERTS)

    def id_sets(self, g: int) -> list:
        """Rotating expert-id sets covering the bank (16 groups of 8, or 32 single experts)."""
        jnp = self.jnp
        if g == 1:
            return [jnp.array([e], jnp.int32) for e in range(0, N_EXPERTS, 4)]
        perm = self.rng.permutation(N_EXPERTS)
        return [jnp.asarray(np.sort(perm[i:i + g]), jnp.int32) for i in range(0, N_EXPERTS - g + 1, g)]

    def x(self, m: int):
        """Fresh random bf16 activations [m, H]."""
        return self.jnp.asarray(self.rng.standard_normal((m, HIDDEN)), self.jnp.bfloat16)

    def pallas_fn(self, fmt: str, cfg):
        key = ("pallas", fmt, cfg)
        if key not in self._fns:
            ef = self.ef
            self._fns[key] = self.jax.jit(
                lambda x, bank, ids: ef.expert_ffn(x, bank, ids, fmt=fmt, implementation="pallas", block_config=cfg))
        return self._fns[key]

    def time_pallas(self, fmt: str, m: int, g: int, cfg) -> tuple[dict, list]:
        """Per-call device time of the fused kernels on rotating ids."""
        fn = self.pallas_fn(fmt, cfg)
        x = self.x(m)
        sets = [(x, self.banks[fmt], ids) for ids in self.id_sets(g)]
        calls = self.timer.time_calls(fn, sets, self.reps)
        return summarize(calls), calls

    def baseline_sets(self, kind: str, fmt: str, g: int) -> list:
        """Pre-selected weights (no gather inside the timed call): bf16 matrices or `fmt` planes."""
        key = (kind, fmt, g)
        if key not in self._sets:
            jnp = self.jnp
            n_sets = 16 if g > 1 else 32
            if kind == "bf16":
                sets = []
                for i in range(n_sets):
                    b = self.ef.random_bank("bf16", g, HIDDEN, FFN, seed=1000 + i)
                    sets.append((b["gate"], b["up"], b["down"]))
            else:
                sets = []
                for ids in self.id_sets(g)[:n_sets]:
                    sel = self.jax.tree_util.tree_map(lambda a: jnp.take(a, ids, axis=0), self.banks[fmt])
                    sets.append((sel["gate"], sel["up"], sel["down"]))
            self._sets[key] = self.jax.block_until_ready(sets)
        return self._sets[key]

    def time_baseline(self, kind: str, fmt: str, m: int, g: int) -> dict:
        """bf16 dots, or XLA dequantize-to-bf16 then dots, on pre-selected weights."""
        jax, jnp, ef = self.jax, self.jnp, self.ef
        key = ("base", kind, fmt)
        if key not in self._fns:
            def ffn(x, wg, wu, wd):
                if kind == "xla":
                    wg, wu, wd = (ef.dequantize_jnp(w, fmt, jnp.bfloat16) for w in (wg, wu, wd))
                xb = x.astype(jnp.bfloat16)
                gg = jnp.einsum("mk,gnk->gmn", xb, wg, preferred_element_type=jnp.float32)
                uu = jnp.einsum("mk,gnk->gmn", xb, wu, preferred_element_type=jnp.float32)
                h = (jax.nn.silu(gg) * uu).astype(jnp.bfloat16)
                return jnp.einsum("gmk,gnk->gmn", h, wd, preferred_element_type=jnp.float32)
            self._fns[key] = jax.jit(ffn)
        x = self.x(m)
        sets = [(x, *w) for w in self.baseline_sets(kind, fmt, g)]
        return summarize(self.timer.time_calls(self._fns[key], sets, self.reps))

    def check(self, fmt: str, m: int, g: int, cfg) -> float:
        """Relative error of the kernel against the float32 reference on fresh inputs."""
        x = self.x(m)
        ids = self.id_sets(g)[int(self.rng.integers(0, 8))]
        got = np.asarray(self.pallas_fn(fmt, cfg)(x, self.banks[fmt], ids), np.float64)
        ref = np.asarray(self.ef.ffn_reference(x, self.banks[fmt], ids, fmt), np.float64)
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def run_bench(formats=FORMATS, tokens=TOKENS, quick: bool = False, deadline_s: float = 600.0,
              reps: int | None = None) -> dict:
    """Tune and time every (format, M, G) cell plus the baselines → a results dict (JSON-ready)."""
    import jax

    t_start = time.time()
    over = lambda: time.time() - t_start > deadline_s
    late = lambda: time.time() - t_start > deadline_s + 120  # past this, cells skip the extra checks
    bench = Bench(formats, reps=reps or (3 if quick else 6))
    ef = bench.ef
    log(f"devices {jax.devices()}; timer {bench.timer.method}")
    hbm = hbm_bandwidth(bench.timer)
    log(f"HBM copy {hbm['copy_gbps']:.0f} GB/s, read {hbm['read_gbps']:.0f} GB/s")
    tuning, cells = [], []
    best_cfg = {}
    for fmt in formats:
        for g in (TOP_K, 1):
            anchors = [m for m in (1, 16, 64) if m in tokens] or [tokens[0]]
            if g == 1:
                anchors = anchors[:1]
            for m in anchors:
                results = []
                for cfg in tuning_candidates(m, g, quick):
                    if over() and results:
                        break
                    try:
                        summ, calls = bench.time_pallas(fmt, m, g, cfg)
                    except Exception as exc:  # noqa: BLE001 - a config that fails to compile is recorded, not fatal
                        log(f"{fmt} M={m} G={g} {cfg}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                        tuning.append({"fmt": fmt, "m": m, "g": g, "config": dataclasses.asdict(cfg),
                                       "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                        continue
                    up, down = kernel_time(calls, "ffn_up"), kernel_time(calls, "ffn_down")
                    results.append((cfg, up, down))
                    tuning.append({"fmt": fmt, "m": m, "g": g, "config": dataclasses.asdict(cfg), "up_s": up,
                                   "down_s": down, **{k: v for k, v in summ.items() if k != "kernels"}})
                    log(f"tune {fmt} M={m} G={g} up {up * 1e6:.1f} us down {down * 1e6:.1f} us total "
                        f"{summ['total_s'] * 1e6:.1f} us  {cfg}")
                if results:
                    best_cfg[(fmt, g, m)] = merge_best(results)
    for fmt in formats:
        nbytes_expert = bench.plane_bytes_per_expert(fmt)
        for g in (TOP_K, 1):
            for m in tokens:
                anchors = sorted((a for (f, gg, a) in best_cfg if f == fmt and gg == g), key=lambda a: abs(a - m))
                cfg = best_cfg[(fmt, g, anchors[0])] if anchors else ef.BlockConfig()
                row = {"fmt": fmt, "m": m, "g": g, "config": dataclasses.asdict(cfg),
                       "weight_bytes": nbytes_expert * g, "gguf_bytes": GGUF_EXPERT_BYTES[fmt] * g}
                try:
                    summ, calls = bench.time_pallas(fmt, m, g, cfg)
                    row.update({k: v for k, v in summ.items()})
                    row["up_s"], row["down_s"] = kernel_time(calls, "ffn_up"), kernel_time(calls, "ffn_down")
                    if m in (1, 16) and not late():
                        row["rel_err"] = bench.check(fmt, m, g, cfg)
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    log(f"{fmt} M={m} G={g}: FAILED {row['error'][:300]}")
                if (g > 1 or m == 1) and not (late() and m not in (1, 16)):
                    try:
                        row["xla"] = {k: v for k, v in bench.time_baseline("xla", fmt, m, g).items() if k != "kernels"}
                    except Exception as exc:  # noqa: BLE001
                        row["xla"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                if "total_s" in row:
                    row["gbps"] = row["weight_bytes"] / row["total_s"] / 1e9
                    row["pallas_gbps"] = row["weight_bytes"] / row["pallas_s"] / 1e9
                    row["pct_hbm_copy"] = 100 * row["gbps"] / hbm["copy_gbps"]
                    row["pct_hbm_read"] = 100 * row["gbps"] / hbm["read_gbps"]
                cells.append(row)
                log(f"cell {fmt} M={m} G={g}: total {row.get('total_s', float('nan')) * 1e6:.1f} us "
                    f"(pallas {row.get('pallas_s', float('nan')) * 1e6:.1f}) {row.get('gbps', 0):.0f} GB/s "
                    f"err {row.get('rel_err', float('nan')):.1e}")
    bf16 = []
    for g in (TOP_K, 1):
        for m in tokens:
            try:
                s = bench.time_baseline("bf16", "bf16", m, g)
                bf16.append({"m": m, "g": g, **{k: v for k, v in s.items() if k != "kernels"},
                             "weight_bytes": GGUF_EXPERT_BYTES["bf16"] * g})
                log(f"bf16 M={m} G={g}: {s['total_s'] * 1e6:.1f} us")
            except Exception as exc:  # noqa: BLE001
                bf16.append({"m": m, "g": g, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    # act_bits = 8 (llama.cpp's q8_1 activations) at the headline cell, for the record
    extra = []
    for fmt in formats:
        key = (fmt, TOP_K, 1)
        if key in best_cfg and not over():
            cfg8 = dataclasses.replace(best_cfg[key], act_bits=8)
            try:
                summ, _ = bench.time_pallas(fmt, 1, TOP_K, cfg8)
                extra.append({"fmt": fmt, "m": 1, "g": TOP_K, "act_bits": 8, "total_s": summ["total_s"],
                              "pallas_s": summ["pallas_s"], "rel_err": bench.check(fmt, 1, TOP_K, cfg8)})
            except Exception as exc:  # noqa: BLE001
                extra.append({"fmt": fmt, "act_bits": 8, "error": str(exc)[:300]})
    bf16_by = {(r["m"], r["g"]): r.get("total_s") for r in bf16}
    for row in cells:
        b = bf16_by.get((row["m"], row["g"]))
        if b and "total_s" in row:
            row["speedup_vs_bf16"] = b / row["total_s"]
        if "total_s" in row and "total_s" in row.get("xla", {}):
            row["speedup_vs_xla"] = row["xla"]["total_s"] / row["total_s"]
    return {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
                     "timer": bench.timer.method, "reps": bench.reps, "quick": quick,
                     "elapsed_s": time.time() - t_start, "deadline_hit": over()},
            "hbm": hbm, "tuning": tuning, "cells": cells, "bf16": bf16, "act_bits8": extra,
            "summary": targets(cells, bf16, hbm)}


def targets(cells: list[dict], bf16: list[dict], hbm: dict) -> dict:
    """The headline checks: Q2_K grouped layer at M = 1 vs HBM, vs bf16, vs Q4_K."""
    pick = lambda f: next((c for c in cells if c["fmt"] == f and c["m"] == 1 and c["g"] == TOP_K and "total_s" in c), None)
    q2, q4 = pick("q2_k"), pick("q4_k")
    out = {}
    if q2:
        out["q2_k_layer_m1_total_s"] = q2["total_s"]
        out["q2_k_layer_m1_pallas_s"] = q2["pallas_s"]
        out["q2_k_layer_m1_pct_hbm_copy"] = q2["pct_hbm_copy"]
        out["q2_k_layer_m1_pct_hbm_copy_pallas_only"] = 100 * q2["pallas_gbps"] / hbm["copy_gbps"]
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
    with atomic_path(cpath) as tmp:
        with open(tmp, "w", newline="") as fh:
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
    print(f"{'fmt':5} {'M':>3} {'G':>2} {'total_us':>9} {'pallas_us':>9} {'GB/s':>6} {'%copy':>6} {'x_bf16':>6} "
          f"{'x_xla':>6} {'err':>8}")
    for r in res["cells"]:
        if "total_s" not in r:
            print(f"{r['fmt']:5} {r['m']:3} {r['g']:2} ERROR {r.get('error', '')[:80]}")
            continue
        print(f"{r['fmt']:5} {r['m']:3} {r['g']:2} {r['total_s'] * 1e6:9.1f} {r['pallas_s'] * 1e6:9.1f} "
              f"{r['gbps']:6.0f} {r['pct_hbm_copy']:6.1f} {r.get('speedup_vs_bf16', float('nan')):6.2f} "
              f"{r.get('speedup_vs_xla', float('nan')):6.2f} {r.get('rel_err', float('nan')):8.1e}")
    print("targets:", json.dumps(res["summary"]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmoe.bench_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="results", help="folder for bench_kernels.json / .csv (default: results)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of q2_k,q3_k,q4_k")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts M")
    p.add_argument("--quick", action="store_true", help="fewer configurations and repetitions")
    p.add_argument("--deadline-s", type=float, default=600.0, help="stop tuning after this many seconds")
    p.add_argument("--probe", action="store_true", help="only check that a Pallas Triton kernel with dp4a compiles")
    return p.parse_args(argv)


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


@exit_on_input_error
def main(argv=None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    if args.probe:
        probe()
        return 0
    formats = parse_list(args.formats, FORMATS)
    tokens = parse_list(args.tokens, kind=int)
    res = run_bench(formats, tokens, quick=args.quick, deadline_s=args.deadline_s)
    res["meta"]["command"] = "python -m jaxmoe.bench_kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    jpath, cpath = write_outputs(res, Path(args.out_dir))
    print_table(res)
    print(f"wrote {jpath} and {cpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
