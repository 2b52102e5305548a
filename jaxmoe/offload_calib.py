"""Micro-calibration of the offload executor, the profiles built from it, and the validation table.

`calibrate(ex, copy_paths)` (GPU, called by `python -m jaxmoe.offload --calibrate`) times the executor's own
decode loop on synthetic plans, never on a trace replay: per copy path, a layer with no experts
(dense + router sync + host bookkeeping), a layer with 1 and with G resident experts of each kernel
path, a layer with 1 and with G missing experts of each path (copy cost = missing − resident), the
output head; for the raw path also the raw copy floor (cudaMemcpyAsync of contiguous pinned bytes,
CUDA events), copies in flight on several streams, and device times of the kernels and the dense
layer (R chained calls inside one jit, so no dispatch cost).

`python -m jaxmoe.offload_calib profiles CALIB.json` (CPU) turns those measurements into hardware
profiles in the simulator's schema: `<card>-offload-raw` and `<card>-offload-jax` (what this
executor pays, including JAX's dispatch: `timeline.overlap_resident` off, `split_launches` on, a
per-layer copy-job fixed cost, per kernel path on the jax path; see sim/timeline.py), and
`<card>-native` (the raw copy floor + device kernel and dense times: what a native CUDA engine would
pay without JAX's dispatch).

`python -m jaxmoe.offload_calib validate GRID.json` (CPU) runs the simulator with the matching
profile on every measured configuration and prints the predicted-vs-measured table (markdown).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from sim.io import InputError, exit_on_input_error, write_text_atomic

HIT, LOADED = 0, 1


# ---------------------------------------------------------------------------------------------
# Synthetic plans (never a trace replay)
# ---------------------------------------------------------------------------------------------


def synthetic_plan(ex, *, slot: int, path: str | None, n_hit: int, n_miss: int, tokens: int, pos0: int, seed: int = 0):
    """A plan over the layers whose kernel path for `slot` is `path` (all layers when None), each layer
    with n_hit resident and n_miss missing distinct random experts of that slot."""
    from jaxmoe.offload import Plan, path_of

    rng = np.random.default_rng(seed)
    L, E = ex.shape.n_layers, ex.shape.n_experts
    layers = [la for la in range(L) if path is None or path_of(ex.native_names[la], slot) == path]
    lay, pos, end, counts, experts, result = [], [], [], [], [], []
    for t in range(tokens):
        for i, la in enumerate(layers):
            ids = rng.choice(E, size=n_hit + n_miss, replace=False)
            lay.append(la)
            pos.append(pos0 + t)
            end.append(i == len(layers) - 1)
            counts.append(n_hit + n_miss)
            experts.extend(ids.tolist())
            result.extend([HIT] * n_hit + [LOADED] * n_miss)
    start = np.zeros(len(lay) + 1, np.int64)
    np.cumsum(counts, out=start[1:])
    n = len(experts)
    return Plan(layer=np.array(lay, np.int32), pos=np.array(pos, np.int32), token_end=np.array(end), start=start,
                expert=np.array(experts, np.int32), result=np.array(result, np.int8), slot=np.full(n, slot, np.int8),
                weight=np.full(n, 1.0 / max(1, n_hit + n_miss), np.float32), sizes=np.zeros((L, 3), np.int64),
                native_names=ex.native_names, n_experts=E, top_k=ex.top_k, tokens=tokens), len(layers)


def _head_s(ex, reps: int = 30) -> float:
    h = ex.embed_token(0)
    ex.head(h).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        ex.head(h).block_until_ready()
    return (time.perf_counter() - t) / reps


def _slot_paths(ex) -> list[tuple[int, str]]:
    out = []
    for p in ex.paths:
        slot = {"q2_k": 1, "q3_k": 2}.get(p, 0)
        out.append((slot, p))
    return out


class CalibrationRounds:
    """The calibration's synthetic plans, timed one run per round so that rounds can interleave with a grid's.

    A host-bound executor drifts by ±15 % over minutes (run 1 of docs/validation.md: identical plans
    measured minutes apart differed that much), so micro-measurements taken in one block before a grid
    describe a different machine state than the grid. `python -m jaxmoe.offload` runs one calibration
    round per grid round, each in a seeded random order; every value is the median over rounds.
    """

    def __init__(self, ex, copy_paths: list, *, tokens: int = 6):
        self.tokens, self.paths = tokens, list(copy_paths)
        g_hi = min(8, ex.shape.n_experts)
        self.g_hi = g_hi
        self.jobs = {}  # copy path -> [(key, compiled plan, tokens, layers)]
        for cpath in self.paths:
            jobs = []
            for key, pos0 in (("dense", 0), ("dense_s_at_ctx_cap", ex.ctx_cap - tokens)):
                plan, nl = synthetic_plan(ex, slot=0, path=None, n_hit=0, n_miss=0, tokens=tokens, pos0=pos0)
                jobs.append((key, ex.compile_plan(plan), tokens, nl))
            for slot, p in _slot_paths(ex):
                for g in (1, g_hi):
                    for kind, nh, nm in (("hit", g, 0), ("miss", 0, g)):
                        plan, nl = synthetic_plan(ex, slot=slot, path=p, n_hit=nh, n_miss=nm, tokens=tokens, pos0=0, seed=g)
                        jobs.append((f"{kind}|{p}|{g}", ex.compile_plan(plan), tokens, nl))
            self.jobs[cpath] = jobs
        self.samples = {c: {key: [] for key, *_ in self.jobs[c]} for c in self.paths}
        self.heads = {c: [] for c in self.paths}

    def head(self, ex, cpath: str, keep: bool = True) -> float:
        """The output head's time this round (kept as a sample unless `keep` is false: a warm-up round)."""
        head = _head_s(ex)
        if keep:
            self.heads[cpath].append(head)
        return head

    def record(self, cpath: str, key: str, secs: float, head: float) -> None:
        """One round's sample of synthetic plan `key`: its wall seconds less the heads, per layer."""
        _, _, tokens, nl = next(j for j in self.jobs[cpath] if j[0] == key)
        self.samples[cpath][key].append((secs - tokens * head) / (tokens * nl))

    def round(self, ex, cpath: str, rng: np.random.Generator, keep: bool = True) -> None:
        """One run of every synthetic plan of `cpath` (the executor already on that copy path), whole and in
        random order; `keep` false: a warm-up round, measured but not kept."""
        head = self.head(ex, cpath, keep)
        jobs = self.jobs[cpath]
        for i in rng.permutation(len(jobs)):
            key, compiled, tokens, nl = jobs[i]
            secs = ex.run(compiled)
            if keep:
                self.record(cpath, key, secs, head)

    def result(self, ex) -> dict:
        """The calibration JSON (medians over rounds; every round's value kept under "samples")."""
        from jaxmoe.offload import device_info

        out = dict(device=device_info(), paths={}, tokens=self.tokens, reps=len(next(iter(self.heads.values()))),
                   rounds_interleaved=True)
        for cpath in self.paths:
            rec = dict(grouped_experts=self.g_hi, copy_bytes=dict(ex.copy_bytes), hidden=ex.shape.hidden,
                       ffn=ex.shape.ffn, samples={k: list(v) for k, v in self.samples[cpath].items()},
                       head_samples=list(self.heads[cpath]))
            round_medians(rec)
            if cpath == "raw" and ex.on_gpu:
                ex.set_copy_path("raw")
                rec["floor"] = raw_copy_floor(ex)
                rec["device"] = device_times(ex, self.g_hi)
            out["paths"][cpath] = rec
            print(f"calibrated {cpath}: dense {rec['dense_s'] * 1e6:.1f} us/layer, head {rec['head_s'] * 1e6:.0f} us",
                  file=sys.stderr)
        return out


