"""The cost model: each cost is a small named term, a pure function of a hardware profile.

transfer_s(nbytes): host→device copy of one expert. With a measured curve, piecewise-linear
interpolation between measured sizes (fixed + bytes/bandwidth below the smallest and above the
largest); otherwise fixed_s + nbytes / bandwidth.
expert_compute_s(format, tokens, weights): one expert's SwiGLU FFN, linear interpolation over the
measured token counts, scaled linearly by weights against the measured expert shape (decode
kernels are bandwidth-bound, so time tracks bytes). A format the profile lacks (a mixed
native format such as "q4_k+q6_k_down") is priced from the nearest measured format by bytes.
expert_launch_split: when the profile also measured one launch of G experts, a layer's experts of
one format cost a fixed launch part plus a per-expert part (see its docstring).
dense_s(tokens, dense_bytes): attention, router and norms of one layer, scaled by dense bytes.
head_s(head_bytes): output head of one decoded token at the profile's device bandwidth.
"""
from __future__ import annotations

import numpy as np

from sim.formats import FORMATS
from sim.profiles import HardwareProfile

GB = 1e9  # bandwidths are in GB/s = 1e9 bytes/s


def transfer_s(hw: HardwareProfile, nbytes: int | np.ndarray) -> np.ndarray | float:
    """Seconds for one host→device copy of `nbytes` on an idle copy engine."""
    nbytes = np.asarray(nbytes, dtype=np.float64)
    linear = hw.transfer_fixed_s + nbytes / (hw.transfer_gbps * GB)
    if hw.curve_nbytes is None:
        out = linear
    else:
        inside = np.interp(nbytes, hw.curve_nbytes, hw.curve_s)
        out = np.where((nbytes >= hw.curve_nbytes[0]) & (nbytes <= hw.curve_nbytes[-1]), inside, linear)
    return float(out) if out.ndim == 0 else out


def _bytes_per_weight(fmt: str) -> float:
    f = FORMATS[fmt]
    return f.block_bytes / f.block_weights


def _table_s(hw: HardwareProfile, table: dict[str, np.ndarray], fmt: str, tokens: int, weights: int,
             nbytes: int | None) -> float:
    """Interpolate a per-format table over tokens; scale by weights; price unmeasured formats by bytes."""
    scale = weights / hw.compute_shape_weights
    if fmt in table:
        return float(np.interp(tokens, hw.compute_tokens, table[fmt])) * scale
    # Unmeasured (mixed) format: price it by bytes against the measured format nearest in bytes/weight.
    bpw = (nbytes / weights) if nbytes else _bytes_per_weight(fmt.split("+")[0])
    measured = [f for f in table if f in FORMATS]
    nearest = min(measured, key=lambda f: abs(_bytes_per_weight(f) - bpw))
    base = float(np.interp(tokens, hw.compute_tokens, table[nearest])) * scale
    return base * bpw / _bytes_per_weight(nearest)


def expert_compute_s(hw: HardwareProfile, fmt: str, tokens: int, weights: int, nbytes: int | None = None) -> float:
    """Seconds to compute one expert of `weights` weights in `fmt` for `tokens` tokens (its own launch)."""
    return _table_s(hw, hw.compute_s, fmt, tokens, weights, nbytes)


def expert_launch_split(hw: HardwareProfile, fmt: str, tokens: int, weights: int,
                        nbytes: int | None = None) -> tuple[float, float]:
    """(per-launch, per-expert) seconds of a grouped expert launch in `fmt`.

    With single-expert time s and G-expert grouped time g measured, a launch of n experts costs
    a + n·b with b = (g − s)/(G − 1) and a = s − b: a latency-bound kernel has b ≈ 0, a bandwidth-
    bound one a ≈ 0. Without grouped measurements every expert is its own launch (a = 0, b = s).
    """
    single = expert_compute_s(hw, fmt, tokens, weights, nbytes)
    if not hw.grouped_s:
        return 0.0, single
    grouped = _table_s(hw, hw.grouped_s, fmt, tokens, weights, nbytes)
    per_expert = min(single, max(0.0, (grouped - single) / (hw.grouped_experts - 1)))
    return single - per_expert, per_expert


def dense_s(hw: HardwareProfile, tokens: int, dense_bytes: int) -> float:
    """Seconds for one layer's attention, router and norms over `tokens` tokens."""
    base = float(np.interp(tokens, hw.dense_tokens, hw.dense_s))
    if hw.dense_ref_bytes and dense_bytes:
        return base * dense_bytes / hw.dense_ref_bytes
    return base


def head_s(hw: HardwareProfile, head_bytes: int) -> float:
    """Seconds to read the output head once (per decoded token)."""
    return head_bytes / (hw.vram_gbps * GB) if hw.vram_gbps > 0 else 0.0
