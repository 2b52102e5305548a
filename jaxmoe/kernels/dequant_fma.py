"""Decode-GEMV expert kernels that dequantize GGUF Q2_K / Q3_K / Q4_K weights to float32 in registers.

Version 3 of the fused expert FFN (docs/kernels.md): for few tokens (M ≤ 16) a decode step is a
matrix-vector product bound by weight bytes, and the H200 has arithmetic to spare, so the kernel
does not quantize activations at all (versions 1–2 did, with int8 `dp4a`, and their per-program
activation quantization made them latency-bound). Each program owns BN output rows of one expert
and the whole K reduction, with float activations loaded once per program:

1. A tile of packed weight words [BN, NBt, P, 4] (rows × super-blocks × word groups × 4 words, the
   planes of `jaxmoe.kernels.repack`, 16-byte vectors per (row, block, group)) is loaded once.
2. For each bit field (shift s, byte lane i) the field is isolated *in place* and turned into a
   float without an int→float conversion: (word & (mask << pos)) | 0x4B000000 is the float32
   2²³ + q·2^pos (exact while q·2^pos < 2²³; lanes 2–3 come from word >> 16, so pos ≤ 14). One fused
   multiply-add with the sub-block scale S, fma(f, S, −2²³·S) = round(q·2^pos·S), dequantizes it with
   a single rounding (−2²³·S is exact: a power-of-two multiple). The activation of that weight is
   pre-scaled by 2^−pos (exact), so acc += w·x' adds q·S·x. Per weight: one LOP3, two FFMA
   (Q3_K: three integer ops to merge its high bit first).
3. Sub-block minimums (Q2_K, Q4_K) and Q3_K's −4 offset enter once per sub-block through the sum of
   its activations; super-block scales d, dmin are folded into S and the minimum factor.
4. One reduction over (blocks, groups, words) per output row at the end; no cross-program
   reduction, no shared-memory round trips in the main loop.

Launch A computes SiLU(gate)·up for a row tile of both matrices (grid G × F/BN × M/MT) and writes h
[G, M, F] float32; launch B computes the down projection from h (grid G × H/BN × M/MT). The expert
id is a scalar load from `ids`, so the bank is indexed in place. Two modes: "fma" (float32 FMAs,
block_m ≤ 2 tokens per program) and "mma" (each field's dequantized weights in bf16 meet the matching
activations in a tensor-core dot; block_m ≥ 16). With split_up, gate and up rows are separate
programs of launch A (half the code each: fewer spills) and SiLU·mul is one small XLA fusion.
Measured on the H200 (docs/kernels.md §5b–6): Q2_K layer of 8 experts at M = 1 in 17.4 µs.

Sources: ggml-cuda's dequantize_mul_mat_vec (float dequantization + FMA GEMV) and the "magic
number" int→float trick (2²³ + i has the bit pattern 0x4B000000 | i; used for 4-bit → fp16 in
Kim et al., "Who Says Elephants Can't Run", 2022, and Frantar et al.'s Marlin); GGUF block formats
from ggml-common.h / gguf-py quants.py; PTX ISA `fma.rn.f32`.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxmoe.kernels import repack

F32 = jnp.float32
MAGIC = 0x4B000000  # bit pattern of float32 2**23
TWO23 = 8388608.0
# Word groups P and shifts per byte S of each format: t = S·p + s indexes 16-weight slices.
GROUPS = {"q2_k": (2, 4), "q3_k": (2, 4), "q4_k": (4, 2)}


def _field(words, pos: int, mask: int):
    """Float32 2²³ + ((words >> pos) & mask)·2^pos, from one AND/OR on the bit pattern (no conversion)."""
    bits = (words & jnp.uint32(mask << pos)) | jnp.uint32(MAGIC)
    return jax.lax.bitcast_convert_type(bits, F32)


def _dequant(f, scale, use_asm: bool):
    """round((f − 2²³)·scale) as one fused multiply-add fma(f, scale, −2²³·scale) on the GPU."""
    if use_asm:
        f, scale = jnp.broadcast_arrays(f, scale)
        return plt.elementwise_inline_asm(
            "fma.rn.f32 $0, $1, $2, $3;", args=[f, scale, scale * -TWO23], constraints="=f,f,f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(f.shape, F32)])[0]
    return (f - TWO23) * scale  # same single rounding: f − 2²³ is exact


def _chunks(nb: int) -> list[tuple[int, int]]:
    """Split nb super-blocks into power-of-2 runs (Triton tiles are powers of 2): 3 → [(0, 2), (2, 1)]."""
    out, start = [], 0
    for bit in reversed(range(nb.bit_length())):
        if nb & (1 << bit):
            out.append((start, 1 << bit))
            start += 1 << bit
    return out


def _fields(fmt: str, mats: list, e, rows, b0: int, nbt: int, use_asm: bool):
    """Dequantize a row tile field by field: yields (s, lane, pos, [(w, mins) per matrix]).

    w [BN, NBt, 2c, P, 4w] float32 = q·scale·2^pos of the weights in bit field (s, lane) (weight
    l = 128c + 16(S·p + s) + 4w + lane of each super-block); mins [BN, NBt, 2c, P, 1] is what the
    slice's (Q2_K, Q3_K) or sub-block's (Q4_K) weights subtract: the true weight is
    (w − mins·2^pos)·2^−pos. `mats` holds plane refs (`_plane_views`: qs flat per row, so a warp
    reads whole rows with 16-byte loads).
    """
    n_groups, n_shift = GROUPS[fmt]
    words = 2 * n_groups * 4  # qs words per super-block
    bs = pl.ds(b0, nbt)
    st = []  # per matrix: the tile's words and super-block scales
    for w in mats:
        flat = w["qs"][e, rows, pl.ds(b0 * words, nbt * words)]  # [BN, NBt·W] uint32
        q = jnp.swapaxes(flat.reshape(flat.shape[0], nbt, n_groups, 2, 4), 2, 3)  # [BN, NBt, 2c, P, 4w]
        t = {"lo": (q & jnp.uint32(0xFFFF)) | jnp.uint32(MAGIC),  # lanes 0-1 under the exponent of 2²³
             "hi": (q >> 16) | jnp.uint32(MAGIC),  # lanes 2-3
             "d": w["d"][e, rows, bs].astype(F32)[:, :, None, None, None]}  # [BN, NBt, 1, 1, 1]
        if fmt in ("q2_k", "q4_k"):
            t["dmin"] = w["dmin"][e, rows, bs].astype(F32)[:, :, None, None, None]
        if fmt == "q3_k":
            hm = w["hm"][e, rows, bs, :, :][:, :, :, None, :]  # [BN, NBt, 2c, 1, 4]: lane i bit t = 4p + s
            p_shift = (jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, n_groups, 1), 3) * 4).astype(jnp.uint32)
            t["h2"] = hm >> p_shift  # [BN, NBt, 2c, P, 4]: lane i bit s = high bit of slice t = 4p + s
        if fmt == "q4_k":
            t["scale"] = t["d"] * w["sc"][e, rows, bs, :, :].astype(F32)[..., None]  # [BN, NBt, 2c, 4, 1]
            t["mins"] = t["dmin"] * w["mn"][e, rows, bs, :, :].astype(F32)[..., None]
        st.append(t)
    for s in range(n_shift):
        for w, t in zip(mats, st):
            if fmt == "q2_k":
                sc = w["sc"][e, rows, bs, :, :, s]  # [BN, NBt, 2c, 2] uint8: low nibble scale, high nibble min
                t["scale"] = t["d"] * (sc & 15).astype(F32)[..., None]
                t["mins"] = t["dmin"] * (sc >> 4).astype(F32)[..., None]
            elif fmt == "q3_k":
                t["scale"] = t["d"] * w["sc"][e, rows, bs, :, :, s].astype(F32)[..., None]  # signed 6-bit − 32
                t["mins"] = 4.0 * t["scale"]  # weight = scale·(value − 4)
                # value low + 4·high ∈ [0, 8) of slice (p, s): lanes 0-1 (word lo) and 2-3 (word hi)
                keep = jnp.uint32(0xFFFF0000 | (0x0303 << 2 * s))
                hmask = jnp.uint32(0x0404 << 2 * s)
                t["merged"] = ((t["lo"] & keep) | ((t["h2"] << (s + 2)) & hmask),
                               (t["hi"] & keep) | ((t["h2"] >> (14 - s)) & hmask))
        for lane in range(4):
            pos = 8 * (lane % 2) + (4 if fmt == "q4_k" else 2) * s
            outs = []
            for t in st:
                src = t["lo"] if lane < 2 else t["hi"]
                if fmt == "q4_k":
                    bits = src & jnp.uint32(MAGIC | (0xF << pos))
                elif fmt == "q2_k":
                    bits = src & jnp.uint32(MAGIC | (0x3 << pos))
                else:
                    bits = t["merged"][lane // 2] & jnp.uint32(MAGIC | (0x7 << pos))
                f = jax.lax.bitcast_convert_type(bits, F32)  # 2²³ + q·2^pos
                outs.append((_dequant(f, t["scale"], use_asm), t["mins"]))  # q·2^pos·scale, one rounding
            yield s, lane, pos, outs


def _sum_rows(a):
    """[BN, NBt, 2, P, 4] → [BN]."""
    return jnp.sum(jnp.sum(jnp.sum(jnp.sum(a, axis=4), axis=3), axis=2), axis=1)


def _rows_dot(fmt: str, mats: list, e, rows, nb: int, xget, mt: int, use_asm: bool) -> list:
    """x·W[rows]ᵀ by float FMAs for one expert and each matrix of `mats` → per matrix, per token, [BN] float32.

    xget(bs, m, s, i) returns the activations [NBt, 2, P, 4] (float32) that meet field (s, lane i);
    they are scaled by 2^−pos (exact) and shared by every matrix and row of the program. Minimums
    enter once per slice / sub-block through the sum of its activations.
    """
    n_shift = GROUPS[fmt][1]
    out = [[None] * mt for _ in mats]
    for b0, nbt in _chunks(nb):
        bs = pl.ds(b0, nbt)
        acc = [[None] * mt for _ in mats]

        def add(k, m, term):
            acc[k][m] = term if acc[k][m] is None else acc[k][m] + term

        xsum = [None] * mt
        for s, lane, pos, outs in _fields(fmt, mats, e, rows, b0, nbt, use_asm):
            if lane == 0 and fmt != "q4_k":
                xsum = [None] * mt
            xs = [xget(bs, m, s, lane) for m in range(mt)]
            for m in range(mt):
                xsum[m] = xs[m] if xsum[m] is None else xsum[m] + xs[m]
                xsc = (xs[m] * 2.0 ** -pos)[None]
                for k, (wv, _) in enumerate(outs):
                    add(k, m, wv * xsc)
            if lane == 3 and (fmt != "q4_k" or s == n_shift - 1):  # the slice / sub-block is complete
                for k, (_, mins) in enumerate(outs):
                    for m in range(mt):
                        add(k, m, -mins * xsum[m][None])
        for k in range(len(mats)):
            for m in range(mt):
                part = _sum_rows(acc[k][m])
                out[k][m] = part if out[k][m] is None else out[k][m] + part
    return out


def _rows_mma(fmt: str, mats: list, e, rows, nb: int, xtile, use_asm: bool) -> list:
    """x·W[rows]ᵀ on the tensor cores for one expert → per matrix [MT, BN] float32 (MT ≥ 16 tokens).

    Each field (s, lane) of the tile is dequantized to bf16 (true weight · 2^pos, minimum
    included) and meets the matching activations xtile(bs, s, lane) [MT, NBt, 2, P, 4] · 2^−pos in one
    `dot` per matrix with float32 accumulation: the contraction order is a permutation of K, the same
    for both operands. The activation tile is loaded once per field and used by every matrix.
    """
    acc = [None] * len(mats)
    for b0, nbt in _chunks(nb):
        bs = pl.ds(b0, nbt)
        for s, lane, pos, outs in _fields(fmt, mats, e, rows, b0, nbt, use_asm):
            xt = xtile(bs, s, lane).astype(F32) * 2.0 ** -pos
            xt = xt.reshape(xt.shape[0], -1).astype(jnp.bfloat16)  # [MT, K'] in field order
            for k, (wv, mins) in enumerate(outs):
                wt = wv - mins * 2.0 ** pos  # (q·scale − min)·2^pos
                wt = wt.reshape(wt.shape[0], -1).astype(jnp.bfloat16)  # [BN, K'] in the same order
                part = jax.lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), preferred_element_type=F32)
                acc[k] = part if acc[k] is None else acc[k] + part
    return acc


def _up_kernel_mma(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, split, nf):
    """Launch A on the tensor cores: h[g, tokens, rows] = SiLU(x·W_gateᵀ) · (x·W_upᵀ).

    split: programs j < nf compute gate rows, the others up rows (half the code per program), and
    write them to out[g, tokens, 0 | 1, rows]; SiLU·mul is then one small XLA fusion before launch B.
    """
    k = len(names)
    gate, up = dict(zip(names, refs[:k])), dict(zip(names, refs[k:2 * k]))
    x_ref, h_ref = refs[2 * k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    ms = pl.ds(i * mt, mt)
    xtile = lambda bs, s, lane: x_ref[ms, bs, :, :, s, :, lane]
    if not split:
        rows = pl.ds(j * bn, bn)
        hg, hu = _rows_mma(fmt, [gate, up], e, rows, nb, xtile, use_asm)
        h_ref[g, ms, rows] = hg * jax.nn.sigmoid(hg) * hu
        return
    rows = pl.ds((j % nf) * bn, bn)
    for which, mat in enumerate((gate, up)):
        @pl.when(j // nf == which)
        def _():
            (out,) = _rows_mma(fmt, [mat], e, rows, nb, xtile, use_asm)
            h_ref[g, ms, which, rows] = out


def _down_kernel_mma(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, split, nf):
    """Launch B on the tensor cores: y[g, tokens, rows] = h·W_downᵀ."""
    k = len(names)
    down = dict(zip(names, refs[:k]))
    h_ref, y_ref = refs[k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    rows, ms = pl.ds(j * bn, bn), pl.ds(i * mt, mt)
    (y,) = _rows_mma(fmt, [down], e, rows, nb, lambda bs, s, lane: h_ref[g, ms, bs, :, :, s, :, lane], use_asm)
    y_ref[g, ms, rows] = y


def _x_getter(load):
    """Cache activation tiles per (block run, token, group c, shift, lane): gate and up share them."""
    cache = {}

    def get(bs, m, s, lane):
        key = (bs.start, m, s, lane)
        if key not in cache:
            cache[key] = load(bs, m, s, lane).astype(F32)
        return cache[key]

    return get


def _up_kernel(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, split, nf):
    """Launch A: h[g, m, rows] = SiLU(x·W_gate[rows]ᵀ) · (x·W_up[rows]ᵀ) for expert ids[g] (split: see mma)."""
    k = len(names)
    gate, up = dict(zip(names, refs[:k])), dict(zip(names, refs[k:2 * k]))
    x_ref, h_ref = refs[2 * k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    m0 = i * mt
    xget = _x_getter(lambda bs, m, s, lane: x_ref[m0 + m, bs, :, :, s, :, lane])
    if not split:
        rows = pl.ds(j * bn, bn)
        (hg,) = _rows_dot(fmt, [gate], e, rows, nb, xget, mt, use_asm)  # matrix by matrix: fewer live registers
        (hu,) = _rows_dot(fmt, [up], e, rows, nb, xget, mt, use_asm)
        for m in range(mt):
            h_ref[g, m0 + m, rows] = hg[m] * jax.nn.sigmoid(hg[m]) * hu[m]
        return
    rows = pl.ds((j % nf) * bn, bn)
    for which, mat in enumerate((gate, up)):
        @pl.when(j // nf == which)
        def _():
            (out,) = _rows_dot(fmt, [mat], e, rows, nb, _x_getter(lambda bs, m, s, lane: x_ref[m0 + m, bs, :, :, s, :, lane]),
                               mt, use_asm)
            for m in range(mt):
                h_ref[g, m0 + m, which, rows] = out[m]


def _down_kernel(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, split, nf):
    """Launch B: y[g, m, rows] = h[g, m]·W_down[rows]ᵀ for expert ids[g]."""
    k = len(names)
    down = dict(zip(names, refs[:k]))
    h_ref, y_ref = refs[k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    rows = pl.ds(j * bn, bn)
    m0 = i * mt
    xget = _x_getter(lambda bs, m, s, lane: h_ref[g, m0 + m, bs, :, :, s, :, lane])
    (y,) = _rows_dot(fmt, [down], e, rows, nb, xget, mt, use_asm)
    for m in range(mt):
        y_ref[g, m0 + m, rows] = y[m]


def _plane_views(planes: dict, fmt: str) -> list:
    """The kernel's views of a bank's planes (free reshapes): scales as [.., NB, 2c, P, S]."""
    n_groups, n_shift = GROUPS[fmt]
    out = []
    for name in repack.PLANES[fmt]:
        a = planes[name]
        if name == "sc" and fmt != "q4_k":
            a = a.reshape(*a.shape[:-1], n_groups, n_shift)
        elif name == "qs":
            a = a.reshape(*a.shape[:2], -1)  # [E, N, NB·W]: one row's words contiguous
        out.append(a)
    return out


def ffn(x, bank: dict, ids, fmt: str, *, block_n_up: int = 16, num_warps_up: int = 4, block_n_down: int = 32,
        num_warps_down: int = 4, block_m: int = 1, mma: bool = False, split_up: bool = False,
        interpret: bool = False):
    """SwiGLU FFN of experts ids [G] on x [M, H] with the register-dequantizing kernels → [G, M, H] float32.

    mma=False: float FMAs (float32 throughout; block_m tokens per program, unrolled). mma=True:
    bf16 tensor-core dots on the dequantized fields (block_m ≥ 16 tokens per program; M is padded).
    split_up: launch A runs gate and up rows in separate programs (twice the programs, half the code
    each); SiLU(gate)·up is one small XLA fusion between the launches (run 4 measured applying it
    inside launch B: slower in every case, e.g. launch B 8.4 → 14 µs at M = 1).
    """
    if mma and block_m < 16:
        raise ValueError(f"the tensor-core kernels need block_m ≥ 16, not {block_m}")
    names = repack.PLANES[fmt]
    e_, f, nb_up = bank["gate"]["d"].shape
    h = nb_up * repack.QK_K
    nb_down = f // repack.QK_K
    g = ids.shape[0]
    m = x.shape[0]
    mt = block_m if mma else max(1, min(block_m, m))
    mp = -(-m // mt) * mt
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    n_groups, n_shift = GROUPS[fmt]
    use_asm = not interpret
    xv = x.reshape(mp, nb_up, 2, n_groups, n_shift, 4, 4)  # weight order k = 256b + 128c + 16(S·p + s) + 4w + i
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # JAX 0.11 deprecates the Triton backend
        up_call = pl.pallas_call(
            functools.partial(_up_kernel_mma if mma else _up_kernel, fmt=fmt, names=names, nb=nb_up, bn=block_n_up, mt=mt,
                              use_asm=use_asm, split=split_up, nf=f // block_n_up),
            grid=(g, (2 if split_up else 1) * f // block_n_up, mp // mt),
            out_shape=jax.ShapeDtypeStruct((g, mp, 2, f) if split_up else (g, mp, f), F32),
            compiler_params=plt.CompilerParams(num_warps=num_warps_up, num_stages=1),
            interpret=interpret, name=f"ffn_up_{'mma' if mma else 'fma'}_{fmt}")
        hmat = up_call(ids, *_plane_views(bank["gate"], fmt), *_plane_views(bank["up"], fmt), xv)
        down_call = pl.pallas_call(
            functools.partial(_down_kernel_mma if mma else _down_kernel, fmt=fmt, names=names, nb=nb_down, bn=block_n_down, mt=mt,
                              use_asm=use_asm, split=split_up, nf=f // block_n_up),
            grid=(g, h // block_n_down, mp // mt),
            out_shape=jax.ShapeDtypeStruct((g, mp, h), F32),
            compiler_params=plt.CompilerParams(num_warps=num_warps_down, num_stages=1),
            interpret=interpret, name=f"ffn_down_{'mma' if mma else 'fma'}_{fmt}")
        if split_up:
            hmat = hmat[:, :, 0] * jax.nn.sigmoid(hmat[:, :, 0]) * hmat[:, :, 1]
        y = down_call(ids, *_plane_views(bank["down"], fmt), hmat.reshape(g, mp, nb_down, 2, n_groups, n_shift, 4, 4))
    return y[:, :m]