def calibrate(ex, copy_paths: list, *, tokens: int = 6, reps: int = 5, seed: int = 0) -> dict:
    """Micro-measurements per copy path on their own (no grid to interleave with): `reps` rounds."""
    cal = CalibrationRounds(ex, copy_paths, tokens=tokens)
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        for cpath in copy_paths:
            ex.set_copy_path(cpath)
            cal.round(ex, cpath, rng)
    return cal.result(ex)


def raw_copy_floor(ex) -> dict:
    """cudaMemcpyAsync of contiguous pinned bytes → device, CUDA events: size curve and copies in flight."""
    cp = ex.cp
    sizes = [65536, 262144, 1 << 20, 1548288, 2027520, 2654208, 3059712, 4 << 20, 16 << 20]
    big = max(sizes)
    host = cp.cuda.alloc_pinned_memory(big * 4)
    dev = cp.empty(big * 4, dtype=cp.uint8)
    st = cp.cuda.Stream(non_blocking=True)
    curve = []
    for n in sizes:
        times = []
        for _ in range(12):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(st)
            cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ptr, n, 1, st.ptr)
            b.record(st)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
        curve.append(float(np.median(times[2:])))
    inflight = []
    n = 2654208
    for k in (1, 2, 3, 4):
        streams = [cp.cuda.Stream(non_blocking=True) for _ in range(k)]
        for s in streams:
            s.synchronize()
        t = time.perf_counter()
        for r in range(8):
            for i, s in enumerate(streams):
                cp.cuda.runtime.memcpyAsync(dev.data.ptr + i * n, host.ptr + i * n, n, 1, s.ptr)
        for s in streams:
            s.synchronize()
        inflight.append(8 * k * n / (time.perf_counter() - t) / 1e9)
    return dict(nbytes=sizes, seconds=curve, inflight_copies=[1, 2, 3, 4], inflight_gbps=inflight, inflight_nbytes=n)


