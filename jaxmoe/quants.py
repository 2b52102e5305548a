"""GGUF K-quant formats in numpy: ggml's reference quantizers and the dequantizers, byte-exact.

Formats (ggml's block layouts; sizes come from `sim.formats.FORMATS`):

| type | weights/block | bytes | layout (in byte order)                                         | weight              |
|------|---------------|-------|----------------------------------------------------------------|---------------------|
| Q2_K | 256           | 84    | scales[16] (4-bit scale, 4-bit min), qs[64] (2-bit), d, dmin   | d*sc*q - dmin*m     |
| Q3_K | 256           | 110   | hmask[32] (bit 2), qs[64] (bits 0-1), scales[12] (6-bit), d    | d*(sc-32)*(q-4)     |
| Q4_K | 256           | 144   | d, dmin, scales[12] (6-bit scale and min), qs[128] (4-bit)     | d*sc*q - dmin*m     |
| Q6_K | 256           | 210   | ql[128] (bits 0-3), qh[64] (bits 4-5), scales[16] (int8), d    | d*sc*(q-32)         |
| Q8_0 | 32            | 34    | d, qs[32] (int8)                                               | d*q                 |

`d`/`dmin` are IEEE half floats (little endian). A K-quant super-block of 256 weights is split into
sub-blocks (16 of 16 weights, or 8 of 32 for Q4_K) each with its own scale (and min), and the
sub-block scales are themselves quantized against the super-block's `d` (and `dmin`).

Quantization (ggml's `quantize_row_*_ref`, the deterministic reference used to create model files):
1. Per sub-block, fit a scale (and min) with an iterative search:
   - `make_qkx2_quants` (Q2_K, Q4_K: asymmetric, x ≈ scale*L - min, L in [0, nmax]): start from the
     min/max grid, then try `nstep+1` grid spacings (nmax + rmin + rdelta*is)/(max - min); for each
     re-round, solve the weighted least-squares (scale, min) in closed form and keep it if the
     weighted error (abs for Q2_K, squared for Q4_K) drops. The min found so far feeds the next try.
   - `make_q3_quants` (Q3_K, symmetric, L in [-nmax, nmax-1]): round against -nmax/max, then up to 5
     passes of coordinate descent: re-round one weight at a time to the value that would maximise
     (Σ w x L)² / Σ w L² with weights w = x², accepting a change only if that ratio improves.
   - `make_qx_quants` (Q6_K, symmetric, rmse_type 1, w = x²): try 19 grid spacings -(nmax + 0.1*is)/max
     and keep the one with the best (Σ w x L)² / Σ w L²; scale = Σ w x L / Σ w L².
2. Quantize the sub-block scales (4, 6 or 8 bits) against the largest one; store d (and dmin) as fp16.
3. Re-round every weight against the *stored* (decoded) sub-block scale and min.
ggml computes in float32 and sums sequentially; `nearest_int` is the 1.5·2²³ magic-number
round-half-to-even. This port mirrors that arithmetic order operation by operation, vectorised across
sub-blocks (loops run over the search iterations and over the 16/32 positions of a sub-block, never
over blocks), so the bytes equal ggml's for the same float32 input. Half-float conversions use
numpy's float32→float16 cast (round to nearest even), as ggml's F16C/software paths do.

Weighted quantization (`quant_weights`, one importance per input column: an imatrix row, see
jaxmoe/imatrix.py) follows ggml's `quantize_q*_K(src, dst, nrows, n_per_row, quant_weights)`, i.e.
`quantize_row_{q2_K,q3_K,q4_K,q6_K}_impl`: per-weight fit weights qw·sqrt(σ² + x²) (σ² the block's
mean x², ×2 for Q3_K/Q4_K; Q6_K uses qw itself); Q2_K/Q4_K fit sub-blocks with `make_qkx3_quants`
(37 steps) and the sub-block scales and mins with `make_qp_quants` weighted by each sub-block's
Σ weight; Q3_K fits both levels with the weighted `make_qx_quants`. Q8_0 ignores the weights, as
ggml does.

Source: ggml/src/ggml-quants.c (ggml-org/ggml, 2026): quantize_row_{q2_K,q3_K,q4_K,q6_K,q8_0}_ref,
quantize_row_{q2_K,q3_K,q4_K,q6_K}_impl, make_qkx2_quants, make_qkx3_quants, make_qp_quants,
make_q3_quants, make_qx_quants, nearest_int, dequantize_row_*; block structs in
ggml/src/ggml-common.h. Class layout after gguf-py's gguf/quants.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from sim.formats import FORMATS

QK_K = 256  # weights per K-quant super-block
QK8_0 = 32  # weights per Q8_0 block
GROUP_MAX_EPS = np.float32(1e-15)  # below this |x| a group counts as all zero
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer (ties to even)
_F32 = np.float32

# Blocks handled per vectorised step: bounds temporaries (quantize) and keeps them in cache (dequantize).
QUANT_CHUNK_BLOCKS = 2048
DEQUANT_CHUNK_BLOCKS = 1024

QUANT_TYPES: dict[str, type[QuantFormat]] = {}


# ----------------------------------------------------------------------------------------------------
# float32 helpers mirroring ggml's scalar C
# ----------------------------------------------------------------------------------------------------
def nearest_int(fval: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: float32 → int32 via the magic-number add (bit-exact, also out of range)."""
    val = np.asarray(fval, dtype=_F32) + _MAGIC
    return (val.view(np.int32) & 0x007FFFFF) - 0x00400000


