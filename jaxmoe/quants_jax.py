"""Plain-jnp dequantization of the GGUF formats of `jaxmoe.quants`: the reference beside the GPU kernels.

Same byte layouts and the same float32 operations in the same order as the numpy dequantizers
(which equal ggml's `dequantize_row_*`): the scale product first (d*sc, dmin*m), then one multiply by
the integer level and, for the formats with a min, one subtraction. Bit unpacking is uint8 shifts and
masks, so a kernel author can read each line beside ggml-quants.c. Works under `jax.jit`; the byte
array must be uint8 of shape (n_blocks, type_size). JAX is imported only in this module.

Source: ggml/src/ggml-quants.c `dequantize_row_{q2_K,q3_K,q4_K,q6_K,q8_0}`; block structs in ggml-common.h.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sim.formats import FORMATS

_F32 = jnp.float32


def _half(lo, hi):
    """Little-endian half-float bytes (n,) uint8 each → float32 (n, 1)."""
    bits = lo.astype(jnp.uint16) | (hi.astype(jnp.uint16) << 8)
    return lax.bitcast_convert_type(bits, jnp.float16).astype(_F32)[:, None]


def _q2_k(q):
    n = q.shape[0]
    scales = q[:, 0:16]
    qs = q[:, 16:80].reshape(n, 2, 1, 32)  # (n, half, ., 32)
    d, dmin = _half(q[:, 80], q[:, 81]), _half(q[:, 82], q[:, 83])
    # (n, half, shift, 32): weight 128*half + 32*shift + l is bits 2*shift of qs byte 32*half + l
    shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8).reshape(1, 1, 4, 1)
    ql = (qs >> shifts) & 3
    # (n, half, shift, group-of-16, 1)
    dl = (d * (scales & 0xF).astype(_F32)).reshape(n, 2, 4, 2, 1)
    ml = (dmin * (scales >> 4).astype(_F32)).reshape(n, 2, 4, 2, 1)
    return (dl * ql.reshape(n, 2, 4, 2, 16).astype(_F32) - ml).reshape(n, 256)


def _q3_k(q):
    n = q.shape[0]
    hmask = q[:, 0:32].reshape(n, 1, 1, 32)
    qs = q[:, 32:96].reshape(n, 2, 1, 32)  # (n, half, ., 32)
    sb = q[:, 96:108]
    d = _half(q[:, 108], q[:, 109])
    # 6-bit scales: low nibbles of bytes 0-7 (j < 8) / their high nibbles (j >= 8); bits 4-5 from
    # byte 8 + j%4 at bit 2*(j//4); (n, 16)
    low = jnp.concatenate([sb[:, :8] & 0xF, sb[:, :8] >> 4], axis=1)
    hi = (sb[:, 8:12].reshape(n, 1, 4) >> jnp.arange(0, 8, 2, dtype=jnp.uint8).reshape(1, 4, 1)) & 3
    sc = (low | (hi.reshape(n, 16) << 4)).astype(jnp.int32) - 32
    # (n, half, shift, 32): low 2 bits from qs, bit 2 from hmask bit 4*half + shift
    shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8).reshape(1, 1, 4, 1)
    hbits = jnp.arange(8, dtype=jnp.uint8).reshape(1, 2, 4, 1)
    ql = ((qs >> shifts) & 3) | (((hmask >> hbits) & 1) << 2)
    dl = (d * sc.astype(_F32)).reshape(n, 2, 4, 2, 1)
    return (dl * (ql.reshape(n, 2, 4, 2, 16).astype(_F32) - 4.0)).reshape(n, 256)


def _q4_k(q):
    n = q.shape[0]
    d, dmin = _half(q[:, 0], q[:, 1]), _half(q[:, 2], q[:, 3])
    sb = q[:, 4:16]
    # get_scale_min_k4 for j = 0..7; (n, 8)
    sc = jnp.concatenate([sb[:, 0:4] & 63, (sb[:, 8:12] & 0xF) | ((sb[:, 0:4] >> 6) << 4)], axis=1)
    m = jnp.concatenate([sb[:, 4:8] & 63, (sb[:, 8:12] >> 4) | ((sb[:, 4:8] >> 6) << 4)], axis=1)
    qs = q[:, 16:144].reshape(n, 4, 1, 32)  # (n, pair, ., 32)
    # (n, pair, nibble, 32): group 2*pair + nibble
    ql = (qs >> jnp.array([0, 4], dtype=jnp.uint8).reshape(1, 1, 2, 1)) & 0xF
    dl = (d * sc.astype(_F32)).reshape(n, 4, 2, 1)
    ml = (dmin * m.astype(_F32)).reshape(n, 4, 2, 1)
    return (dl * ql.astype(_F32) - ml).reshape(n, 256)


def _q6_k(q):
    n = q.shape[0]
    ql = q[:, 0:128].reshape(n, 2, 2, 32)  # (n, half, byte l / l+32, 32)
    qh = q[:, 128:192].reshape(n, 2, 1, 32)  # (n, half, ., 32)
    sc = lax.bitcast_convert_type(q[:, 192:208], jnp.int8).astype(_F32)  # (n, 16)
    d = _half(q[:, 208], q[:, 209])
    # quarter k of a half: nibble k//2 of ql byte l + 32*(k%2), bits 2k..2k+1 of qh byte l; (n, half, 4, 32)
    lo = jnp.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    hi = (qh >> jnp.arange(0, 8, 2, dtype=jnp.uint8).reshape(1, 1, 4, 1)) & 3
    qv = (lo | (hi << 4)).astype(_F32) - 32.0
    dl = (d * sc).reshape(n, 2, 4, 2, 1)
    return (dl * qv.reshape(n, 2, 4, 2, 16)).reshape(n, 256)


def _q8_0(q):
    d = _half(q[:, 0], q[:, 1])
    return lax.bitcast_convert_type(q[:, 2:34], jnp.int8).astype(_F32) * d


_DEQUANT = {"q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q6_k": _q6_k, "q8_0": _q8_0}


def dequantize_jnp(fmt: str, qbytes):
    """uint8 (n, type_size) blocks of format `fmt` → float32 (n, block_weights) (256; 32 for q8_0)."""
    key = fmt.lower()
    if key not in _DEQUANT:
        raise ValueError(f"unknown quant format {fmt!r}; known: {', '.join(_DEQUANT)}")
    q = jnp.asarray(qbytes)
    type_size = FORMATS[key].block_bytes
    if q.dtype != jnp.uint8 or q.ndim != 2 or q.shape[1] != type_size:
        raise ValueError(f"{key}: expected uint8 blocks of shape (n, {type_size}), got {q.dtype} {q.shape}")
    return _DEQUANT[key](q)