def device_times(ex, g_hi: int, chain: int = 4) -> dict:
    """GPU seconds per call of each expert launch (G = 1 and g_hi) and of the dense layer: `chain` dependent calls in one jit."""
    import jax
    import jax.numpy as jnp

    out = {"expert": {}, "chain": chain}
    x = ex.embed_token(0)
    for _, p in _slot_paths(ex):
        out["expert"][p] = {}
        for g in (1, g_hi):
            fn = ex.expert_fn(p, g)
            ids = jnp.arange(g, dtype=jnp.int32) * 3
            w = jnp.full((g,), 1e-3, jnp.float32)

            @jax.jit
            def many(acc, pool):
                for _ in range(chain):
                    acc = fn(acc, acc, pool, ids, w)
                return acc

            many(x, ex.pools[p]).block_until_ready()
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                many(x, ex.pools[p]).block_until_ready()
                ts.append((time.perf_counter() - t) / chain)
            out["expert"][p][str(g)] = float(np.median(ts))
    w0 = ex.dense_w[0]
    kc, vc = ex.kv[0]
    dense = ex._dense

    @jax.jit
    def dense_many(h, kc, vc):
        for i in range(chain):
            h2, xn, kc, vc, top = dense(h, kc, vc, jnp.int32(i), w0)
            h = h2 + 1e-3 * xn
        return h

    dense_many(x, kc, vc).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        dense_many(x, kc, vc).block_until_ready()
        ts.append((time.perf_counter() - t) / chain)
    out["dense_s"] = float(np.median(ts))
    return out


# ---------------------------------------------------------------------------------------------
# Profiles from the measurements (CPU)
# ---------------------------------------------------------------------------------------------

def path_nbytes(path: str, hidden: int = 2048, ffn: int = 768) -> int:
    """Logical (GGUF) bytes of one expert of a kernel path: the size the simulator prices (Qwen3: Q4_K 2,654,208)."""
    from sim.formats import FORMATS

    per = hidden * ffn
    if path == "q4_k+q6_k_down":
        return 2 * FORMATS["q4_k"].nbytes(per) + FORMATS["q6_k"].nbytes(per)
    return 3 * FORMATS[path].nbytes(per)

VRAM = {"H100": 80 * 10**9, "H200": 141 * 10**9}


def card_name(calib: dict) -> str:
    kind = calib["device"].get("device_kind", "")
    for c in ("H100", "H200"):
        if c in kind:
            return c.lower()
    return "gpu"


