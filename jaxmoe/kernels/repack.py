"""Lossless GPU-friendly repacking of GGUF Q2_K / Q3_K / Q4_K weight matrices into separate planes.

A GGUF matrix W[N, K] (N output rows, K inputs, K a multiple of 256) stores each row as K/256
super-blocks of interleaved fields (ggml's `block_q2_K` etc.): scales, 2/4-bit quants, high-bit
masks and half-float super-scales mixed in one 84/110/144-byte record, aligned only to 2 or 4 bytes.
A GPU kernel wants each field as its own array ("plane") so that a tile of rows reads contiguous,
16-byte-aligned words, and it wants the bits of one 32-bit word to hold four *consecutive* weights,
so that one shift and one mask extract four weights at once, ready for a 4-way int8 dot product
(PTX `dp4a`) against four consecutive activations.

Weight index inside a super-block b: l = 128*c + 16*t + 4*w + i, with chunk c ∈ {0,1}, slice
t ∈ [0,8) (16 weights = one Q2_K/Q3_K sub-block, half a Q4_K sub-block), word w ∈ [0,4), byte
lane i ∈ [0,4). The planes (leading dims of the GGUF array, e.g. experts, are kept in front):

| format | plane | dtype  | shape            | content                                               |
|--------|-------|--------|------------------|-------------------------------------------------------|
| Q2_K   | qs    | uint32 | [N, NB, 2, 2, 4] | word (b, p, c, w), lane i, bits 2s..2s+1 → t = 4p+s    |
|        | sc    | uint8  | [N, NB, 2, 8]    | GGUF scales byte of sub-block 8c+t (low: scale, high: min) |
|        | d,dmin| float16| [N, NB]          | super-block scale and min scale                        |
| Q3_K   | qs    | uint32 | [N, NB, 2, 2, 4] | low 2 bits, as Q2_K                                    |
|        | hm    | uint32 | [N, NB, 2, 4]    | word (b, c, w), lane i, bit t: GGUF hmask bit (1 → +0, 0 → −4) |
|        | sc    | int8   | [N, NB, 2, 8]    | 6-bit sub-block scale minus 32, unpacked              |
|        | d     | float16| [N, NB]          |                                                        |
| Q4_K   | qs    | uint32 | [N, NB, 4, 2, 4] | word (b, p, c, w), lane i, nibble s → t = 2p+s          |
|        | sc,mn | uint8  | [N, NB, 2, 4]    | 6-bit scale / min of 32-weight sub-block 4c+p, unpacked |
|        | d,dmin| float16| [N, NB]          |                                                        |

Bytes per 256 weights: Q2_K 84 (= GGUF), Q3_K 114 (GGUF 110, +3.6 %: 12 packed scale bytes become
16), Q4_K 148 (GGUF 144, +2.8 %). `pack` and `unpack` are exact inverses on every byte pattern
(tested against the GGUF bytes and the `gguf` package's dequantizer).

Source of the GGUF layouts: ggml/src/ggml-common.h (block_q2_K, block_q3_K, block_q4_K) and
dequantize_row_q{2,3,4}_K in ggml/src/ggml-quants.c; gguf-py gguf/quants.py.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
FORMATS = ("q2_k", "q3_k", "q4_k")
GGUF_BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144}
PACKED_BLOCK_BYTES = {"q2_k": 84, "q3_k": 114, "q4_k": 148}
PLANES = {"q2_k": ("qs", "sc", "d", "dmin"), "q3_k": ("qs", "hm", "sc", "d"), "q4_k": ("qs", "sc", "mn", "d", "dmin")}
# Bit fields of a qs / hm word, one per byte lane: 2-bit quants, 4-bit quants, Q3_K's high bit (at bit 2).
MASK2, MASK4, MASKH = 0x03030303, 0x0F0F0F0F, 0x04040404


def shift(words, n: int):
    """words >> n, or words << −n for n < 0 (numpy or jnp integers): moves a bit field to another position."""
    return words if n == 0 else (words >> n if n > 0 else words << (-n))


def _check_fmt(fmt: str) -> str:
    key = fmt.lower()
    if key not in FORMATS:
        raise ValueError(f"repack supports {', '.join(FORMATS)}, not {fmt!r}")
    return key


def _blocks(raw: np.ndarray, fmt: str) -> np.ndarray:
    """(..., N, row_bytes) uint8 → (..., N, NB, block_bytes)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    bb = GGUF_BLOCK_BYTES[fmt]
    if raw.ndim < 2 or raw.shape[-1] % bb:
        raise ValueError(f"{fmt}: row of {raw.shape[-1:]} bytes is not a whole number of {bb}-byte blocks")
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // bb, bb)


