"""Datasheet-scaled hardware profiles: `python -m sim.datasheet` rewrites the RTX JSON files.

These are estimates, not measurements, and their `source` says so. Expert and dense compute are
priced as memory-bound reads at a fraction of the datasheet VRAM bandwidth, floored by a
tensor-core FLOP rate and a kernel-launch cost; transfers are fixed cost + bytes / pinned PCIe
bandwidth. The H200 profile from architecture-doc figures is the fallback until
`python -m jaxmoe.calibrate` replaces sim/profiles/h200.json with kernel measurements.
"""
from __future__ import annotations

import argparse
import json

from sim.formats import FORMATS
from sim.io import write_text_atomic
from sim.profiles import GIB, PROFILE_DIR, qwen3_30b_a3b

TOKENS = [1, 2, 4, 8, 16, 64, 256, 512]
HIDDEN, FFN = 2048, 768  # Qwen3-30B-A3B expert shape the tables are priced for
CONTEXT = 4096  # tokens of KV cache read by attention in the dense estimate
BW_EFFICIENCY = 0.7  # achieved / datasheet VRAM bandwidth for dequant-matmul kernels
FLOP_EFFICIENCY = 0.4  # achieved / datasheet dense fp16 tensor rate

GPUS = {
    "rtx3060-12gb": dict(
        gpu="NVIDIA GeForce RTX 3060 12GB",
        vram_bytes=12 * GIB,
        vram_gbps=360.0,  # GB/s, GDDR6 192-bit 15 Gbps (datasheet)
        tflops=51.0,  # TFLOP/s dense fp16 tensor with fp16 accumulate (datasheet)
        pcie_gbps=25.0,  # GB/s, PCIe 4.0 x16 pinned, achieved (architecture doc)
        fixed_s=10e-6,  # s per cudaMemcpyAsync call
        launch_s=5e-6,  # s per kernel launch
        copy_engines=1,
    ),
    "rtx4070-12gb": dict(
        gpu="NVIDIA GeForce RTX 4070 12GB",
        vram_bytes=12 * GIB,
        vram_gbps=504.0,  # GB/s, GDDR6X 192-bit 21 Gbps (datasheet)
        tflops=117.0,  # TFLOP/s dense fp16 tensor with fp16 accumulate (datasheet)
        pcie_gbps=25.0,  # GB/s, PCIe 4.0 x16 pinned, achieved (architecture doc)
        fixed_s=10e-6,
        launch_s=4e-6,
        copy_engines=1,
    ),
}


def _kernel_s(nbytes: float, flops: float, gpu: dict, bw_gbps: float) -> float:
    mem = nbytes / (BW_EFFICIENCY * bw_gbps * 1e9)
    math = flops / (FLOP_EFFICIENCY * gpu["tflops"] * 1e12)
    return max(mem, math) + gpu["launch_s"]


KERNEL_PROFILE = "h200"  # the measured profile whose kernel times set the low-bit formats' cost relative to Q4_K
LOW_BIT = ("q2_k", "q3_k")


def measured_low_bit_ratio(fmt: str, tokens: int) -> float:
    """Measured time of a `fmt` expert over a Q4_K one at `tokens` (the kernels of KERNEL_PROFILE); 1.0 where unmeasured.

    The decode kernels are not bandwidth-bound: on the H200 a Q2_K expert takes 7.84 µs and a Q4_K one
    7.92 µs at one token, so pricing a low-bit expert by its bytes (0.58× for Q2_K) overstates its gain.
    """
    doc = json.loads((PROFILE_DIR / f"{KERNEL_PROFILE}.json").read_text())["expert_compute"]
    measured = [int(t) for t in doc["tokens"]]
    if tokens not in measured or fmt not in doc["seconds"] or "q4_k" not in doc["seconds"]:
        return 1.0
    i = measured.index(tokens)
    return float(doc["seconds"][fmt][i]) / float(doc["seconds"]["q4_k"][i])


def _expert_table(gpu: dict, bw_gbps: float) -> dict[str, list[float]]:
    """Seconds of one Qwen3-30B-A3B expert per format at each of TOKENS, priced by `_kernel_s`.

    Q2_K and Q3_K are not priced by their bytes: they cost the Q4_K estimate times the measured kernel
    ratio (`measured_low_bit_ratio`; equal cost where unmeasured).
    """
    weights = 3 * HIDDEN * FFN
    table = {fmt: [_kernel_s(FORMATS[fmt].nbytes(weights), 2 * weights * t, gpu, bw_gbps) for t in TOKENS]
             for fmt in ("q4_k", "q6_k", "q8_0", "bf16")}
    for fmt in LOW_BIT:
        table[fmt] = [q4 * measured_low_bit_ratio(fmt, t) for q4, t in zip(table["q4_k"], TOKENS)]
    return {fmt: table[fmt] for fmt in ("q2_k", "q3_k", "q4_k", "q6_k", "q8_0", "bf16")}