def _fit_linear(x, y) -> tuple[float, float]:
    """(fixed_s, gbps) of y = fixed + x / (gbps·1e9), least squares (gbps clipped positive)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, icpt = np.polyfit(x, y, 1)
    slope = max(slope, 1e-15)
    return max(0.0, float(icpt)), float(1.0 / slope / 1e9)


SAMPLE_FIELDS = {"dense": "dense_s", "dense_s_at_ctx_cap": "dense_s_at_ctx_cap"}  # layer-only samples → field


def round_medians(rec: dict, skip: int = 0) -> None:
    """Fill one copy path's calibration values (dense_s, dense_s_at_ctx_cap, hit, miss, head_s) with the
    medians of its per-round samples ("samples": "dense", "hit|q4_k|8", …; "head_samples"), rounds
    from `skip` on. The one rule behind every calibration value, at measurement and under --skip-rounds."""
    rec["hit"], rec["miss"] = {}, {}
    for key, v in rec["samples"].items():
        kept = v[skip:]
        if not kept:
            raise InputError(None, f"--skip-rounds {skip} leaves no round of {key!r}")
        kind, *rest = key.split("|")
        if kind in ("hit", "miss"):
            rec[kind].setdefault(rest[0], {})[rest[1]] = float(np.median(kept))
        else:
            rec[SAMPLE_FIELDS[kind]] = float(np.median(kept))
    rec["head_s"] = float(np.median(rec["head_samples"][skip:]))


def skip_rounds_calib(calib: dict, skip: int) -> dict:
    """The calibration with its first `skip` interleaved rounds left out (medians over the rest)."""
    if not skip:
        return calib
    out = json.loads(json.dumps(calib))
    for rec in out["paths"].values():
        if "samples" not in rec:
            raise InputError(None, "--skip-rounds needs a calibration timed in interleaved rounds (no 'samples')")
        round_medians(rec, skip)
    out["skipped_rounds"] = skip
    return out


def skip_rounds_grid(grid: dict, skip: int) -> dict:
    """The grid with each configuration's first `skip` timed rounds left out (mean and t-interval over the rest)."""
    if not skip:
        return grid
    from analysis.intervals import t_interval

    if not grid.get("rounds"):
        raise InputError(None, "--skip-rounds needs a grid timed in interleaved rounds")
    out = json.loads(json.dumps(grid))
    for r in out["results"]:
        tps = r["tokens_per_s"][skip:]
        if not tps:
            raise InputError(None, f"--skip-rounds {skip} leaves no round")
        m, lo, hi = t_interval(tps)
        r.update(tokens_per_s=tps, tokens_per_s_mean=m, tokens_per_s_ci95=[lo, hi], seconds=r["seconds"][skip:])
    out["rounds"] = grid["rounds"] - skip
    out["skipped_rounds"] = skip
    return out


def executor_profile(calib: dict, cpath: str, head_bytes: int) -> dict:
    """Hardware profile of the executor with copy path `cpath` (times as the executor's loop sees them)."""
    rec = calib["paths"][cpath]
    g = int(rec["grouped_experts"])
    dense = rec["dense_s"]
    paths = list(rec["hit"])
    single = {p: max(1e-7, rec["hit"][p]["1"] - dense) for p in paths}
    grouped = {p: max(single[p], rec["hit"][p][str(g)] - dense) for p in paths}
    copy1 = {p: rec["miss"][p]["1"] - rec["hit"][p]["1"] for p in paths}
    copyg = {p: rec["miss"][p][str(g)] - rec["hit"][p][str(g)] for p in paths}
    per_expert = {p: max(1e-7, (copyg[p] - copy1[p]) / (g - 1)) for p in paths}
    job = float(np.median([max(0.0, copy1[p] - per_expert[p]) for p in paths]))
    size = {p: path_nbytes(p, rec.get("hidden", 2048), rec.get("ffn", 768)) for p in paths}
    order = sorted(paths, key=lambda p: size[p])
    nbytes = [size[p] for p in order]
    secs = [per_expert[p] for p in order]
    fixed, gbps = _fit_linear(nbytes, secs)
    card = card_name(calib)
    return {
        "name": f"{card}-offload-{cpath}",
        "gpu": calib["device"].get("device_kind", ""),
        "source": (f"measured: python -m jaxmoe.offload --calibrate (micro-measurements of the executor's own decode "
                   f"loop on synthetic plans, copy path {cpath}), JAX {calib['device'].get('jax')}; "
                   "python -m jaxmoe.offload_calib profiles; see docs/validation.md"),
        "vram_bytes": VRAM.get(card.upper(), 80 * 10**9),
        "vram_gbps": head_bytes / rec["head_s"] / 1e9,
        "runtime_reserve_bytes": 1 << 30,
        "transfer": {"copy_engines": 1, "fixed_s": fixed, "gbps": gbps,
                     "curve": {"nbytes": nbytes, "seconds": secs}},
        "expert_compute": {"shape": {"hidden": rec.get("hidden", 2048), "ffn": rec.get("ffn", 768)}, "tokens": [1],
                           "seconds": {p: [single[p]] for p in paths},
                           "grouped_seconds": {p: [grouped[p]] for p in paths}, "grouped_experts": g,
                           "note": "per layer, host-timed in the executor's loop: (layer with G resident experts) − "
                                   "(layer without experts); one launch per format"},
        "dense_compute": {"tokens": [1], "seconds": [dense], "context": 0, "ref_dense_bytes": 0,
                          "note": "per layer: dense dispatch + router top-k to the host + the executor's bookkeeping "
                                  f"(bf16 attention over a masked KV cache; {rec['dense_s_at_ctx_cap'] * 1e6:.1f} us at "
                                  "the cache's full length)"},
        "timeline": {"overlap_resident": False, "split_launches": True, "copy_job_per_format": cpath == "jax",
                     "copy_job_fixed_s": job,
                     "note": "the executor is host-bound: its 'compute' is the host's launch dispatch, and the host "
                             "issues a layer's copies only after dispatching the resident launch, so nothing the host "
                             "pays overlaps the copy (overlap_resident false; docs/validation.md, model change 3). "
                             "Its hits and misses of one format are two launches (split_launches, model change 4). "
                             "A layer's copies are one job with this fixed cost (the first copy's extra over the "
                             "per-expert slope: issue + stream wait); the jax path pays it once per kernel path "
                             "with misses (one device_put and one scatter each: copy_job_per_format, change 5)"},
        "notes": ("vram_gbps = head_bytes / measured head time (bf16 head, argmax to the host), so the simulator's "
                  "head term equals the measured one. Curve: marginal seconds per missing expert in a layer's copy "
                  "job, at the GGUF size of each kernel path (pool rows are the repacked planes, "
                  f"{rec['copy_bytes']} bytes per expert)."),
    }