def _bytes_to_words(b: np.ndarray) -> np.ndarray:
    """(..., 4) uint8 lanes → (...) uint32, lane i in bits 8i..8i+7."""
    b = b.astype(np.uint32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _words_to_bytes(w: np.ndarray) -> np.ndarray:
    """(...) uint32 → (..., 4) uint8 lanes."""
    w = np.asarray(w, dtype=np.uint32)
    return np.stack([(w >> (8 * i)) & 0xFF for i in range(4)], axis=-1).astype(np.uint8)


def _ggml_qs2_to_values(qs: np.ndarray) -> np.ndarray:
    """GGUF 2-bit qs (..., 64) → values (..., 256): weight 128h + 32s + j is bits 2s of byte 32h + j."""
    q = qs.reshape(*qs.shape[:-1], 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    return (q & 3).reshape(*qs.shape[:-1], 256)


def _values_to_ggml_qs2(v: np.ndarray) -> np.ndarray:
    """Inverse of `_ggml_qs2_to_values`."""
    v = v.reshape(*v.shape[:-1], 2, 4, 32).astype(np.uint8)  # (h, s, j)
    out = v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6)
    return out.reshape(*v.shape[:-3], 64)


def _values_to_plane(v: np.ndarray, bits: int) -> np.ndarray:
    """Values (..., 256) of `bits` ∈ {2, 4} → words (..., P, 2, 4) with l = 128c + 16(S p + s) + 4w + i."""
    S = 8 // bits  # shifts per byte
    P = 8 // S
    v = v.reshape(*v.shape[:-1], 2, P, S, 4, 4).astype(np.uint8)  # (c, p, s, w, i)
    byte = np.zeros(v.shape[:-3] + v.shape[-2:], np.uint8)  # (c, p, w, i)
    for s in range(S):
        byte |= v[..., s, :, :] << (bits * s)
    words = _bytes_to_words(byte)  # (c, p, w)
    return np.swapaxes(words, -3, -2)  # (p, c, w)


def _plane_to_values(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `_values_to_plane`."""
    S = 8 // bits
    mask = (1 << bits) - 1
    byte = _words_to_bytes(np.swapaxes(words, -3, -2))  # (c, p, w, i)
    v = np.stack([(byte >> (bits * s)) & mask for s in range(S)], axis=-3)  # (c, p, s, w, i)
    return v.reshape(*v.shape[:-5], 256)


def _unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q4_K 12-byte packed (..., 12) → 6-bit scales (..., 8) and mins (..., 8) (ggml get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc, mn


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of `_unpack_scale_min_k4` for 6-bit inputs."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    d = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    m = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    md = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return np.concatenate([d, m, md], axis=-1)


def _unpack_scales_q3(scales: np.ndarray) -> np.ndarray:
    """GGUF Q3_K 12-byte packed (..., 12) → 16 unsigned 6-bit scales (..., 16) (gguf-py's unpacking)."""
    lo, hi = scales[..., :8], scales[..., 8:]
    low = np.concatenate([lo & 15, lo >> 4], axis=-1)  # j < 8: low nibble of byte j; j ≥ 8: high nibble of j-8
    high = np.concatenate([(hi >> (2 * k)) & 3 for k in range(4)], axis=-1)  # j: bits 2(j//4) of byte 8 + j%4
    return (low | (high << 4)).astype(np.uint8)


def _pack_scales_q3(sc: np.ndarray) -> np.ndarray:
    """Inverse of `_unpack_scales_q3` for 6-bit inputs."""
    sc = sc.astype(np.uint8)
    lo = (sc[..., :8] & 15) | ((sc[..., 8:] & 15) << 4)
    hb = sc >> 4  # (..., 16) two bits each
    hi = np.zeros(sc.shape[:-1] + (4,), np.uint8)
    for k in range(4):
        hi |= hb[..., 4 * k:4 * k + 4] << (2 * k)
    return np.concatenate([lo, hi], axis=-1)


def pack(raw: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """GGUF bytes (..., N, K/256*block_bytes) uint8 → dict of planes (see module table)."""
    fmt = _check_fmt(fmt)
    blk = _blocks(raw, fmt)
    f16 = lambda a: np.ascontiguousarray(a).view(np.float16)[..., 0]  # (..., 2) uint8 → (...) float16
    if fmt == "q2_k":
        scales, qs, d, dmin = blk[..., 0:16], blk[..., 16:80], blk[..., 80:82], blk[..., 82:84]
        return {
            "qs": _values_to_plane(_ggml_qs2_to_values(qs), 2),
            "sc": scales.reshape(*scales.shape[:-1], 2, 8).copy(),
            "d": f16(d),
            "dmin": f16(dmin),
        }
    if fmt == "q3_k":
        hmask, qs, scales, d = blk[..., 0:32], blk[..., 32:96], blk[..., 96:108], blk[..., 108:110]
        # hmask bit b of byte j is weight 32b + j; regroup as byte (c, w, i) bit t → weight 128c + 16t + 4w + i.
        bits = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (b, j): weight 32b + j
        bits = bits.reshape(*bits.shape[:-2], 256).reshape(*bits.shape[:-2], 2, 8, 16)  # (c, t, 4w+i)
        hbyte = np.zeros(bits.shape[:-3] + (2, 16), np.uint8)
        for t in range(8):
            hbyte |= bits[..., :, t, :] << t
        hm = _bytes_to_words(hbyte.reshape(*hbyte.shape[:-1], 4, 4))  # (c, w)
        sc = (_unpack_scales_q3(scales).astype(np.int16) - 32).astype(np.int8)
        return {
            "qs": _values_to_plane(_ggml_qs2_to_values(qs), 2),
            "hm": hm,
            "sc": sc.reshape(*sc.shape[:-1], 2, 8),
            "d": f16(d),
        }
    d, dmin, scales, qs = blk[..., 0:2], blk[..., 2:4], blk[..., 4:16], blk[..., 16:144]
    # GGUF qs: weight 64g + 32s + j is nibble s of byte 32g + j.
    v = (qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15
    sc, mn = _unpack_scale_min_k4(scales)
    return {
        "qs": _values_to_plane(v.reshape(*qs.shape[:-1], 256), 4),
        "sc": sc.reshape(*sc.shape[:-1], 2, 4),
        "mn": mn.reshape(*mn.shape[:-1], 2, 4),
        "d": f16(d),
        "dmin": f16(dmin),
    }


def unpack(planes: dict[str, np.ndarray], fmt: str) -> np.ndarray:
    """Dict of planes → the GGUF bytes (..., N, row_bytes) uint8 they came from."""
    fmt = _check_fmt(fmt)
    u8 = lambda a: np.ascontiguousarray(np.asarray(a, np.float16)[..., None]).view(np.uint8)  # (...) → (..., 2)
    if fmt == "q2_k":
        qs = _values_to_ggml_qs2(_plane_to_values(planes["qs"], 2))
        sc = np.asarray(planes["sc"], np.uint8)
        blk = np.concatenate([sc.reshape(*sc.shape[:-2], 16), qs, u8(planes["d"]), u8(planes["dmin"])], axis=-1)
    elif fmt == "q3_k":
        qs = _values_to_ggml_qs2(_plane_to_values(planes["qs"], 2))
        hbyte = _words_to_bytes(planes["hm"]).reshape(*planes["hm"].shape[:-1], 16)  # (c, 4w+i), bit t
        bits = np.stack([(hbyte >> t) & 1 for t in range(8)], axis=-2)  # (c, t, 16) → weight 128c + 16t + ·
        bits = bits.reshape(*bits.shape[:-3], 8, 32)  # (b, j): weight 32b + j
        hmask = np.zeros(bits.shape[:-2] + (32,), np.uint8)
        for b in range(8):
            hmask |= bits[..., b, :] << b
        sc = np.asarray(planes["sc"], np.int8)
        scales = _pack_scales_q3((sc.astype(np.int16) + 32).astype(np.uint8).reshape(*sc.shape[:-2], 16))
        blk = np.concatenate([hmask, qs, scales, u8(planes["d"])], axis=-1)
    else:
        v = _plane_to_values(planes["qs"], 4).reshape(*planes["qs"].shape[:-3], 4, 2, 32)  # (g, s, j)
        qs = (v[..., 0, :] | (v[..., 1, :] << 4)).astype(np.uint8).reshape(*v.shape[:-3], 128)
        sc = np.asarray(planes["sc"], np.uint8)
        mn = np.asarray(planes["mn"], np.uint8)
        scales = _pack_scale_min_k4(sc.reshape(*sc.shape[:-2], 8), mn.reshape(*mn.shape[:-2], 8))
        blk = np.concatenate([u8(planes["d"]), u8(planes["dmin"]), scales, qs], axis=-1)
    return blk.reshape(*blk.shape[:-2], blk.shape[-2] * blk.shape[-1])


def dequantize_planes(planes: dict[str, np.ndarray], fmt: str) -> np.ndarray:
    """Planes of W[..., N, K] → float32 W (numpy), computed from the planes directly."""
    fmt = _check_fmt(fmt)
    d = np.asarray(planes["d"], np.float16).astype(np.float32)[..., None]  # (..., N, NB, 1)
    if fmt == "q2_k":
        q = _plane_to_values(planes["qs"], 2).astype(np.float32)  # (..., N, NB, 256)
        sc = np.asarray(planes["sc"], np.uint8).reshape(*planes["sc"].shape[:-2], 16)
        dmin = np.asarray(planes["dmin"], np.float16).astype(np.float32)[..., None]
        scale = np.repeat(d * (sc & 15), 16, axis=-1)
        mins = np.repeat(dmin * (sc >> 4), 16, axis=-1)
        w = scale * q - mins
    elif fmt == "q3_k":
        q = _plane_to_values(planes["qs"], 2).astype(np.int16)
        hbyte = _words_to_bytes(planes["hm"]).reshape(*planes["hm"].shape[:-1], 16)
        hb = np.stack([(hbyte >> t) & 1 for t in range(8)], axis=-2).reshape(*hbyte.shape[:-2], 256)
        q = (q + 4 * hb.astype(np.int16) - 4).astype(np.float32)
        sc = np.asarray(planes["sc"], np.int8).reshape(*planes["sc"].shape[:-2], 16).astype(np.float32)
        w = np.repeat(d * sc, 16, axis=-1) * q
    else:
        q = _plane_to_values(planes["qs"], 4).astype(np.float32)
        sc = np.asarray(planes["sc"], np.uint8).reshape(*planes["sc"].shape[:-2], 8).astype(np.float32)
        mn = np.asarray(planes["mn"], np.uint8).reshape(*planes["mn"].shape[:-2], 8).astype(np.float32)
        dmin = np.asarray(planes["dmin"], np.float16).astype(np.float32)[..., None]
        w = np.repeat(d * sc, 32, axis=-1) * q - np.repeat(dmin * mn, 32, axis=-1)
    return w.reshape(*w.shape[:-2], w.shape[-2] * w.shape[-1])


def plane_nbytes(planes: dict[str, np.ndarray]) -> int:
    """Total bytes of a plane dict (or of a nested dict of plane dicts)."""
    return int(sum(plane_nbytes(v) if isinstance(v, dict) else np.asarray(v).nbytes for v in planes.values()))


def random_gguf(fmt: str, n_rows: int, k: int, rng: np.random.Generator, lead: tuple[int, ...] = ()) -> np.ndarray:
    """Random valid GGUF bytes (*lead, n_rows, k/256*block_bytes): random quants/scales, sane half-float scales."""
    fmt = _check_fmt(fmt)
    if k % QK_K:
        raise ValueError(f"k={k} is not a multiple of {QK_K}")
    nb = k // QK_K
    shape = (*lead, n_rows, nb)
    blk = rng.integers(0, 256, size=(*shape, GGUF_BLOCK_BYTES[fmt]), dtype=np.uint8)

    def half(lo: float, hi: float, signed: bool = False) -> np.ndarray:
        v = rng.uniform(lo, hi, size=shape)
        if signed:
            v = v * rng.choice([-1.0, 1.0], size=shape)
        return v.astype(np.float16)[..., None].view(np.uint8)

    # Scale the super-scales so that weights come out around ±0.05, like trained expert weights.
    if fmt == "q2_k":
        blk[..., 80:82] = half(2e-3, 6e-3)
        blk[..., 82:84] = half(1e-3, 4e-3)
    elif fmt == "q3_k":
        blk[..., 108:110] = half(5e-4, 2e-3, signed=True)
    else:
        blk[..., 0:2] = half(2e-4, 8e-4)
        blk[..., 2:4] = half(2e-4, 8e-4)
    return blk.reshape(*shape[:-1], nb * GGUF_BLOCK_BYTES[fmt])
