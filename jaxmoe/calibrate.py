"""Calibrate the simulator's hardware profile on a GPU: expert kernels, dense layer, host→device copies.

Measures, on the GPU this runs on:
- expert compute: the fused Pallas kernels of `jaxmoe.kernels.expert_ffn` (via `jaxmoe.kernel_timing`)
  per format (q2_k, q3_k, q4_k) and token count, one expert per call and one grouped call of the
  layer's 8 experts, and a bf16 jnp FFN of the same shapes; CUPTI device time per call.
- dense compute: one Qwen3-30B-A3B attention layer at M tokens in bf16 with jnp — input RMSNorm,
  q/k/v projections (32 q heads, 4 kv heads, head_dim 128), q/k RMSNorm, RoPE, GQA softmax attention
  over a bf16 KV cache of `--context` tokens, o projection, residual, post-attention RMSNorm and the
  float32 router (softmax, top-8). Weights rotate over 4 layer copies so they come from HBM.
- host→device copies from pinned host memory (`jax.device_put` from memory kind pinned_host to
  device): single-copy medians for 64 KiB … 64 MiB plus each format's expert size; the fit
  fixed_s + nbytes / gbps (least squares on relative error); 1–4 copies in flight.
It writes the JSON profile the simulator loads (sim/profiles.py) and keeps raw measurements.

Examples:
  python -m jaxmoe.calibrate --out sim/profiles/h200.json --raw-dir results/
  python -m jaxmoe.calibrate --out /tmp/h200.json --quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from jaxmoe import kernel_timing as bk
from sim.io import InputError, atomic_path, exit_on_input_error

# Qwen3-30B-A3B attention geometry
N_HEADS, N_KV, HEAD_DIM, ROPE_THETA = 32, 4, 128, 1_000_000.0
KIB, MIB = 2**10, 2**20
COPY_SIZES = [64 * KIB * 2**i for i in range(11)]  # 64 KiB … 64 MiB


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[calibrate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Dense layer
# ---------------------------------------------------------------------------------------------


def _rms(x, w, eps=1e-6):
    import jax.numpy as jnp

    xf = x.astype(jnp.float32)
    return (xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)) * w).astype(x.dtype)


def dense_layer(x, w, kc, vc, pos):
    """One Qwen3-MoE attention block + router at M new tokens over a KV cache → (residual out, top-k ids)."""
    import jax
    import jax.numpy as jnp

    m = x.shape[0]
    h = _rms(x, w["ln1"])
    q = (h @ w["wq"]).reshape(m, N_HEADS, HEAD_DIM)
    k = (h @ w["wk"]).reshape(m, N_KV, HEAD_DIM)
    v = (h @ w["wv"]).reshape(m, N_KV, HEAD_DIM)
    q, k = _rms(q, w["qn"]), _rms(k, w["kn"])
    inv = ROPE_THETA ** (-jnp.arange(0, HEAD_DIM, 2, dtype=jnp.float32) / HEAD_DIM)
    ang = (pos + jnp.arange(m, dtype=jnp.float32))[:, None] * inv[None]  # [m, D/2]
    cos, sin = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]

    def rope(t):
        t1, t2 = jnp.split(t.astype(jnp.float32), 2, axis=-1)
        return jnp.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1).astype(t.dtype)

    q, k = rope(q), rope(k)
    qg = q.reshape(m, N_KV, N_HEADS // N_KV, HEAD_DIM)
    scale = HEAD_DIM ** -0.5
    s_cache = jnp.einsum("mkgd,tkd->kgmt", qg, kc, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("mkgd,tkd->kgmt", qg, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.arange(m)[:, None] >= jnp.arange(m)[None, :]
    s_new = jnp.where(causal, s_new, -jnp.inf)
    p = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1).astype(x.dtype)
    ctx = kc.shape[0]
    o = jnp.einsum("kgmt,tkd->mkgd", p[..., :ctx], vc, preferred_element_type=jnp.float32) + \
        jnp.einsum("kgmt,tkd->mkgd", p[..., ctx:], v, preferred_element_type=jnp.float32)
    x = x + (o.reshape(m, N_HEADS * HEAD_DIM).astype(x.dtype) @ w["wo"])
    h2 = _rms(x, w["ln2"])
    logits = h2.astype(jnp.float32) @ w["router"]
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_i = jax.lax.top_k(probs, bk.TOP_K)
    return x, top_i, top_w / jnp.sum(top_w, axis=-1, keepdims=True)


def dense_weights(seed: int):
    """Random bf16 attention weights (f32 router and norms) of one layer."""
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    n = lambda k, s: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(jnp.bfloat16)
    H = bk.HIDDEN
    return {"wq": n(ks[0], (H, N_HEADS * HEAD_DIM)), "wk": n(ks[1], (H, N_KV * HEAD_DIM)),
            "wv": n(ks[2], (H, N_KV * HEAD_DIM)), "wo": n(ks[3], (N_HEADS * HEAD_DIM, H)),
            "router": 0.02 * jax.random.normal(ks[4], (H, bk.N_EXPERTS), jnp.float32),
            "ln1": jnp.ones((H,), jnp.float32), "ln2": jnp.ones((H,), jnp.float32),
            "qn": jnp.ones((HEAD_DIM,), jnp.float32), "kn": jnp.ones((HEAD_DIM,), jnp.float32)}


def measure_dense(timer, tokens, context: int, reps: int) -> dict:
    """Per-layer device seconds of `dense_layer` at each token count (4 rotating layers)."""
    import jax
    import jax.numpy as jnp

    layers = []
    for i in range(4):
        kk = jax.random.split(jax.random.PRNGKey(100 + i), 2)
        kc = jax.random.normal(kk[0], (context, N_KV, HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
        vc = jax.random.normal(kk[1], (context, N_KV, HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
        layers.append((dense_weights(i), kc, vc))
    fn = jax.jit(dense_layer)
    rng = np.random.default_rng(3)
    secs = []
    for m in tokens:
        x = jnp.asarray(rng.standard_normal((m, bk.HIDDEN)), jnp.bfloat16)
        sets = [(x, w, kc, vc, jnp.float32(context)) for (w, kc, vc) in layers]
        s = bk.summarize(timer.time_calls(fn, sets, reps))
        secs.append(s["total_s"])
        log(f"dense M={m} ctx={context}: {s['total_s'] * 1e6:.1f} us")
    w = layers[0][0]
    weight_bytes = int(sum(a.nbytes for a in jax.tree_util.tree_leaves(w)))
    kv_bytes = int(layers[0][1].nbytes + layers[0][2].nbytes)
    return {"tokens": list(tokens), "seconds": secs, "context": context, "weight_bytes": weight_bytes,
            "kv_bytes": kv_bytes}


# ---------------------------------------------------------------------------------------------
# Host → device
# ---------------------------------------------------------------------------------------------


def measure_transfers(sizes, reps: int, inflight_nbytes: int) -> dict:
    """Pinned-host → device copy medians per size, and aggregate GB/s with 1–4 copies in flight."""
    import jax

    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    on_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    rng = np.random.default_rng(5)

    def host_array(nbytes: int):
        a = rng.integers(0, 255, size=nbytes, dtype=np.uint8)
        return jax.block_until_ready(jax.device_put(a, pinned))

    curve_s = []
    for nbytes in sizes:
        src = [host_array(nbytes) for _ in range(2)]
        for s in src:
            jax.block_until_ready(jax.device_put(s, on_dev))
        ts = []
        for r in range(reps):
            s = src[r % 2]
            t0 = time.perf_counter()
            jax.block_until_ready(jax.device_put(s, on_dev))
            ts.append(time.perf_counter() - t0)
        curve_s.append(statistics.median(ts))
        log(f"h2d {nbytes / MIB:8.3f} MiB: {curve_s[-1] * 1e6:8.1f} us  {nbytes / curve_s[-1] / 1e9:6.2f} GB/s")
    agg = []
    srcs = [host_array(inflight_nbytes) for _ in range(4)]
    for k in (1, 2, 3, 4):
        ts = []
        for _ in range(max(3, reps // 2)):
            t0 = time.perf_counter()
            outs = [jax.device_put(srcs[i], on_dev) for i in range(k)]
            jax.block_until_ready(outs)
            ts.append(time.perf_counter() - t0)
        agg.append(k * inflight_nbytes / statistics.median(ts) / 1e9)
        log(f"h2d {k} in flight × {inflight_nbytes / MIB:.2f} MiB: {agg[-1]:.2f} GB/s aggregate")
    return {"nbytes": list(map(int, sizes)), "seconds": curve_s,
            "inflight": {"copies": [1, 2, 3, 4], "aggregate_gbps": agg, "nbytes": int(inflight_nbytes)}}


def fit_linear(nbytes, seconds) -> tuple[float, float]:
    """Fit seconds ≈ fixed + nbytes / (gbps·1e9) minimising relative error → (fixed_s, gbps)."""
    n = np.asarray(nbytes, np.float64)
    t = np.asarray(seconds, np.float64)
    a = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (fixed, per_byte), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if per_byte <= 0:  # degenerate: fall back to the largest copy's bandwidth
        return float(max(fixed, 0.0)), float(n[-1] / t[-1] / 1e9)
    return float(max(fixed, 0.0)), float(1.0 / per_byte / 1e9)


def device_info() -> dict:
    """GPU name, total memory and copy-engine count (CuPy where present, else JAX)."""
    import jax

    info = {"gpu": str(jax.devices()[0].device_kind), "vram_bytes": None, "copy_engines": None}
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["vram_bytes"] = int(props["totalGlobalMem"])
        info["copy_engines"] = int(props["asyncEngineCount"])
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception as exc:  # noqa: BLE001 - CuPy is optional
        log(f"cupy device properties unavailable: {exc}")
        stats = jax.devices()[0].memory_stats() or {}
        info["vram_bytes"] = int(stats.get("bytes_limit", 0))  # XLA's pool limit: a lower bound
    return info


# ---------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------


def build_profile(bench: dict, dense: dict, transfers: dict, info: dict, command: str) -> dict:
    """Assemble the simulator's hardware-profile JSON from the measurements.

    Token counts enter the table only where every format has both the single-expert and the
    grouped figure (a run stopped at its limit leaves gaps); bf16 only where it is complete too.
    """
    ok = lambda c: "total_s" in c
    fmts = sorted({c["fmt"] for c in bench["cells"] if ok(c)})
    have = {(c["fmt"], c["m"], c["g"]): c for c in bench["cells"] if ok(c)}
    tokens = sorted(m for m in {c["m"] for c in bench["cells"]}
                    if all((f, m, g) in have for f in fmts for g in (1, bk.TOP_K)))
    if not tokens:
        raise InputError(None, "no token count has every format measured for 1 and 8 experts")
    fixed_s, gbps = fit_linear(transfers["nbytes"], transfers["seconds"])
    seconds = {f: [have[(f, m, 1)]["total_s"] for m in tokens] for f in fmts}
    grouped = {f: [have[(f, m, bk.TOP_K)]["total_s"] for m in tokens] for f in fmts}
    configs = {f: [have[(f, m, bk.TOP_K)]["config"]["variant"] for m in tokens] for f in fmts}
    for g, table in ((1, seconds), (bk.TOP_K, grouped)):
        b16 = [next((r.get("total_s") for r in bench["bf16"] if r["m"] == m and r["g"] == g), None) for m in tokens]
        if all(v is not None for v in b16):
            table["bf16"] = b16
    xla = {f: [next((r.get("total_s") for r in bench.get("xla", []) if r["fmt"] == f and r["m"] == m
                     and r["g"] == bk.TOP_K), None) for m in tokens] for f in fmts}
    date = datetime.date.today().isoformat()
    return {
        "name": "h200",
        "gpu": info["gpu"],
        "source": f"measured: {command}, {date}, JAX {bench['meta']['jax']}",
        "vram_bytes": info["vram_bytes"],
        "vram_gbps": bench["hbm"]["read_gbps"],
        "hbm_copy_gbps": bench["hbm"]["copy_gbps"],
        "runtime_reserve_bytes": 1073741824,
        "transfer": {"copy_engines": info["copy_engines"] or 1, "fixed_s": fixed_s, "gbps": gbps,
                     "curve": {"nbytes": transfers["nbytes"], "seconds": transfers["seconds"]},
                     "inflight": transfers["inflight"]},
        "expert_compute": {"shape": {"hidden": bk.HIDDEN, "ffn": bk.FFN}, "tokens": tokens, "seconds": seconds,
                           "grouped_seconds": grouped, "grouped_experts": bk.TOP_K, "variants": configs,
                           "xla_grouped_seconds": xla,
                           "note": "device time per call (CUPTI sum of kernel durations) of the Pallas kernels "
                                   "(docs/kernels.md): 'int' = v4 integer dp2a dots on int16 activations "
                                   "(the activation quantization launch included), 'fma' = v3 float32 FMAs, "
                                   "'mma' = v3 bf16 tensor-core dots (M padded to 16); the fastest measured "
                                   "configuration per (format, M) for 8 experts, the same configuration for 1. "
                                   "bf16 = jnp dots on bf16 weights; xla_grouped_seconds = XLA dequantize-then-dot"},
        "dense_compute": {"tokens": dense["tokens"], "seconds": dense["seconds"], "context": dense["context"],
                          "ref_dense_bytes": dense["weight_bytes"], "kv_bytes": dense["kv_bytes"],
                          "note": "one Qwen3-30B-A3B attention layer + router in bf16 jnp (f32 router and norms), "
                                  f"KV cache of {dense['context']} bf16 tokens ({dense['kv_bytes']} bytes) read per "
                                  f"call; ref_dense_bytes = the weights it reads ({dense['weight_bytes']} bytes, bf16), "
                                  "so scaling by a quantized layer's dense bytes does not scale the KV read"},
        "notes": (f"timer {bench['meta']['timer']}; HBM copy {bench['hbm']['copy_gbps']:.0f} GB/s (read+write), "
                  f"reduction read {bench['hbm']['read_gbps']:.0f} GB/s; vram_gbps = the read figure. "
                  "runtime_reserve_bytes not measured (kept from the placeholder). "
                  "Transfers: pinned_host→device jax.device_put, host clock around block_until_ready."),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmoe.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="hardware profile JSON to write (e.g. sim/profiles/h200.json)")
    p.add_argument("--raw-dir", default="results", help="folder for the raw measurements (default: results)")
    p.add_argument("--context", type=int, default=4096, help="KV-cache length of the dense measurement")
    p.add_argument("--quick", action="store_true", help="fewer kernel configurations and repetitions")
    p.add_argument("--deadline-s", type=float, default=600.0, help="stop kernel tuning after this many seconds")
    p.add_argument("--formats", default=",".join(bk.FORMATS), help="comma-separated subset of q2_k,q3_k,q4_k")
    p.add_argument("--wait-pid", type=int, default=None, help="before timing kernels, wait for this process to exit")
    return p.parse_args(argv)


@exit_on_input_error
def main(argv=None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    if args.context < 1:
        raise InputError(None, f"--context must be ≥ 1, not {args.context}")
    formats = bk.parse_list(args.formats, bk.FORMATS)
    command = "python -m jaxmoe.calibrate " + " ".join(sys.argv[1:] if argv is None else argv)
    raw = Path(args.raw_dir)
    info = device_info()
    log(f"device {info}")
    sizes = sorted(set(COPY_SIZES) | set(bk.GGUF_EXPERT_BYTES.values()))
    transfers = measure_transfers(sizes, reps=7 if args.quick else 15, inflight_nbytes=bk.GGUF_EXPERT_BYTES["q4_k"])
    dense = measure_dense(bk.Timer(), bk.TOKENS, args.context, reps=3 if args.quick else 6)
    with atomic_path(raw / "calibrate_raw.json") as tmp:
        tmp.write_text(json.dumps({"device": info, "dense": dense, "transfers": transfers}, indent=1))
    bench = bk.run_bench(formats, bk.TOKENS, quick=args.quick, deadline_s=args.deadline_s, out_dir=raw,
                         wait_pid=args.wait_pid, command=command)
    bk.write_outputs(bench, raw)
    bk.print_table(bench)
    profile = build_profile(bench, dense, transfers, info, command)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"transfer fit: fixed {profile['transfer']['fixed_s'] * 1e6:.1f} us, {profile['transfer']['gbps']:.1f} GB/s; "
          f"inflight {[f'{g:.1f}' for g in transfers['inflight']['aggregate_gbps']]} GB/s")
    print(f"dense: {[f'{s * 1e6:.0f}us' for s in dense['seconds']]}")
    print(f"wrote {args.out} and {raw}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