def native_profile(calib: dict, head_bytes: int) -> dict:
    """What a native CUDA engine would pay: raw copy floor, device kernel and dense times, no dispatch."""
    raw = calib["paths"]["raw"]
    floor, dev = raw["floor"], raw["device"]
    g = int(raw["grouped_experts"])
    paths = list(dev["expert"])
    fixed, gbps = _fit_linear(floor["nbytes"], floor["seconds"])
    card = card_name(calib)
    return {
        "name": f"{card}-native",
        "gpu": calib["device"].get("device_kind", ""),
        "source": ("measured: python -m jaxmoe.offload --calibrate (raw cudaMemcpyAsync from pinned memory with CUDA "
                   "events; expert kernels and the dense layer as chained calls inside one jit, so no dispatch); "
                   "python -m jaxmoe.offload_calib profiles"),
        "vram_bytes": VRAM.get(card.upper(), 80 * 10**9),
        "vram_gbps": 0.8 * (3350 if card == "h100" else 4800),
        "runtime_reserve_bytes": 1 << 30,
        "transfer": {"copy_engines": 1, "fixed_s": fixed, "gbps": gbps,
                     "curve": {"nbytes": floor["nbytes"], "seconds": floor["seconds"]},
                     "inflight": {"copies": floor["inflight_copies"], "aggregate_gbps": floor["inflight_gbps"],
                                  "nbytes": floor["inflight_nbytes"]}},
        "expert_compute": {"shape": {"hidden": raw.get("hidden", 2048), "ffn": raw.get("ffn", 768)}, "tokens": [1],
                           "seconds": {p: [dev["expert"][p]["1"]] for p in paths},
                           "grouped_seconds": {p: [dev["expert"][p][str(g)]] for p in paths}, "grouped_experts": g},
        "dense_compute": {"tokens": [1], "seconds": [dev.get("dense_s", raw["dense_s"])], "context": 0,
                          "ref_dense_bytes": 0, "note": "bf16 attention layer + router, device time"},
        "timeline": {"overlap_resident": True, "copy_job_fixed_s": 0.0},
        "notes": "vram_gbps: 80 % of the datasheet HBM bandwidth (head term only).",
    }


# ---------------------------------------------------------------------------------------------
# Noise: is a slow run slow throughout, or slowed by a few tokens?
# ---------------------------------------------------------------------------------------------

NOISE_PARTS = ("router_wait", "dispatch", "copy_issue", "stall", "head")