def _nint_f32(fval: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """`MAX(lo, MIN(hi, nearest_int(fval)))` as float32 (small exact integers, ready for float math)."""
    f = np.asarray(fval, dtype=_F32)
    r = f + _MAGIC  # rounds to an integer, ties to even, for |f| < 2**22 ...
    r -= _MAGIC
    if f.size and not np.abs(f).max() < _F32(4194303):  # ... beyond (and NaN) take ggml's bit trick literally
        big = ~(np.abs(f) < _F32(4194303))
        r[big] = nearest_int(f[big])
    np.maximum(r, _F32(lo), out=r)
    np.minimum(r, _F32(hi), out=r)
    return r


def _seqsum(a: np.ndarray, from_first: bool = False) -> np.ndarray:
    """Σ over axis 0 in index order, in float32 — C's `float s = 0; for (i...) s += a[i]` (numpy's sum is
    pairwise). `from_first`: C's `float s = a[0]; for (i = 1...)`, which differs only in keeping a -0."""
    s = a[0].copy() if from_first else a[0] + _F32(0)  # 0 + -0 is +0, as in C
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def fp16_bits(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: float32 → IEEE half (round to nearest even), as uint16 bits."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=_F32).astype(np.float16).view(np.uint16)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of uint16 bits (exact)."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(_F32)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over axis 0: largest |x| and the signed x where it first occurs — C's scan
    `amax = max = 0; if (|x| > amax) ...`, which skips NaN and leaves (0, +0) for all-zero columns."""
    ax = np.abs(x)
    ax = np.where(np.isnan(ax), _F32(-1), ax)
    idx = ax.argmax(axis=0)
    cols = np.arange(x.shape[1])
    amax = ax[idx, cols]
    return np.maximum(amax, _F32(0)), np.where(amax > 0, x[idx, cols], _F32(0))


# ----------------------------------------------------------------------------------------------------
# ggml's per-group scale searches; x is (n, R): column r is one group of n weights
# ----------------------------------------------------------------------------------------------------
def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's `make_qkx2_quants` on columns of x: (scale (R,), the_min (R,), L (n, R) float32 in [0, nmax]).

    With explicit weights this is also ggml's `make_qkx3_quants` (the imatrix path): the two differ only
    in qkx3's `max <= min` early exit, which equals qkx2's `max == min` because min <= max always."""
    w = weights
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = _seqsum(w, from_first=True)
    sum_x = _seqsum(w * x, from_first=True)
    mn = np.minimum(mn, _F32(0))  # if (min > 0) min = 0
    flat = mx == mn  # such groups return at once: L = 0, scale = 0, the_min = -min
    mn_flat = mn.copy()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(nmax) / (mx - mn)
        scale = _F32(1) / iscale
        L = _nint_f32(iscale * (x - mn), 0, nmax)
        diff = scale * L + mn - x
        best_error = _seqsum(w * (np.abs(diff) if use_mad else diff * diff))
        for step in range(nstep + 1):
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (mx - mn)
            laux = _nint_f32(iscale * (x - mn), 0, nmax)
            wl = w * laux
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * laux)
            sum_xl = _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, _F32(0), this_min)
            diff = this_scale * laux + this_min - x
            cur_error = _seqsum(w * (np.abs(diff) if use_mad else diff * diff))
            better = (D > 0) & (cur_error < best_error)
            np.copyto(L, laux, where=better)
            np.copyto(best_error, cur_error, where=better)
            np.copyto(scale, this_scale, where=better)
            np.copyto(mn, this_min, where=better)
    L = np.where(flat, _F32(0), L)
    scale = np.where(flat, _F32(0), scale)
    mn = np.where(flat, mn_flat, mn)
    return scale.astype(_F32), (-mn).astype(_F32), L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_q3_quants(do_rmse=true)` on columns of x: (scale (R,), L (n, R) float32 in [0, 2*nmax))."""
    n = x.shape[0]
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(-nmax) / mx
        L = _nint_f32(iscale * x, -nmax, nmax - 1)
        w = x * x
        wx = w * x
        sumlx = _seqsum(wx * L)
        suml2 = _seqsum(w * L * L)
        # Coordinate descent; a column whose pass changes nothing would change nothing later either,
        # so running all 5 passes on every column equals ggml's per-group early exit.
        for _itry in range(5):
            for i in range(n):
                Li = L[i]
                slx0 = sumlx - wx[i] * Li
                sl20 = suml2 - w[i] * Li * Li
                new_l = _nint_f32(x[i] * sl20 / slx0, -nmax, nmax - 1)
                slx = slx0 + wx[i] * new_l
                sl2 = sl20 + w[i] * new_l * new_l
                accept = (slx0 > 0) & (new_l != Li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(accept, new_l, Li)
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    L = np.where(zero, _F32(0), L + _F32(nmax))
    return np.where(zero, _F32(0), scale).astype(_F32), L


def make_qx_quants(x: np.ndarray, nmax: int,
                   weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qx_quants(rmse_type=1, qw)` on columns of x: (scale (R,), L (n, R) in [0, 2*nmax)).

    `weights` (n, R) is ggml's `qw`; None means qw=NULL, whose rmse_type 1 weights are x²."""
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x if weights is None else weights
    wx = w * x

    def fit(iscale):
        l = _nint_f32(iscale * x, -nmax, nmax - 1)
        return l, _seqsum(wx * l), _seqsum(w * l * l)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l, sumlx, suml2 = fit(_F32(-nmax) / mx)
        L = l + _F32(nmax)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, l + _F32(nmax), L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, _F32(0), scale).astype(_F32), np.where(zero, _F32(0), L)


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qp_quants` on columns of x (the sub-block scales or mins of the imatrix path, all >= 0
    in practice): (scale (R,), L (n, R) float32). x ≈ scale*L, L in [0, nmax], fitted under `weights`.

    ggml stores L in a uint8 and clamps it only from above, so a negative level wraps to 256 + l; the
    stored value then feeds the later sums. L holds those stored (wrapped) values, as ggml's bytes do."""
    n = x.shape[0]
    w = weights
    mx = np.maximum(_F32(0), x.max(axis=0))  # float max = 0; MAX(max, x[i])
    zero = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(nmax) / mx
        stored = (nearest_int(iscale * x) & 0xFF).astype(_F32)  # L[i] = nearest_int(...): uint8 store
        scale = _F32(1) / iscale
        diff = x - scale * stored
        best_mse = _seqsum(w * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (_F32(0.1) * _F32(step) + _F32(nmax)) / mx
            scale_is = _F32(1) / iscale_is
            l = np.minimum(nearest_int(iscale_is * x), nmax).astype(_F32)
            diff = x - scale_is * l
            mse = _seqsum(w * diff * diff)
            better = mse < best_mse
            best_mse = np.where(better, mse, best_mse)
            iscale = np.where(better, iscale_is, iscale)
        l_int = np.minimum(nearest_int(iscale * x), nmax)
        l = l_int.astype(_F32)
        L = (l_int & 0xFF).astype(_F32)
        wx = w * x
        sumlx = _seqsum(wx * l)
        suml2 = _seqsum(w * l * l)
        # Coordinate descent as in make_q3_quants; a pass that changes nothing ends ggml's loop, and would
        # change nothing again, so 5 passes everywhere equal ggml's early exit.
        for _itry in range(5):
            for i in range(n):
                Li = L[i]
                slx0 = sumlx - wx[i] * Li
                sl20 = suml2 - w[i] * Li * Li
                new_int = np.minimum(nearest_int(x[i] * sl20 / slx0), nmax)
                new_l = new_int.astype(_F32)
                slx = slx0 + wx[i] * new_l
                sl2 = sl20 + w[i] * new_l * new_l
                accept = (slx0 > 0) & (sl20 > 0) & (new_int != Li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(accept, (new_int & 0xFF).astype(_F32), Li)
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    return np.where(zero, _F32(0), scale).astype(_F32), np.where(zero, _F32(0), L)


def _groups(blocks: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) → (n, nb*256/n): column g is group g of n consecutive weights (block-major)."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _ungroup(cols: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of `_groups`: (n, nb*256/n) → (nb, 256)."""
    return cols.T.reshape(nb, -1)


def _imatrix_weights(blocks: np.ndarray, x: np.ndarray, quant_weights: np.ndarray, n: int,
                     sigma_factor: np.float32) -> np.ndarray:
    """ggml's imatrix weights for the groups x (n, R) of `blocks` (nb, 256): qw * sqrt(sigma2 + x²), with
    sigma2 = sigma_factor * Σ(block x²) / 256 (factor 1 for Q2_K, 2 for Q3_K and Q4_K)."""
    sumx2 = _seqsum((blocks * blocks).T)  # (nb,)
    sigma2 = sigma_factor * sumx2 / _F32(QK_K)
    sigma2 = np.repeat(sigma2, QK_K // n)  # per group column
    return _groups(quant_weights, n) * np.sqrt(sigma2 + x * x)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) values 0..3 → qs (nb, 64): per 128-weight half, byte l holds L[l + 32k] at bits 2k."""
    # (nb, 2 halves, 4 shifts, 32)
    L4 = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    qs = L4[:, :, 0] | (L4[:, :, 1] << 2) | (L4[:, :, 2] << 4) | (L4[:, :, 3] << 6)
    return qs.reshape(-1, QK_K // 4)


def _u16_bytes(bits: np.ndarray) -> np.ndarray:
    """uint16 (nb,) → little-endian bytes (nb, 2)."""
    return bits.astype("<u2").reshape(-1, 1).view(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------
class QuantFormat:
    """A GGUF block format: subclasses write `quantize_blocks` / `dequantize_blocks`; rows are reshaped here."""

    name: ClassVar[str]
    ggml_type: ClassVar[int]  # GGMLQuantizationType value
    block_weights: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, name: str, ggml_type: int, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name = name
        cls.ggml_type = ggml_type
        cls.block_weights = FORMATS[name].block_weights
        cls.type_size = FORMATS[name].block_bytes
        QUANT_TYPES[name] = cls

    def __init__(self):
        raise TypeError("format classes are used through their classmethods")

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
        """(n, block_weights) float32 → (n, type_size) uint8, ggml's reference algorithm; `quant_weights`
        (n, block_weights) float32 >= 0, the importance of each weight, selects ggml's imatrix path."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n, type_size) uint8 → (n, block_weights) float32."""
        raise NotImplementedError

    @classmethod
    def byte_shape(cls, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the quantized bytes of a float tensor of `shape` (last axis in whole blocks)."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[-1] % cls.block_weights:
            raise ValueError(f"{cls.name}: last axis of shape {shape} is not a multiple of {cls.block_weights}")
        return (*shape[:-1], shape[-1] // cls.block_weights * cls.type_size)

    @classmethod
    def quantize(cls, array: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
        """Quantize a float array (last axis a multiple of the block) → uint8 (..., row_bytes).

        `quant_weights`: importance per input column (ggml's `quant_weights`, an imatrix row), float >= 0 of
        shape (K,) for every row, or array.shape[:-2] + (K,) for one vector per matrix (e.g. per expert of
        an (E, N, K) tensor). None is ggml's reference path (`quantize_row_*_ref`), unchanged."""
        arr = np.asarray(array)
        out_shape = cls.byte_shape(arr.shape)
        blocks = np.ascontiguousarray(arr, dtype=_F32).reshape(-1, cls.block_weights)
        bad = ~np.isfinite(blocks)
        if bad.any():
            raise ValueError(f"{cls.name}: cannot quantize {int(bad.sum())} non-finite value(s) (NaN or Inf)")
        qw = None if quant_weights is None else _row_weights(cls, arr.shape, quant_weights)
        out = np.empty((blocks.shape[0], cls.type_size), dtype=np.uint8)
        for start in range(0, blocks.shape[0], QUANT_CHUNK_BLOCKS):
            stop = start + QUANT_CHUNK_BLOCKS
            block_qw = None if qw is None else qw.blocks(start, stop)
            out[start:stop] = cls.quantize_blocks(blocks[start:stop], block_qw)
        return out.reshape(out_shape)

    @classmethod
    def dequantize(cls, qbytes: np.ndarray | bytes, shape: Sequence[int]) -> np.ndarray:
        """Dequantize bytes of a tensor of float `shape` → float32 array of that shape."""
        shape = tuple(int(s) for s in shape)
        n_bytes = int(np.prod(cls.byte_shape(shape)))
        raw = np.frombuffer(qbytes, dtype=np.uint8) if isinstance(qbytes, (bytes, bytearray, memoryview)) \
            else np.ascontiguousarray(qbytes).view(np.uint8).reshape(-1)
        if raw.size != n_bytes:
            raise ValueError(f"{cls.name}: {raw.size} bytes given, shape {shape} needs {n_bytes}")
        blocks = raw.reshape(-1, cls.type_size)
        out = np.empty((blocks.shape[0], cls.block_weights), dtype=_F32)
        with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN half-float scales decode as ggml's do
            for start in range(0, blocks.shape[0], DEQUANT_CHUNK_BLOCKS):
                out[start:start + DEQUANT_CHUNK_BLOCKS] = cls.dequantize_blocks(
                    blocks[start:start + DEQUANT_CHUNK_BLOCKS])
        return out.reshape(shape)


class Q2_K(QuantFormat, name="q2_k", ggml_type=10):
    """2.625 bpw: 16 groups of 16, x = d*sc*q - dmin*m with 4-bit sc, m and 2-bit q."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
        """ggml's `quantize_row_q2_K_ref`, or with `quant_weights` its `quantize_row_q2_K_impl`."""
        nb = blocks.shape[0]
        x = _groups(blocks, 16)  # (16, nb*16)
        if quant_weights is None:
            scales, mins, L = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
            # (nb, 16)
            scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
            max_scale = np.maximum(scales.max(axis=1), _F32(0))
            max_min = np.maximum(mins.max(axis=1), _F32(0))
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = nearest_int((_F32(15) / max_scale)[:, None] * scales)
                lm = nearest_int((_F32(15) / max_min)[:, None] * mins)
            has_s, has_m = max_scale > 0, max_min > 0
            sc = np.where(has_s[:, None], ls & 0xFF, 0)
            sc = np.where(has_m[:, None], (sc | (lm << 4)) & 0xFF, sc).astype(np.uint8)
            d_bits = fp16_bits(np.where(has_s, max_scale / _F32(15), _F32(0)))
            dmin_bits = fp16_bits(np.where(has_m, max_min / _F32(15), _F32(0)))
        else:
            weight = _imatrix_weights(blocks, x, quant_weights, 16, _F32(1))
            scales, mins, L = make_qkx2_quants(x, weight, 3, -0.9, 0.05, 36, False)  # make_qkx3_quants
            sw = _seqsum(weight).reshape(nb, 16).T  # (16, nb)
            dm, ls = make_qp_quants(scales.reshape(nb, 16).T, 15, sw)
            mm, lm = make_qp_quants(mins.reshape(nb, 16).T, 15, sw)
            ls, lm = ls.T.astype(np.uint8), lm.T.astype(np.uint8)  # (nb, 16) stored uint8 levels
            sc = ls | (lm << 4)  # uint8: bits shifted out are dropped, as in ggml's store
            d_bits, dmin_bits = fp16_bits(dm), fp16_bits(mm)
        # re-round against the stored scales; (nb, 16) per group
        dl = fp16_value(d_bits)[:, None] * (sc & 0xF).astype(_F32)
        ml = fp16_value(dmin_bits)[:, None] * (sc >> 4).astype(_F32)
        xb = blocks.reshape(nb, 16, 16)
        with np.errstate(divide="ignore", invalid="ignore"):
            l2 = _nint_f32((xb + ml[:, :, None]) / dl[:, :, None], 0, 3)
        Lb = np.where((dl != 0)[:, :, None], l2, _ungroup(L, nb).reshape(nb, 16, 16)).reshape(nb, QK_K)
        return np.concatenate([sc, _pack_2bit(Lb), _u16_bytes(d_bits), _u16_bytes(dmin_bits)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's `dequantize_row_q2_K`: y = (d*(sc & 15))*q - dmin*(sc >> 4)."""
        nb = blocks.shape[0]
        scales = blocks[:, :16]
        qs = blocks[:, 16:80].reshape(nb, 2, 1, 32)  # (nb, half, ., 32)
        d = blocks[:, 80:82].view(np.float16).astype(_F32)  # (nb, 1)
        dmin = blocks[:, 82:84].view(np.float16).astype(_F32)
        # (nb, 2 halves, 4 shifts, 2 groups, 1): group g = 8*half + 2*shift + (l >= 16)
        dl = (d * (scales & 0xF).astype(_F32)).reshape(nb, 2, 4, 2, 1)
        ml = (dmin * (scales >> 4).astype(_F32)).reshape(nb, 2, 4, 2, 1)
        y = np.empty((nb, 2, 4, 2, 16), dtype=_F32)
        for k in range(4):
            # shift k: bits 2k..2k+1 of each qs byte (uint8 bit ops, then one cast to float32)
            y[:, :, k] = ((qs[:, :, 0] >> (2 * k)) & 3).reshape(nb, 2, 2, 16)
        y *= dl
        y -= ml
        return y.reshape(nb, QK_K)


class Q3_K(QuantFormat, name="q3_k", ggml_type=11):
    """3.4375 bpw: 16 groups of 16, x = d*(sc-32)*(q-4) with 6-bit sc and 3-bit q (high bit in hmask)."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
        """ggml's `quantize_row_q3_K_ref`, or with `quant_weights` its `quantize_row_q3_K_impl`."""
        nb = blocks.shape[0]
        x = _groups(blocks, 16)  # (16, nb*16)
        if quant_weights is None:
            scales, L = make_q3_quants(x, 4)
            scales = scales.reshape(nb, 16)
            _, max_scale = _first_absmax(scales.T)
            has = max_scale != 0
            with np.errstate(divide="ignore", invalid="ignore"):
                iscale = _F32(-32) / max_scale
                l = nearest_int(iscale[:, None] * scales)
            l = ((l + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
            l = np.where(has[:, None], np.clip(l, -32, 31) + 32, 0).astype(np.uint8)  # (nb, 16) in 0..63
            with np.errstate(divide="ignore"):
                d_float = np.where(has, _F32(1) / iscale, _F32(0))
        else:
            weight = _imatrix_weights(blocks, x, quant_weights, 16, _F32(2))
            scales, L = make_qx_quants(x, 4, weight)
            sw = _seqsum(weight).reshape(nb, 16).T  # (16, nb)
            d_float, ls = make_qx_quants(scales.reshape(nb, 16).T, 32, sw)
            l = ls.T.astype(np.uint8)  # (nb, 16) in 0..63
        sb = np.empty((nb, 12), dtype=np.uint8)
        sb[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
        hi = l >> 4  # (nb, 16) 2-bit high parts; byte 8 + j%4 holds j's at bits 2*(j//4)
        sb[:, 8:] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
        d_bits = fp16_bits(d_float)
        # re-round against the stored scales (unpacking gives back l); (nb, 16)
        dl = fp16_value(d_bits)[:, None] * (l.astype(np.int32) - 32).astype(_F32)
        xb = blocks.reshape(nb, 16, 16)
        with np.errstate(divide="ignore", invalid="ignore"):
            l2 = _nint_f32(xb / dl[:, :, None], -4, 3) + _F32(4)
        Lb = np.where((dl != 0)[:, :, None], l2, _ungroup(L, nb).reshape(nb, 16, 16))
        Lb = Lb.astype(np.uint8).reshape(nb, QK_K)
        # weight j's bit 2 goes to hmask[j % 32] bit j // 32; (nb, 8 bits, 32)
        high = (Lb > 3).reshape(nb, 8, 32).astype(np.uint8)
        hmask = np.zeros((nb, 32), dtype=np.uint8)
        for b in range(8):
            hmask |= high[:, b] << b
        qs = _pack_2bit(Lb & 3)
        return np.concatenate([hmask, qs, sb, _u16_bytes(d_bits)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's `dequantize_row_q3_K`: y = (d*(sc-32)) * (q - (hmask bit ? 0 : 4))."""
        nb = blocks.shape[0]
        hmask = blocks[:, :32]  # (nb, 32)
        qs = blocks[:, 32:96].reshape(nb, 2, 32)  # (nb, half, 32)
        sb = blocks[:, 96:108]
        d = blocks[:, 108:110].view(np.float16).astype(_F32)  # (nb, 1)
        # 6-bit scales: low nibbles in bytes 0-7 (j and j+8), high crumbs in bytes 8-11; (nb, 16)
        low = np.concatenate([sb[:, :8] & 0xF, sb[:, :8] >> 4], axis=1)
        hi = (sb[:, 8:12].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3
        sc = (low | (hi.reshape(nb, 16) << 4)).astype(np.int16) - 32
        # (nb, 2 halves, 4 shifts, 2 groups, 1)
        dl = (d * sc.astype(_F32)).reshape(nb, 2, 4, 2, 1)
        y = np.empty((nb, 2, 4, 32), dtype=_F32)
        for h in range(2):
            for k in range(4):
                # 3-bit q: bits 2k..2k+1 of qs byte, bit 2 from hmask bit 4h + k
                y[:, h, k] = ((qs[:, h] >> (2 * k)) & 3) | (((hmask >> (4 * h + k)) & 1) << 2)
        y -= _F32(4)  # q - (hmask bit ? 0 : 4), exact
        y5 = y.reshape(nb, 2, 4, 2, 16)
        y5 *= dl
        return y.reshape(nb, QK_K)


class Q4_K(QuantFormat, name="q4_k", ggml_type=12):
    """4.5 bpw: 8 groups of 32, x = d*sc*q - dmin*m with 6-bit sc, m and 4-bit q."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
        """ggml's `quantize_row_q4_K_ref`, or with `quant_weights` its `quantize_row_q4_K_impl`."""
        nb = blocks.shape[0]
        x = _groups(blocks, 32)  # (32, nb*8)
        if quant_weights is None:
            sum_x2 = _seqsum(x * x)
            av_x = np.sqrt(sum_x2 / _F32(32))
            scales, mins, L = make_qkx2_quants(x, av_x + np.abs(x), 15, -1.0, 0.1, 20, False)
            # (nb, 8)
            scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
            max_scale = np.maximum(scales.max(axis=1), _F32(0))
            max_min = np.maximum(mins.max(axis=1), _F32(0))
            with np.errstate(divide="ignore"):
                inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
                inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
            ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
            lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
            d_float, dmin_float = max_scale / _F32(63), max_min / _F32(63)
        else:
            weight = _imatrix_weights(blocks, x, quant_weights, 32, _F32(2))
            scales, mins, L = make_qkx2_quants(x, weight, 15, -0.9, 0.05, 36, False)  # make_qkx3_quants
            sw = _seqsum(weight).reshape(nb, 8).T  # (8, nb)
            d_float, ls = make_qp_quants(scales.reshape(nb, 8).T, 63, sw)
            dmin_float, lm = make_qp_quants(mins.reshape(nb, 8).T, 63, sw)
            ls, lm = ls.T.astype(np.uint8), lm.T.astype(np.uint8)  # (nb, 8) stored uint8 levels
        sb = np.empty((nb, 12), dtype=np.uint8)
        sb[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
        sb[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
        sb[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
        d_bits = fp16_bits(d_float)
        dmin_bits = fp16_bits(dmin_float)
        # re-round against the stored scales as get_scale_min_k4 decodes them (ls, lm when <= 63); (nb, 8)
        sc_stored, m_stored = cls.scale_min(sb)
        dl = fp16_value(d_bits)[:, None] * sc_stored.astype(_F32)
        ml = fp16_value(dmin_bits)[:, None] * m_stored.astype(_F32)
        xb = blocks.reshape(nb, 8, 32)
        with np.errstate(divide="ignore", invalid="ignore"):
            l2 = _nint_f32((xb + ml[:, :, None]) / dl[:, :, None], 0, 15)
        Lb = np.where((dl != 0)[:, :, None], l2, _ungroup(L, nb).reshape(nb, 8, 32)).astype(np.uint8)
        # (nb, 4 pairs, 2, 32): byte l of pair p holds group 2p at bits 0-3 and group 2p+1 at bits 4-7
        L4 = Lb.reshape(nb, 4, 2, 32)
        qs = (L4[:, :, 0] | (L4[:, :, 1] << 4)).reshape(nb, QK_K // 2)
        return np.concatenate([_u16_bytes(d_bits), _u16_bytes(dmin_bits), sb, qs], axis=1)

    @staticmethod
    def scale_min(sb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ggml's `get_scale_min_k4` for all 8 groups: 12 scale bytes (nb, 12) → sc, m (nb, 8) uint8."""
        # bytes 0-3: sc[0:4] | sc[4:8] bits 4-5 << 6; bytes 4-7: m[0:4] | m[4:8] bits 4-5 << 6;
        # bytes 8-11: sc[4:8] low nibble | m[4:8] low nibble << 4
        sc = np.concatenate([sb[:, 0:4] & 63, (sb[:, 8:12] & 0xF) | ((sb[:, 0:4] >> 6) << 4)], axis=1)
        m = np.concatenate([sb[:, 4:8] & 63, (sb[:, 8:12] >> 4) | ((sb[:, 4:8] >> 6) << 4)], axis=1)
        return sc, m

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's `dequantize_row_q4_K`: y = (d*sc)*q - dmin*m."""
        nb = blocks.shape[0]
        d = blocks[:, 0:2].view(np.float16).astype(_F32)  # (nb, 1)
        dmin = blocks[:, 2:4].view(np.float16).astype(_F32)
        sc, m = cls.scale_min(blocks[:, 4:16])
        # (nb, 4 pairs, 2 nibbles, 1): group 2p + nibble
        dl = (d * sc.astype(_F32)).reshape(nb, 4, 2, 1)
        ml = (dmin * m.astype(_F32)).reshape(nb, 4, 2, 1)
        qs = blocks[:, 16:144].reshape(nb, 4, 32)  # (nb, pair, 32)
        y = np.empty((nb, 4, 2, 32), dtype=_F32)
        y[:, :, 0] = qs & 0xF
        y[:, :, 1] = qs >> 4
        y *= dl
        y -= ml
        return y.reshape(nb, QK_K)


class Q6_K(QuantFormat, name="q6_k", ggml_type=14):
    """6.5625 bpw: 16 groups of 16, x = d*sc*(q-32) with int8 sc and 6-bit q."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
        """ggml's `quantize_row_q6_K_ref`, or with `quant_weights` its `quantize_row_q6_K_impl`, whose only
        change is that the group fits weigh by the importance itself (no sigma term)."""
        nb = blocks.shape[0]
        x = _groups(blocks, 16)  # (16, nb*16)
        qw = None if quant_weights is None else _groups(quant_weights, 16)
        scales, L = make_qx_quants(x, 32, qw)
        scales = scales.reshape(nb, 16)
        max_abs_scale, max_scale = _first_absmax(scales.T)
        zero = max_abs_scale < GROUP_MAX_EPS
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = _F32(-128) / max_scale
            d_bits = fp16_bits(np.where(zero, _F32(0), _F32(1) / iscale))
            sc = np.minimum(nearest_int(iscale[:, None] * scales), 127)
        sc = (((sc + 128) & 0xFF) - 128).astype(np.int8)  # int8 store
        sc[zero] = 0
        # re-round against the stored scales; (nb, 16)
        dl = fp16_value(d_bits)[:, None] * sc.astype(_F32)
        xb = blocks.reshape(nb, 16, 16)
        with np.errstate(divide="ignore", invalid="ignore"):
            l2 = _nint_f32(xb / dl[:, :, None], -32, 31) + _F32(32)
        Lb = np.where((dl != 0)[:, :, None], l2, _ungroup(L, nb).reshape(nb, 16, 16))
        Lb = np.where(zero[:, None, None], _F32(0), Lb).astype(np.uint8)
        # (nb, 2 halves, 4 quarters, 32): ql byte l (+32) holds quarters 0 (1) low, 2 (3) high nibble
        L4 = Lb.reshape(nb, 2, 4, 32)
        ql = np.empty((nb, 2, 2, 32), dtype=np.uint8)
        ql[:, :, 0] = (L4[:, :, 0] & 0xF) | ((L4[:, :, 2] & 0xF) << 4)
        ql[:, :, 1] = (L4[:, :, 1] & 0xF) | ((L4[:, :, 3] & 0xF) << 4)
        h = L4 >> 4
        qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)  # (nb, 2, 32)
        return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                               _u16_bytes(d_bits)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's `dequantize_row_q6_K`: y = (d*sc) * ((ql nibble | qh crumb << 4) - 32)."""
        nb = blocks.shape[0]
        ql = blocks[:, 0:128].reshape(nb, 2, 2, 32)  # (nb, half, ql byte l / l+32, 32)
        qh = blocks[:, 128:192].reshape(nb, 2, 32)  # (nb, half, 32)
        sc = blocks[:, 192:208].view(np.int8).astype(_F32)  # (nb, 16)
        d = blocks[:, 208:210].view(np.float16).astype(_F32)  # (nb, 1)
        dl = (d * sc).reshape(nb, 2, 4, 2, 1)  # (nb, half, quarter, group, 1)
        y = np.empty((nb, 2, 4, 32), dtype=_F32)
        for k in range(4):
            # quarter k: nibble k // 2 of ql byte (l + 32*(k % 2)), bits 2k..2k+1 of qh byte l
            y[:, :, k] = ((ql[:, :, k % 2] >> (4 * (k // 2))) & 0xF) | (((qh >> (2 * k)) & 3) << 4)
        y -= _F32(32)  # q - 32, exact
        y5 = y.reshape(nb, 2, 4, 2, 16)
        y5 *= dl
        return y.reshape(nb, QK_K)


class Q8_0(QuantFormat, name="q8_0", ggml_type=8):
    """8.5 bpw: blocks of 32, x = d*q with int8 q."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
        """ggml's `quantize_row_q8_0_ref` (roundf: half away from zero); ggml's `quantize_q8_0` ignores
        `quant_weights`, and so does this."""
        amax = np.abs(blocks).max(axis=1)
        d = amax / _F32(127)
        with np.errstate(divide="ignore"):
            inv_d = np.where(d != 0, _F32(1) / d, _F32(0))
        v = (blocks * inv_d[:, None]).astype(np.float64)  # float32 product, then exact roundf
        qs = np.trunc(v + np.copysign(0.5, v)).astype(np.int8)
        return np.concatenate([_u16_bytes(fp16_bits(d)), qs.view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's `dequantize_row_q8_0`: y = q*d."""
        d = blocks[:, 0:2].view(np.float16).astype(_F32)  # (nb, 1)
        return blocks[:, 2:34].view(np.int8).astype(_F32) * d


class _RowWeights:
    """Per-block quant_weights of a (..., N, K) tensor, built per chunk instead of N copies of each vector."""

    def __init__(self, vectors: np.ndarray, rows_per_vector: int, block_weights: int):
        self.vectors = vectors  # (V, K) float32: one importance vector per matrix
        self.rows_per_vector = rows_per_vector
        self.block_weights = block_weights

    def blocks(self, start: int, stop: int) -> np.ndarray:
        """Weights of blocks start..stop-1 (row-major, as the tensor's blocks): (stop - start, bw)."""
        v, k = self.vectors.shape
        per_row = k // self.block_weights
        idx = np.arange(start, min(stop, v * self.rows_per_vector * per_row))
        row, col_block = np.divmod(idx, per_row)
        return self.vectors.reshape(v, per_row, self.block_weights)[row // self.rows_per_vector, col_block]


def _row_weights(fmt: type[QuantFormat], shape: tuple[int, ...], quant_weights: np.ndarray) -> _RowWeights:
    """Check quant_weights against a tensor's shape; ValueError names the format and the problem."""
    qw = np.asarray(quant_weights, dtype=_F32)
    k = shape[-1]
    per_matrix = (*shape[:-2], k)
    if qw.shape not in ((k,), per_matrix):
        raise ValueError(f"{fmt.name}: quant_weights has shape {qw.shape}; a tensor of shape {shape} takes "
                         f"({k},) or {per_matrix}")
    bad = ~(np.isfinite(qw) & (qw >= 0))
    if bad.any():
        raise ValueError(f"{fmt.name}: quant_weights holds {int(bad.sum())} negative or non-finite value(s)")
    vectors = qw.reshape(-1, k) + _F32(0)  # -0 → +0, as ggml's sums that start from 0 would make it
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return _RowWeights(vectors, rows // vectors.shape[0], fmt.block_weights)


def get_quant(name: str) -> type[QuantFormat]:
    """Look up a format class by (case-insensitive) name; ValueError names the known ones."""
    key = name.lower()
    if key not in QUANT_TYPES:
        raise ValueError(f"unknown quant format {name!r}; known: {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[key]


def quantize(array: np.ndarray, fmt: str, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """Quantize `array` (last axis whole blocks) to format `fmt` → uint8 (..., row_bytes); `quant_weights`
    as in `QuantFormat.quantize` (None: ggml's reference quantizer)."""
    return get_quant(fmt).quantize(array, quant_weights)


def dequantize(qbytes: np.ndarray | bytes, fmt: str, shape: Sequence[int]) -> np.ndarray:
    """Dequantize `qbytes` of format `fmt` holding a float tensor of `shape` → float32."""
    return get_quant(fmt).dequantize(qbytes, shape)


def requantize(qbytes: np.ndarray | bytes, src: str, dst: str, shape: Sequence[int],
               quant_weights: np.ndarray | None = None) -> np.ndarray:
    """Re-quantize a `src`-format tensor of float `shape` to `dst` (dequantize to float32, quantize)."""
    return get_quant(dst).quantize(get_quant(src).dequantize(qbytes, shape), quant_weights)