def datasheet_profile(name: str) -> dict:
    """A hardware profile dict priced from `GPUS[name]` datasheet figures."""
    gpu = GPUS[name]
    model = qwen3_30b_a3b()
    seconds = _expert_table(gpu, gpu["vram_gbps"])
    dense_ref = max(model.dense_bytes)
    kv_layer = model.kv_bytes_per_token // model.n_layers * CONTEXT
    attn_flops = lambda t: 2 * dense_ref * 2 * t + 4 * 32 * 128 * CONTEXT * t  # noqa: E731  (weights ~1 B/w at Q4)
    dense = [8 * gpu["launch_s"] + _kernel_s(dense_ref + kv_layer, attn_flops(t), gpu, gpu["vram_gbps"]) - gpu["launch_s"] for t in TOKENS]
    return {
        "name": name,
        "gpu": gpu["gpu"],
        "source": (
            "datasheet-scaled estimate (python -m sim.datasheet): memory-bound at "
            f"{BW_EFFICIENCY:.0%} of datasheet VRAM bandwidth, {FLOP_EFFICIENCY:.0%} of datasheet fp16 tensor rate, "
            f"Q2_K/Q3_K experts at the Q4_K estimate × the measured {KERNEL_PROFILE} kernel ratio (equal where "
            "unmeasured), PCIe 4.0 x16 pinned at 25 GB/s; NOT measured"
        ),
        "vram_bytes": gpu["vram_bytes"],
        "vram_gbps": BW_EFFICIENCY * gpu["vram_gbps"],
        "runtime_reserve_bytes": int(0.75 * GIB),
        "transfer": {"copy_engines": gpu["copy_engines"], "fixed_s": gpu["fixed_s"], "gbps": gpu["pcie_gbps"]},
        "expert_compute": {"shape": {"hidden": HIDDEN, "ffn": FFN}, "tokens": TOKENS, "seconds": seconds},
        "dense_compute": {
            "tokens": TOKENS,
            "seconds": dense,
            "context": CONTEXT,
            "ref_dense_bytes": dense_ref,
            "note": "attention weights + KV cache read at the given context + router + norms, 8 launches",
        },
    }


def h200_architecture_profile() -> dict:
    """The H200 profile from the architecture doc's measured figures (until jaxmoe.calibrate runs)."""
    gpu = dict(tflops=990.0, launch_s=4e-6)
    hbm = 3700.0  # GB/s measured read+write (architecture doc)
    seconds = _expert_table(gpu, hbm)
    model = qwen3_30b_a3b()
    dense_ref = max(model.dense_bytes)
    kv_layer = model.kv_bytes_per_token // model.n_layers * CONTEXT
    dense = [8 * gpu["launch_s"] + _kernel_s(dense_ref + kv_layer, 4 * dense_ref * t, gpu, hbm) - gpu["launch_s"] for t in TOKENS]
    mib = 2**20
    return {
        "name": "h200",
        "gpu": "NVIDIA H200",
        "source": (
            "architecture-doc figures (pinned jax.device_put 4.3 GB/s @1 MiB, 14 @4 MiB, 30 @16 MiB, 48 @256 MiB; "
            "HBM 3.7 TB/s) with compute priced memory-bound at 70% of HBM; placeholder until "
            "python -m jaxmoe.calibrate --out sim/profiles/h200.json"
        ),
        "vram_bytes": 141 * 10**9,
        "vram_gbps": BW_EFFICIENCY * hbm,
        "runtime_reserve_bytes": int(1 * GIB),
        "transfer": {
            "copy_engines": 1,
            "fixed_s": 0.25e-3,
            "gbps": 48.0,
            "curve": {
                "nbytes": [1 * mib, 4 * mib, 16 * mib, 256 * mib],
                "seconds": [mib / 4.3e9, 4 * mib / 14e9, 16 * mib / 30e9, 256 * mib / 48e9],
            },
        },
        "expert_compute": {"shape": {"hidden": HIDDEN, "ffn": FFN}, "tokens": TOKENS, "seconds": seconds},
        "dense_compute": {"tokens": TOKENS, "seconds": dense, "context": CONTEXT, "ref_dense_bytes": dense_ref},
    }


def main(argv=None) -> None:
    """Rewrite the datasheet-scaled profiles in sim/profiles/."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--h200", action="store_true",
                    help="also write h200.json from architecture-doc figures (REPLACES the measured profile)")
    args = ap.parse_args(argv)
    profiles = {name: datasheet_profile(name) for name in GPUS}
    if args.h200:
        profiles["h200"] = h200_architecture_profile()
    for name, doc in profiles.items():
        write_text_atomic(PROFILE_DIR / f"{name}.json", json.dumps(doc, indent=1) + "\n")
        print(f"wrote {PROFILE_DIR / (name + '.json')}")


if __name__ == "__main__":
    main()