def noise_rows(grid: dict) -> list[dict]:
    """Per copy path, medians over configurations of: the CV of a configuration's run seconds across rounds;
    the CV of its tokens within a run; the CV across rounds of each run's median token (as large as the
    run CV: whole runs shift; much smaller: a few slow tokens do it); slow tokens (> 1.5 × the run's
    median) per run; and per loop part its share of a run and its CV across rounds."""
    out = []
    for cpath in sorted({r["copy_path"] for r in grid["results"]}):
        recs = [r for r in grid["results"] if r["copy_path"] == cpath and len(r.get("seconds", [])) >= 2
                and r.get("token_s_per_run")]
        if not recs:
            continue
        cv = lambda a: float(np.std(a, ddof=1) / np.mean(a))  # noqa: E731
        row = dict(copy_path=cpath, configurations=len(recs), rounds=min(len(r["seconds"]) for r in recs),
                   run_cv=float(np.median([cv(r["seconds"]) for r in recs])),
                   token_cv=float(np.median([np.median([np.std(t) / np.mean(t) for t in r["token_s_per_run"]]) for r in recs])),
                   run_median_token_cv=float(np.median([cv([np.median(t) for t in r["token_s_per_run"]]) for r in recs])),
                   slow_tokens_per_run=float(np.mean([np.mean([np.sum(np.asarray(t) > 1.5 * np.median(t))
                                                               for t in r["token_s_per_run"]]) for r in recs])),
                   parts={})
        # a shift common to every configuration of a round vs what is left per run (log seconds, rounds kept alike)
        n_r = row["rounds"]
        logs = np.log(np.array([r["seconds"][:n_r] for r in recs], float))
        dev = logs - logs.mean(axis=1, keepdims=True)
        row["round_effect"] = [float(v) for v in dev.mean(axis=0)]
        row["run_residual_sd"] = float((dev - dev.mean(axis=0)).std())
        if all(r.get("parts_s_per_run") for r in recs):
            row["part_corr"] = {}
            for a, b in (("router_wait", "dispatch"), ("dispatch", "copy_issue")):
                xa, xb = [], []
                for r in recs:
                    va = np.log([max(p[a], 1e-12) for p in r["parts_s_per_run"]])
                    vb = np.log([max(p[b], 1e-12) for p in r["parts_s_per_run"]])
                    xa += list(va - va.mean())
                    xb += list(vb - vb.mean())
                row["part_corr"][f"{a}~{b}"] = float(np.corrcoef(xa, xb)[0, 1])
            for k in NOISE_PARTS:
                share = np.median([np.mean([p[k] for p in r["parts_s_per_run"]]) / np.mean(r["seconds"]) for r in recs])
                spread = np.median([cv([p[k] for p in r["parts_s_per_run"]]) if np.mean([p[k] for p in r["parts_s_per_run"]]) > 0
                                    else 0.0 for r in recs])
                row["parts"][k] = dict(share=float(share), cv=float(spread))
        out.append(row)
    return out


