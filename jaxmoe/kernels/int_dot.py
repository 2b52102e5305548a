"""Decode-GEMV expert kernels with integer dot products: 16-bit activations × 2/3/4-bit weights (`dp2a`).

Version 4 of the fused expert FFN (docs/kernels.md §5c). Version 3 (`dequant_fma`) turns every
weight into a float and spends ≈ 3.5 instructions per weight (a mask, a dequantizing FMA and the
accumulating FMA) plus its overhead: ≈ 5.3 per weight, and at M = 1 its time is the length of that
instruction chain. Here a weight costs ≈ 1 integer instruction: one shift/mask isolates a bit field
of four weights (one per byte lane, the planes of `jaxmoe.kernels.repack`), and two `dp2a` multiply
them with four 16-bit activations (two per 32-bit word) into an int32 sum. Per 16-weight slice the
integer sum is scaled once in float32 (activation step × sub-block scale); sub-block minimums and
Q3_K's −4 offset enter through the slice's activation sum; d/dmin multiply once per super-block.

Activations are quantized to int16 per 16 values (`quantize_int16`): step = max|x|/32767, relative
error ≈ 1e-5, far below the ≤ 1e-2 bound (int8 activations, llama.cpp's q8_1, cost ≈ 1 % on this
FFN; version 2 recovered the precision with a second int8 word and two `dp4a`, which is the same
instruction count as `dp2a` on one int16 word). Versions 1–2 lost their time in quantizing
activations inside every program; here x is quantized once per layer by a small launch (one program
per token), and h is quantized in launch A's epilogue (a program of BN rows owns BN/16 whole
slices of h).

Launch A: grid (G, F/BN, M/MT): gate and up rows of a tile, SiLU·mul, int16 quantization of h.
Launch B: grid (G, H/BN, M/MT): down rows against the quantized h → y [G, M, H] float32.

Sources: llama.cpp's mul_mat_vec_q (ggml-cuda/mmvq.cu, vecdotq.cuh: integer dot of quantized
weights and activations per sub-block, scales applied per sub-block); PTX ISA `dp2a`.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxmoe.kernels import repack
from jaxmoe.kernels.dequant_fma import GROUPS, _chunks, _plane_views

F32 = jnp.float32
QMAX = 32767.0
MASK = {"q2_k": repack.MASK2, "q3_k": repack.MASK2, "q4_k": repack.MASK4}


def quantize_int16(x: jax.Array):
    """x [..., K] → (words [..., K/2] uint32, step [..., K/16], sums [..., K/16]) float32.

    Blocks of 16 along K: q = round(x / step) ∈ [−32767, 32767] with step = max|x| / 32767 (0 for an
    all-zero block); word j holds q[2j] in its low and q[2j+1] in its high 16 bits (`dp2a` operand
    order) in the order (half, w) of the block's values 4w + 2·half + j: the four words of one
    half are one 16-byte load. sums = step · Σ q, the block's sum as the kernel sees it (for minimum
    terms).
    """
    x = x.astype(F32)
    xb = x.reshape(*x.shape[:-1], -1, 16)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    inv = jnp.where(amax > 0, QMAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.floor(xb * inv[..., None] + 0.5), -QMAX, QMAX)
    step = amax * (1.0 / QMAX)
    qi = jnp.swapaxes(q.astype(jnp.int32).reshape(*xb.shape[:-1], 4, 2, 2), -3, -2)  # [.., half, w, j]
    words = (qi[..., 0] & 0xFFFF).astype(jnp.uint32) | (qi[..., 1].astype(jnp.uint32) << 16)
    return words.reshape(*x.shape[:-1], -1), step, step * jnp.sum(q, axis=-1)


def _int16(words, shift: int):
    """The signed 16-bit value in bits shift..shift+15 of uint32 words → int32."""
    v = ((words >> shift) & 0xFFFF).astype(jnp.int32)
    return jnp.where(v >= 32768, v - 65536, v)


def dequantize_int16(words: jax.Array, step: jax.Array) -> jax.Array:
    """The values `quantize_int16` encodes → [..., K] float32."""
    q = jnp.stack([_int16(words, 0), _int16(words, 16)], axis=-1).reshape(*words.shape[:-1], -1, 2, 4, 2)  # [.., half, w, j]
    q = jnp.swapaxes(q, -3, -2).reshape(*words.shape[:-1], -1, 16).astype(F32)
    return (q * step[..., None]).reshape(*words.shape[:-1], -1)


def _dp2a_pair(q, xlo, xhi, use_asm: bool):
    """Σ_i byte_i(q) · x_i over the four byte lanes of q, x_0..x_3 the int16 halves of (xlo, xhi) → int32."""
    q, xlo, xhi = jnp.broadcast_arrays(q, xlo, xhi)
    if use_asm:
        return plt.elementwise_inline_asm(
            "{ .reg .s32 t; dp2a.lo.s32.u32 t, $2, $1, 0; dp2a.hi.s32.u32 $0, $3, $1, t; }",
            args=[q, xlo, xhi], constraints="=r,r,r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, jnp.int32)])[0]
    acc = jnp.zeros(q.shape, jnp.int32)
    for i, (src, shift) in enumerate(((xlo, 0), (xlo, 16), (xhi, 0), (xhi, 16))):
        acc = acc + ((q >> (8 * i)) & 0xFF).astype(jnp.int32) * _int16(src, shift)
    return acc


def _rows_int(fmt: str, mats: list, e, rows, nb: int, xget, mt: int, use_asm: bool) -> list:
    """x·W[rows]ᵀ for one expert and each matrix of `mats` → per matrix, per token, [BN] float32.

    xget(bs, m, s) → (lo words, hi words [NBt, 2c, P, 4w] uint32, step, sums [NBt, 2c, P] float32):
    the quantized activations that meet bit field s of the weight words, shared by every matrix
    and row of the program.
    """
    n_groups, n_shift = GROUPS[fmt]
    bits = 4 if fmt == "q4_k" else 2
    words = 2 * n_groups * 4
    out = [[None] * mt for _ in mats]
    for b0, nbt in _chunks(nb):
        bs = pl.ds(b0, nbt)
        # Every load of the block run first (weights, scales, d/dmin, activations of every field), so that
        # a program waits for one memory round trip, not one per field (run 7: the time did not fall
        # with twice the warps, so the per-warp chain of dependent loads set it).
        st = []
        for w in mats:
            flat = w["qs"][e, rows, pl.ds(b0 * words, nbt * words)]  # [BN, NBt·W] uint32
            t = {"q": jnp.swapaxes(flat.reshape(flat.shape[0], nbt, n_groups, 2, 4), 2, 3),  # [BN, NBt, 2c, P, 4w]
                 "acc": [None] * mt, "mins": [None] * mt, "d": w["d"][e, rows, bs]}
            if fmt != "q3_k":
                t["dmin"] = w["dmin"][e, rows, bs]
            if fmt == "q3_k":
                hm = w["hm"][e, rows, bs, :, :][:, :, :, None, :]  # [BN, NBt, 2c, 1, 4w]: lane i bit t = 4p + s
                p_shift = (jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, n_groups, 1), 3) * 4).astype(jnp.uint32)
                t["h2"] = hm >> p_shift  # bit s of lane i: high bit of slice 4p + s
            if fmt == "q4_k":  # one scale and min per 32 weights (both nibbles s)
                t["sc"] = w["sc"][e, rows, bs, :, :]
                t["mn"] = w["mn"][e, rows, bs, :, :]
            else:  # the 4 scale bytes of fields s = 0..3 as one word per (row, block, c, p): one 4-byte load
                sc4 = (w["sc"][e, rows, bs, :, :, :].astype(jnp.int32) & 0xFF).astype(jnp.uint32)  # [BN, NBt, 2c, P, S]
                shifts = (jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, 1, n_shift), 4) * 8).astype(jnp.uint32)
                t["sc4"] = jnp.sum(sc4 << shifts, axis=4)  # byte s: Q2_K scale | min << 4, Q3_K signed scale
            st.append(t)
        xs_all = [[xget(bs, m, s) for m in range(mt)] for s in range(n_shift)]
        for s in range(n_shift):
            # Field s stays in place, q·2^pos in each byte (no shift): the step absorbs 2^−pos (exact).
            # Q3_K's 3-bit value would overflow its byte at s = 3, so it moves down to pos 4 there.
            pos = min(bits * s, 4) if fmt == "q3_k" else bits * s
            xs = xs_all[s]
            for w, t in zip(mats, st):
                q = repack.shift(t["q"], bits * s - pos) & jnp.uint32(MASK[fmt] << pos)
                if fmt == "q3_k":
                    q = q | (repack.shift(t["h2"], s - pos - 2) & jnp.uint32(repack.MASKH << pos))  # (value + 4)·2^pos
                if fmt == "q2_k":
                    sc = ((t["sc4"] >> 8 * s) & 15).astype(F32)
                    mn = ((t["sc4"] >> 8 * s + 4) & 15).astype(F32)
                elif fmt == "q3_k":  # sign-extend byte s
                    sc = ((t["sc4"] << 24 - 8 * s).astype(jnp.int32) >> 24).astype(F32)
                else:
                    sc, mn = t["sc"].astype(F32), t["mn"].astype(F32)
                for m in range(mt):
                    lo, hi, step, xsum = xs[m]
                    step = step * 2.0 ** -pos
                    isum = jnp.sum(_dp2a_pair(q, lo[None], hi[None], use_asm), axis=-1)  # [BN, NBt, 2c, P]
                    if fmt == "q3_k":
                        term = (isum.astype(F32) * step[None] - 4.0 * xsum[None]) * sc
                    else:
                        term = isum.astype(F32) * (step[None] * sc)
                        mterm = xsum[None] * mn
                        t["mins"][m] = mterm if t["mins"][m] is None else t["mins"][m] + mterm
                    t["acc"][m] = term if t["acc"][m] is None else t["acc"][m] + term
        for k, t in enumerate(st):
            d = t["d"].astype(F32)  # [BN, NBt]
            dmin = t["dmin"].astype(F32) if "dmin" in t else None
            for m in range(mt):
                part = d * jnp.sum(jnp.sum(t["acc"][m], axis=3), axis=2)
                if dmin is not None:
                    part = part - dmin * jnp.sum(jnp.sum(t["mins"][m], axis=3), axis=2)
                part = jnp.sum(part, axis=1)
                out[k][m] = part if out[k][m] is None else out[k][m] + part
    return out


def _x_getter(words_ref, step_ref, sums_ref, lead, m0):
    """Activation tiles of bit field s for token m0 + m, cached per (block run, m, field): gate and up share them."""
    cache = {}

    def get(bs, m, s):
        key = (bs.start, m, s)
        if key not in cache:
            idx = (*lead, m0 + m, bs, slice(None), slice(None), s)
            cache[key] = (words_ref[(*idx, 0, slice(None))], words_ref[(*idx, 1, slice(None))],
                          step_ref[idx], sums_ref[idx])
        return cache[key]

    return get


def _quantize_rows(h):
    """h [BN] float32 → (words [BN/2] uint32, step [BN/16], sums [BN/16]): `quantize_int16` in-kernel."""
    bn = h.shape[0]
    hb = h.reshape(bn // 16, 16)
    amax = jnp.max(jnp.abs(hb), axis=1)
    inv = jnp.where(amax > 0, QMAX / jnp.maximum(amax, 1e-30), 0.0)
    q = jnp.clip(jnp.floor(hb * inv[:, None] + 0.5), -QMAX, QMAX)
    step = amax * (1.0 / QMAX)
    sums = step * jnp.sum(q, axis=1)
    qi = jnp.swapaxes(q.reshape(bn // 16, 4, 2, 2), 1, 2).astype(jnp.int32)  # [slices, half, w, j]
    shifts = (jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, 2), 3) * 16).astype(jnp.uint32)
    words = jnp.sum((qi & 0xFFFF).astype(jnp.uint32) << shifts, axis=3)
    return words.reshape(bn // 2), step, sums


def _quantize_kernel(x_ref, w_ref, d_ref, s_ref):
    """One token's activations [1, K] → int16 words, steps and sums (`quantize_int16` as one small launch).

    XLA's own fusion of `quantize_int16` took 3.9 µs per call on the H200 (run 6); one program per token
    does the same arithmetic as launch A's epilogue.
    """
    words, step, sums = _quantize_rows(x_ref[0, :].astype(F32))
    w_ref[0, :] = words
    d_ref[0, :] = step
    s_ref[0, :] = sums


def quantize_pallas(x, interpret: bool = False):
    """`quantize_int16` of x [M, K] as a Pallas kernel (grid M) → (words [M, K/2], step, sums [M, K/16])."""
    m, k = x.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # JAX 0.11 deprecates the Triton backend
        return pl.pallas_call(
            _quantize_kernel, grid=(m,),
            in_specs=[pl.BlockSpec((1, k), lambda i: (i, 0))],
            out_specs=[pl.BlockSpec((1, k // 2), lambda i: (i, 0)), pl.BlockSpec((1, k // 16), lambda i: (i, 0)),
                       pl.BlockSpec((1, k // 16), lambda i: (i, 0))],
            out_shape=(jax.ShapeDtypeStruct((m, k // 2), jnp.uint32), jax.ShapeDtypeStruct((m, k // 16), F32),
                       jax.ShapeDtypeStruct((m, k // 16), F32)),
            compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret, name="ffn_quantize_x")(x)


def _up_kernel(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm):
    """Launch A: h = SiLU(x·W_gate[rows]ᵀ)·(x·W_up[rows]ᵀ) for expert ids[g], written int16-quantized."""
    k = len(names)
    gate, up = dict(zip(names, refs[:k])), dict(zip(names, refs[k:2 * k]))
    xw_ref, xd_ref, xs_ref, hw_ref, hd_ref, hs_ref = refs[2 * k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    m0 = i * mt
    rows = pl.ds(j * bn, bn)
    xget = _x_getter(xw_ref, xd_ref, xs_ref, (), m0)
    hg, hu = _rows_int(fmt, [gate, up], e, rows, nb, xget, mt, use_asm)  # both matrices' loads issue together
    for m in range(mt):
        words, step, sums = _quantize_rows(hg[m] * jax.nn.sigmoid(hg[m]) * hu[m])
        hw_ref[g, m0 + m, pl.ds(j * (bn // 2), bn // 2)] = words
        hd_ref[g, m0 + m, pl.ds(j * (bn // 16), bn // 16)] = step
        hs_ref[g, m0 + m, pl.ds(j * (bn // 16), bn // 16)] = sums


def _down_kernel(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm):
    """Launch B: y[g, m, rows] = h[g, m]·W_down[rows]ᵀ from the int16-quantized h."""
    k = len(names)
    down = dict(zip(names, refs[:k]))
    hw_ref, hd_ref, hs_ref, y_ref = refs[k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    m0 = i * mt
    rows = pl.ds(j * bn, bn)
    (y,) = _rows_int(fmt, [down], e, rows, nb, _x_getter(hw_ref, hd_ref, hs_ref, (g,), m0), mt, use_asm)
    for m in range(mt):
        y_ref[g, m0 + m, rows] = y[m]


def _act_views(words, step, sums, lead: tuple, nb: int, fmt: str):
    """Activation arrays as [*lead, NB, 2c, P, S, 2 halves, 4w] words and [*lead, NB, 2c, P, S] steps / sums (free reshapes)."""
    n_groups, n_shift = GROUPS[fmt]
    return (words.reshape(*lead, nb, 2, n_groups, n_shift, 2, 4),
            step.reshape(*lead, nb, 2, n_groups, n_shift), sums.reshape(*lead, nb, 2, n_groups, n_shift))


def ffn(x, bank: dict, ids, fmt: str, *, block_n_up: int = 16, num_warps_up: int = 4, block_n_down: int = 8,
        num_warps_down: int = 1, block_m: int = 1, interpret: bool = False):
    """SwiGLU FFN of experts ids [G] on x [M, H] with the integer-dot kernels → [G, M, H] float32."""
    if block_n_up % 16:
        raise ValueError(f"launch A quantizes h in slices of 16 rows: block_n_up={block_n_up} must be a multiple of 16")
    names = repack.PLANES[fmt]
    _, f, nb_up = bank["gate"]["d"].shape
    h = nb_up * repack.QK_K
    nb_down = f // repack.QK_K
    g, m = ids.shape[0], x.shape[0]
    mt = max(1, min(block_m, m))
    mp = -(-m // mt) * mt
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    use_asm = not interpret
    xq = _act_views(*quantize_pallas(x, interpret), (mp,), nb_up, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # JAX 0.11 deprecates the Triton backend
        up_call = pl.pallas_call(
            functools.partial(_up_kernel, fmt=fmt, names=names, nb=nb_up, bn=block_n_up, mt=mt, use_asm=use_asm),
            grid=(g, f // block_n_up, mp // mt),
            out_shape=(jax.ShapeDtypeStruct((g, mp, f // 2), jnp.uint32), jax.ShapeDtypeStruct((g, mp, f // 16), F32),
                       jax.ShapeDtypeStruct((g, mp, f // 16), F32)),
            compiler_params=plt.CompilerParams(num_warps=num_warps_up, num_stages=1),
            interpret=interpret, name=f"ffn_up_int_{fmt}")
        hq = up_call(ids, *_plane_views(bank["gate"], fmt), *_plane_views(bank["up"], fmt), *xq)
        down_call = pl.pallas_call(
            functools.partial(_down_kernel, fmt=fmt, names=names, nb=nb_down, bn=block_n_down, mt=mt, use_asm=use_asm),
            grid=(g, h // block_n_down, mp // mt),
            out_shape=jax.ShapeDtypeStruct((g, mp, h), F32),
            compiler_params=plt.CompilerParams(num_warps=num_warps_down, num_stages=1),
            interpret=interpret, name=f"ffn_down_int_{fmt}")
        y = down_call(ids, *_plane_views(bank["down"], fmt), *_act_views(*hq, (g, mp), nb_down, fmt))
    return y[:, :m]