def noise_table(rows: list[dict]) -> str:
    lines = ["| copy | configurations × rounds | run CV | token CV within a run | CV of the run's median token | "
             "slow tokens per run | part: share of a run, CV across rounds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = "; ".join(f"{k} {100 * v['share']:.0f} %, {100 * v['cv']:.0f} %" for k, v in r["parts"].items()
                          if v["share"] >= 0.005) or "—"
        lines.append(f"| {r['copy_path']} | {r['configurations']} × {r['rounds']} | {100 * r['run_cv']:.1f} % | "
                     f"{100 * r['token_cv']:.1f} % | {100 * r['run_median_token_cv']:.1f} % | "
                     f"{r['slow_tokens_per_run']:.2f} | {parts} |")
    lines += ["", "| copy | round effect (mean log-deviation of a round's runs, per round) | per-run residual (sd of log) | "
              "correlation of the parts' log-deviations across runs |", "|---|---|---|---|"]
    for r in rows:
        corr = "; ".join(f"{k.replace('~', ' vs ')} {v:.2f}" for k, v in r.get("part_corr", {}).items()) or "—"
        lines.append(f"| {r['copy_path']} | {', '.join(f'{100 * v:+.1f} %' for v in r['round_effect'])} | "
                     f"{100 * r['run_residual_sd']:.1f} % | {corr} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Validation: the simulator with the matching profile on each measured configuration
# ---------------------------------------------------------------------------------------------


def predict(rec: dict, trace_path: str, profile_path: str, calib_fraction: float = 0.25, seed: int = 0) -> dict:
    """The simulator's record for one measured configuration."""
    from sim.simulate import ReplayConfig, run

    return run(ReplayConfig(trace=trace_path, capacity_bytes=int(rec["capacity_bytes"]), policy=rec["policy"],
                            precision=rec["precision"], gpu=profile_path, calib_fraction=calib_fraction,
                            seed=seed)).as_dict()


def validation_rows(grid: dict, trace_dir: str, profile_dir: str) -> list[dict]:
    card = card_name(grid)
    rows = []
    for rec in grid["results"]:
        prof = str(Path(profile_dir) / f"{card}-offload-{rec['copy_path']}.json")
        sim = predict(rec, str(Path(trace_dir) / rec["trace"]), prof)
        meas = rec["tokens_per_s_mean"]
        rows.append(dict(trace=rec["trace"], budget=rec["budget"], policy=rec["policy"], precision=rec["precision"],
                         copy_path=rec["copy_path"], hit_rate=rec["hit_rate"], sim_hit_rate=sim["hit_rate"],
                         measured=meas, ci95=rec["tokens_per_s_ci95"], runs=rec.get("tokens_per_s"),
                         predicted=sim["tokens_per_s"], error=(sim["tokens_per_s"] - meas) / meas))
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| trace | budget | cache | precision | copy | hit rate (exec = sim) | measured tok/s [95 % CI] | "
            "predicted tok/s | error |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        same = "=" if abs(r["hit_rate"] - r["sim_hit_rate"]) < 1e-12 else "≠"
        lines.append(f"| {r['trace']} | {r['budget']} | {r['policy']} | {r['precision']} | {r['copy_path']} | "
                     f"{r['hit_rate']:.3f} {same} | {r['measured']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}] | "
                     f"{r['predicted']:.1f} | {100 * r['error']:+.1f} % |")
    return "\n".join(lines)


GRID_SEQS = (0, 16, 17)  # of traces/qwen3.npz: one calibration-split sequence, then two evaluation-split ones
GRID_STEPS = 40  # per sequence: its 32 prefill steps and 8 decode steps


def grid_traces(out_dir: str, default_trace: str = "traces/qwen3.npz") -> list[str]:
    """The grid's traces: synth-qwen3.npz (sim.synth, 3 sequences of 16 prefill + 8 decode, seed 0) and
    qwen3-sub.npz (sequences GRID_SEQS of the default trace, first GRID_STEPS steps each). With the
    simulator's 25 % calibration window both leave 16 decode tokens to execute, after a warm cache."""
    from sim import synth
    from sim.trace import load_trace, save_trace

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    synth.main(["-o", str(out / "synth-qwen3.npz"), "--seqs", "3", "--prefill", "16", "--decode", "8", "--seed", "0"])
    tr = load_trace(default_trace)
    first = {}
    for i, q in enumerate(tr.seq.tolist()):
        first.setdefault(q, i)
    missing = [q for q in GRID_SEQS if q not in first]
    if missing:
        raise InputError(default_trace, f"has no sequence {missing[0]} (the grid takes sequences {GRID_SEQS})")
    keep = np.concatenate([np.arange(first[q], first[q] + GRID_STEPS) for q in GRID_SEQS])
    save_trace(tr.select(keep), out / "qwen3-sub.npz")
    return [str(out / "synth-qwen3.npz"), str(out / "qwen3-sub.npz")]


def tiny_trace(path: str, *, layers: int = 4, experts: int = 8, top_k: int = 2, seqs: int = 3, steps: int = 8,
               seed: int = 0) -> None:
    """A small decode-only trace for the executor's tiny shape (hidden = FFN = 256; Q6_K down in odd layers).

    Popularity is Zipf-like per layer, so caches of a fraction of the experts hit often.
    """
    from sim.trace import Trace, TraceMeta, save_trace

    w = 3 * 256 * 256
    fmt = tuple("q4_k+q6_k_down" if la % 2 else "q4_k" for la in range(layers))
    nbytes = tuple(path_nbytes(f, 256, 256) for f in fmt)
    meta = TraceMeta(model="tiny-moe", n_layers=layers, n_experts=experts, top_k=top_k, expert_weights=w,
                     expert_bytes=nbytes, expert_format=fmt, provenance=f"jaxmoe.offload_calib tiny-trace seed {seed}")
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, experts + 1) ** 1.2
    t = seqs * steps
    ids = np.zeros((t, layers, top_k), np.int16)
    wt = np.zeros((t, layers, top_k), np.float32)
    perm = [rng.permutation(experts) for _ in range(layers)]
    for i in range(t):
        for la in range(layers):
            ids[i, la] = perm[la][rng.choice(experts, top_k, replace=False, p=pop / pop.sum())]
            wt[i, la] = np.sort(rng.dirichlet(np.ones(top_k)))[::-1]
    seq = np.repeat(np.arange(seqs), steps).astype(np.int32)
    save_trace(Trace.from_arrays(ids, wt, np.ones(t, np.uint8), seq, meta), path)


@exit_on_input_error
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jaxmoe.offload_calib", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("profiles", help="write the executor and native-engine hardware profiles from a calibration JSON")
    a.add_argument("calib", help="JSON written by python -m jaxmoe.offload --calibrate")
    a.add_argument("--out-dir", default="sim/profiles", help="where the profiles go (default: %(default)s)")
    a.add_argument("--head-bytes", type=int, default=None, help="output-head bytes of the model (default: Qwen3-30B-A3B's)")
    a.add_argument("--skip-rounds", type=int, default=0, help="leave out the first N interleaved rounds (first-use effects)")
    b = sub.add_parser("validate", help="predicted vs measured tokens/s for every configuration of a grid JSON")
    b.add_argument("grid", help="JSON written by python -m jaxmoe.offload")
    b.add_argument("--trace-dir", required=True, help="folder holding the grid's traces (by file name)")
    b.add_argument("--profile-dir", default="sim/profiles", help="folder of the <card>-offload-<path>.json profiles")
    b.add_argument("--json", help="also write the rows as JSON")
    b.add_argument("--skip-rounds", type=int, default=0, help="leave out each configuration's first N timed rounds")
    n = sub.add_parser("noise", help="where a grid's run-to-run spread comes from: whole runs or single tokens, which loop part")
    n.add_argument("grid", help="JSON written by python -m jaxmoe.offload (with token_s_per_run / parts_s_per_run)")
    t = sub.add_parser("grid-traces", help="write the validation grid's two traces (docs/validation.md) into a folder")
    t.add_argument("out_dir")
    t.add_argument("--default-trace", default="traces/qwen3.npz", help="the 48-layer model's trace (default: %(default)s)")
    c = sub.add_parser("tiny-trace", help="write a small decode-only trace for the executor's tiny shape (CPU runs)")
    c.add_argument("out")
    for name, default in (("layers", 4), ("experts", 8), ("top-k", 2), ("seqs", 3), ("steps", 8), ("seed", 0)):
        c.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args(argv)
    if args.cmd == "grid-traces":
        return grid_traces(args.out_dir, args.default_trace)
    if args.cmd == "tiny-trace":
        tiny_trace(args.out, layers=args.layers, experts=args.experts, top_k=args.top_k, seqs=args.seqs,
                   steps=args.steps, seed=args.seed)
        return args.out
    if args.cmd == "noise":
        try:
            grid = json.loads(Path(args.grid).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(args.grid, f"cannot read grid JSON: {exc}") from None
        rows = noise_rows(grid)
        if not rows:
            raise InputError(args.grid, "no configuration with ≥ 2 timed runs and per-token times (token_s_per_run)")
        print(noise_table(rows))
        return rows
    if args.cmd == "profiles":
        try:
            calib = json.loads(Path(args.calib).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(args.calib, f"cannot read calibration JSON: {exc}") from None
        if "paths" not in calib:
            raise InputError(args.calib, "not a calibration JSON (no 'paths')")
        from sim.profiles import qwen3_30b_a3b

        head = args.head_bytes or qwen3_30b_a3b().head_bytes
        calib = skip_rounds_calib(calib, args.skip_rounds)
        docs = [executor_profile(calib, c, head) for c in calib["paths"]]
        if "raw" in calib["paths"] and "floor" in calib["paths"]["raw"]:
            docs.append(native_profile(calib, head))
        for d in docs:
            path = Path(args.out_dir) / f"{d['name']}.json"
            write_text_atomic(path, json.dumps(d, indent=1) + "\n")
            print(f"wrote {path}")
        return docs
    try:
        grid = json.loads(Path(args.grid).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(args.grid, f"cannot read grid JSON: {exc}") from None
    grid = skip_rounds_grid(grid, args.skip_rounds)
    rows = validation_rows(grid, args.trace_dir, args.profile_dir)
    print(markdown_table(rows))
    errs = np.abs([r["error"] for r in rows])
    print(f"\n{len(rows)} configurations: |error| mean {100 * errs.mean():.1f} %, max {100 * errs.max():.1f} %, "
          f"≤ 5 %: {int((errs <= 0.05).sum())}/{len(rows)}")
    if args.json:
        doc = dict(kind="validation", grid=Path(args.grid).name, device=grid.get("device", {}),
                   command="python -m jaxmoe.offload_calib " + " ".join(sys.argv[1:] if argv is None else argv),
                   grid_command=grid.get("command", ""), rounds=grid.get("rounds"),
                   skipped_rounds=grid.get("skipped_rounds", 0),
                   results=[dict(r, tokens_per_s_mean=r["measured"], tokens_per_s_ci95=r["ci95"],
                                 tokens_per_s=r["runs"], sim_tokens_per_s=r["predicted"]) for r in rows])
        write_text_atomic(args.json, json.dumps(doc, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
