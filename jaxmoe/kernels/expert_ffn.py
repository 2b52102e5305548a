"""Fused dequantize + matmul for MoE expert SwiGLU FFNs in GGUF Q2_K / Q3_K / Q4_K (Pallas).

One expert computes y = W_down · (silu(W_gate · x) ⊙ (W_up · x)) with W_gate, W_up: [F, H] and
W_down: [H, F] (Qwen3-30B-A3B: H = 2048, F = 768). A layer's experts live in a *bank*: for each of
gate/up/down the repacked planes of `jaxmoe.kernels.repack`, stacked over the layer's E experts
([E, N, NB, ...]). `expert_ffn(x, bank, ids)` applies each selected expert ids[g] to all M tokens
and returns [G, M, H] float32 (the caller weights and sums them per token).

Kernel algorithm (decode GEMV, M = 1…16 tokens; llama.cpp's `mul_mat_vec_q` idea in Pallas):
the activations are quantized to int8 in blocks of 16 with a float scale (as llama.cpp's q8_1
does for its quantized mat-vec path), so that one 32-bit word of packed weights (four 2/3/4-bit
quants, one per byte after a shift and a mask) meets one 32-bit word of four int8 activations in a
single `dp4a` (4-way int8 dot product with int32 accumulate). By default a second int8 word holds
the rounding residual (x ≈ step·(256·hi + lo), "act_bits=16"), two dp4a per word, so the result is
as accurate as float activations (int8 alone gives ≈1 % error on this FFN). Per 16-weight slice the
integer dot is scaled by the activation step and the sub-block scale in float32, the sub-block min
term uses the slice's activation sum, and the super-block's half-float d/dmin multiply once per
256 weights; all accumulation is float32. Two launches per layer, each covering all G experts:
  A: grid (G, F/BN, M/MT): gate and up rows of one tile, SiLU(gate)·up → h [G, M, F] float32;
  B: grid (G, H/BN, M/MT): down rows of one tile against quantized h → y [G, M, H] float32.
The expert id is read from `ids` inside the kernel (a scalar load), so the bank is indexed in place.
Variant "vec" (default) loads every super-block of a row tile at once (no K loop: all loads issue
together) and quantizes the activations inside the kernel; variant "loop" (the first version) walks
K with a loop and quantizes with jnp between the launches.

Backend: Pallas' Triton lowering (`jax.experimental.pallas.triton`); docs/kernels.md says why not
Mosaic GPU. `dp4a` is PTX inline assembly on the GPU and an exact jnp emulation in interpret mode.

Implementations: "reference" (float32 dequantize + HIGHEST-precision jnp dots, the test oracle),
"xla" (dequantize to bf16, then bf16 dots: what XLA does without a fused kernel), "pallas".
Sources: ggml/src/ggml-cuda/mmvq.cu and vecdotq.cuh (vec_dot_q2_K_q8_1 etc.: int8 activations +
dp4a per 4 weights); PTX ISA `dp4a`; gguf-py quants.py for the block formats.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxmoe.kernels import dequant_fma, int_dot, repack

F32 = jnp.float32
IMPLEMENTATIONS = ("reference", "xla", "pallas")
VARIANTS = ("int", "fma", "mma", "vec", "loop")
MASK2, MASK4, MASKH = repack.MASK2, repack.MASK4, repack.MASKH


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and kernel family of the two launches (rows per program, warps, tokens per program)."""

    block_n_up: int = 16  # gate/up rows per program of launch A (power of 2, divides F)
    num_warps_up: int = 4
    num_stages_up: int = 1
    block_n_down: int = 8  # down rows per program of launch B (power of 2, divides H)
    num_warps_down: int = 1
    num_stages_down: int = 1
    block_m: int = 1  # tokens per program ("mma": ≥ 16, a power of 2)
    variant: str = "fma"  # "int": v4 (int_dot.py); "fma"/"mma": v3 (dequant_fma.py); "vec"/"loop": v2/v1 int8 dp4a
    split_up: bool = False  # v3: gate and up rows in separate programs of launch A, SiLU·mul as an XLA fusion
    act_bits: int = 16  # v1/v2 only: activation precision, 16 (two int8 words, hi·256 + lo) or 8 (llama.cpp's q8_1)


def default_config(m: int) -> BlockConfig:
    """The block configuration `expert_ffn` uses for m tokens when none is given: the fastest measured.

    From device run 8 (results/run8_v4c, H200, 8 experts of Qwen3-30B-A3B shape): v4 integer dots up to
    8 tokens (launch B with 16 rows per program at M = 1, 2 tokens per program above), bf16 tensor cores
    with split gate/up programs from 16.
    """
    if m == 1:
        return BlockConfig(block_n_down=16, variant="int")
    if m < 16:
        return BlockConfig(block_m=2, variant="int")
    if m < 64:
        return BlockConfig(block_n_up=32, block_n_down=64, num_warps_down=4, block_m=16, variant="mma", split_up=True)
    return BlockConfig(block_n_up=32, block_n_down=32, num_warps_down=4, block_m=64, variant="mma", split_up=True)


# ---------------------------------------------------------------------------------------------
# Banks
# ---------------------------------------------------------------------------------------------


def bank_from_gguf(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: str) -> dict:
    """Bank from GGUF bytes [E, F, row_bytes] (gate, up) and [E, H, row_bytes] (down) → jnp planes."""
    return {name: {k: jnp.asarray(v) for k, v in repack.pack(raw, fmt).items()}
            for name, raw in (("gate", gate), ("up", up), ("down", down))}


def bank_shapes(bank: dict, fmt: str) -> tuple[int, int, int]:
    """(E, H, F) of a bank."""
    if fmt == "bf16":
        e, f, h = bank["gate"].shape
    else:
        e, f, nb = bank["gate"]["d"].shape
        h = nb * repack.QK_K
    return e, h, f


def random_bank(fmt: str, n_experts: int, hidden: int, ffn: int, seed: int = 0) -> dict:
    """A bank of random valid experts generated on the default device (planes, or bf16 matrices)."""
    key = jax.random.PRNGKey(seed)
    if fmt == "bf16":
        k1, k2, k3 = jax.random.split(key, 3)
        rnd = lambda k, shape: (0.02 * jax.random.normal(k, shape, F32)).astype(jnp.bfloat16)
        return {"gate": rnd(k1, (n_experts, ffn, hidden)), "up": rnd(k2, (n_experts, ffn, hidden)),
                "down": rnd(k3, (n_experts, hidden, ffn))}
    fmt = repack._check_fmt(fmt)
    bank = {}
    for name, (n, k) in (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn))):
        key, *ks = jax.random.split(key, 8)
        nb = k // repack.QK_K
        lead = (n_experts, n, nb)
        bits = lambda kk, shape: jax.random.bits(kk, shape, jnp.uint32)
        half = lambda kk, lo, hi: jax.random.uniform(kk, lead, F32, lo, hi).astype(jnp.float16)
        if fmt == "q2_k":
            planes = {"qs": bits(ks[0], lead + (2, 2, 4)),
                      "sc": jax.random.randint(ks[1], lead + (2, 8), 0, 256, jnp.int32).astype(jnp.uint8),
                      "d": half(ks[2], 2e-3, 6e-3), "dmin": half(ks[3], 1e-3, 4e-3)}
        elif fmt == "q3_k":
            planes = {"qs": bits(ks[0], lead + (2, 2, 4)), "hm": bits(ks[1], lead + (2, 4)),
                      "sc": jax.random.randint(ks[2], lead + (2, 8), -32, 32, jnp.int32).astype(jnp.int8),
                      "d": half(ks[3], 5e-4, 2e-3)}
        else:
            planes = {"qs": bits(ks[0], lead + (4, 2, 4)),
                      "sc": jax.random.randint(ks[1], lead + (2, 4), 0, 64, jnp.int32).astype(jnp.uint8),
                      "mn": jax.random.randint(ks[2], lead + (2, 4), 0, 64, jnp.int32).astype(jnp.uint8),
                      "d": half(ks[3], 2e-4, 8e-4), "dmin": half(ks[4], 2e-4, 8e-4)}
        bank[name] = planes
    return bank


# ---------------------------------------------------------------------------------------------
# Plain-jnp reference: dequantize planes, quantize activations
# ---------------------------------------------------------------------------------------------


def _lanes(words: jax.Array) -> jax.Array:
    """uint32 (...) → (..., 4) int32 byte lanes."""
    return jnp.stack([((words >> (8 * i)) & 0xFF).astype(jnp.int32) for i in range(4)], axis=-1)


def _plane_values(qs: jax.Array, bits: int) -> jax.Array:
    """qs words (..., NB, P, 2, 4) → quant values (..., NB*256) int32 in weight order."""
    S = 8 // bits
    lanes = _lanes(qs)  # (..., NB, p, c, w, i)
    vals = jnp.stack([(lanes >> (bits * s)) & ((1 << bits) - 1) for s in range(S)], axis=-3)  # (p, c, s, w, i)
    vals = jnp.swapaxes(vals, -5, -4)  # (c, p, s, w, i)
    return vals.reshape(*vals.shape[:-6], -1)


def dequantize_jnp(planes: dict, fmt: str, dtype=F32) -> jax.Array:
    """Planes of W[..., N, K] → W as `dtype` (plain jnp, float32 arithmetic)."""
    d = planes["d"].astype(F32)[..., None]
    if fmt == "q2_k":
        q = _plane_values(planes["qs"], 2).astype(F32)
        sc = planes["sc"].reshape(*planes["sc"].shape[:-2], 16)
        dmin = planes["dmin"].astype(F32)[..., None]
        scale = jnp.repeat(d * (sc & 15).astype(F32), 16, axis=-1)
        mins = jnp.repeat(dmin * (sc >> 4).astype(F32), 16, axis=-1)
        w = scale.reshape(*scale.shape[:-2], -1) * q - mins.reshape(*mins.shape[:-2], -1)
    elif fmt == "q3_k":
        q = _plane_values(planes["qs"], 2)
        hl = _lanes(planes["hm"])  # (..., NB, c, w, i), bit t
        hb = jnp.stack([(hl >> t) & 1 for t in range(8)], axis=-3)  # (c, t, w, i)
        q = (q + 4 * hb.reshape(q.shape) - 4).astype(F32)
        sc = planes["sc"].reshape(*planes["sc"].shape[:-2], 16).astype(F32)
        scale = jnp.repeat(d * sc, 16, axis=-1)
        w = scale.reshape(*scale.shape[:-2], -1) * q
    elif fmt == "q4_k":
        q = _plane_values(planes["qs"], 4).astype(F32)
        sc = planes["sc"].reshape(*planes["sc"].shape[:-2], 8).astype(F32)
        mn = planes["mn"].reshape(*planes["mn"].shape[:-2], 8).astype(F32)
        dmin = planes["dmin"].astype(F32)[..., None]
        scale = jnp.repeat(d * sc, 32, axis=-1)
        mins = jnp.repeat(dmin * mn, 32, axis=-1)
        w = scale.reshape(*scale.shape[:-2], -1) * q - mins.reshape(*mins.shape[:-2], -1)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return w.astype(dtype)


def _pack_int8(q: jax.Array) -> jax.Array:
    """int32 values in [-128, 127] (..., K) → packed words (..., K/4) uint32, lane i = element 4w + i."""
    lanes = (q.reshape(*q.shape[:-1], -1, 4) & 0xFF).astype(jnp.uint32)
    return lanes[..., 0] | (lanes[..., 1] << 8) | (lanes[..., 2] << 16) | (lanes[..., 3] << 24)


def _unpack_int8(words: jax.Array) -> jax.Array:
    """Inverse of `_pack_int8` → int32 (..., K)."""
    lanes = _lanes(words)
    return jnp.where(lanes >= 128, lanes - 256, lanes).reshape(*words.shape[:-1], -1)


def quantize_activations(x: jax.Array, act_bits: int = 16):
    """x [..., K] → (hi words [..., K/4], lo words or None, step [..., K/16], block sums [..., K/16]).

    Blocks of 16 along K. hi = round(x·127/max|x|) ∈ [-127, 127] (int8, the kernel's dp4a operand).
    act_bits=16 adds lo = round(256·residual) ∈ [-128, 127], a second int8 word, so that
    x ≈ step · (256·hi + lo) with step = max|x|/(127·256); act_bits=8 drops lo (step = max|x|/127),
    llama.cpp's q8_1 precision. The block sum is Σ of the dequantized values (for the min terms).
    """
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, not {act_bits}")
    x = x.astype(F32)
    xb = x.reshape(*x.shape[:-1], -1, 16)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    dx = amax / 127.0
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    v = xb * inv[..., None]
    hi = jnp.clip(jnp.floor(v + 0.5), -127, 127)  # round half up, as the kernel does
    flat = lambda a: a.reshape(*x.shape[:-1], -1)
    if act_bits == 8:
        qsum = jnp.sum(hi, axis=-1)
        return _pack_int8(flat(hi.astype(jnp.int32))), None, dx, dx * qsum
    lo = jnp.clip(jnp.floor((v - hi) * 256.0 + 0.5), -128, 127)
    step = dx / 256.0
    qsum = jnp.sum(hi * 256.0 + lo, axis=-1)
    return _pack_int8(flat(hi.astype(jnp.int32))), _pack_int8(flat(lo.astype(jnp.int32))), step, step * qsum


def dequantize_activations(hi: jax.Array, lo: jax.Array | None, step: jax.Array) -> jax.Array:
    """The values `quantize_activations` encodes: step · (256·hi + lo), or step · hi without lo."""
    q = _unpack_int8(hi).astype(F32)
    if lo is not None:
        q = q * 256.0 + _unpack_int8(lo).astype(F32)
    q = q.reshape(*hi.shape[:-1], -1, 16)
    return (q * step[..., None]).reshape(*hi.shape[:-1], -1)


def _take(tree, ids):
    return jax.tree_util.tree_map(lambda a: jnp.take(a, ids, axis=0), tree)


def _weights(bank: dict, ids: jax.Array, fmt: str, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    sel = _take(bank, ids)
    if fmt == "bf16":
        return tuple(sel[k].astype(dtype) for k in ("gate", "up", "down"))
    return tuple(dequantize_jnp(sel[k], fmt, dtype) for k in ("gate", "up", "down"))


def ffn_reference(x: jax.Array, bank: dict, ids: jax.Array, fmt: str, *, act_bits: int | None = None) -> jax.Array:
    """Float32 reference: dequantize the selected experts, HIGHEST-precision dots → [G, M, H].

    With `act_bits` (8 or 16), x and h pass through `quantize_activations` first, as in the kernel.
    """
    wg, wu, wd = _weights(bank, ids, fmt, F32)
    hi = jax.lax.Precision.HIGHEST
    x = x.astype(F32)
    if act_bits:
        x = dequantize_activations(*quantize_activations(x, act_bits)[:3])
    g = jnp.einsum("mk,gnk->gmn", x, wg, precision=hi)
    u = jnp.einsum("mk,gnk->gmn", x, wu, precision=hi)
    h = jax.nn.silu(g) * u
    if act_bits:
        h = dequantize_activations(*quantize_activations(h, act_bits)[:3])
    return jnp.einsum("gmk,gnk->gmn", h, wd, precision=hi)


def ffn_xla(x: jax.Array, bank: dict, ids: jax.Array, fmt: str) -> jax.Array:
    """XLA baseline: dequantize the selected experts to bf16, then bf16 dots with float32 accumulation."""
    wg, wu, wd = _weights(bank, ids, fmt, jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    g = jnp.einsum("mk,gnk->gmn", xb, wg, preferred_element_type=F32)
    u = jnp.einsum("mk,gnk->gmn", xb, wu, preferred_element_type=F32)
    h = (jax.nn.silu(g) * u).astype(jnp.bfloat16)
    return jnp.einsum("gmk,gnk->gmn", h, wd, preferred_element_type=F32)


# ---------------------------------------------------------------------------------------------
# Pallas (Triton) kernels
# ---------------------------------------------------------------------------------------------


def _dp4a(a, b, use_asm: bool):
    """Σ_i unsigned byte_i(a) · signed byte_i(b) over the 4 byte lanes of uint32 words, → int32."""
    a, b = jnp.broadcast_arrays(a, b)
    if use_asm:
        zero = jnp.zeros(a.shape, jnp.int32)
        return plt.elementwise_inline_asm(
            "dp4a.u32.s32 $0, $1, $2, $3;", args=[a, b, zero], constraints="=r,r,r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])[0]
    acc = jnp.zeros(a.shape, jnp.int32)
    for i in range(4):
        ai = ((a >> (8 * i)) & 0xFF).astype(jnp.int32)
        bi = ((b >> (8 * i)) & 0xFF).astype(jnp.int32)
        acc = acc + ai * jnp.where(bi >= 128, bi - 256, bi)
    return acc


def _slice_dot(q, xw, use_asm):
    """q [BN, 2, 4] uint32 weights, xw = (hi, lo|None) [MT, 2, 4] uint32 activations → [MT, BN, 2] float32.

    The integer dot Σ q·(256·hi + lo) (or Σ q·hi), exact in int32, converted once per 16 weights.
    """
    hi, lo = xw
    dot = jnp.sum(_dp4a(q[None], hi[:, None], use_asm), axis=-1)
    if lo is not None:
        dot = dot * 256 + jnp.sum(_dp4a(q[None], lo[:, None], use_asm), axis=-1)
    return dot.astype(F32)


def _tile(fmt: str, w: dict, e, rows, nb: int, get_x, use_asm: bool, shape: tuple[int, int]):
    """acc [MT, BN] float32 = x · W[rows]ᵀ for one expert `e`: a loop over the nb super-blocks."""

    def body(b, acc):
        d = w["d"][e, rows, b].astype(F32)[None]  # [1, BN]
        blk = None
        mins = None
        if fmt == "q2_k":
            for p in range(2):
                qw = w["qs"][e, rows, b, p, :, :]  # [BN, 2, 4]
                for s in range(4):
                    t = 4 * p + s
                    xw, dx, xs = get_x(b, t)
                    dot = _slice_dot(repack.shift(qw, 2 * s) & jnp.uint32(MASK2), xw, use_asm)
                    scb = w["sc"][e, rows, b, :, t]  # [BN, 2] uint8: scale | min << 4
                    sc = (scb & 15).astype(F32)[None]
                    mn = (scb >> 4).astype(F32)[None]
                    term = dot * dx[:, None, :] * sc
                    mterm = xs[:, None, :] * mn
                    blk = term if blk is None else blk + term
                    mins = mterm if mins is None else mins + mterm
            dmin = w["dmin"][e, rows, b].astype(F32)[None]
            part = d * jnp.sum(blk, axis=-1) - dmin * jnp.sum(mins, axis=-1)
        elif fmt == "q3_k":
            hw = w["hm"][e, rows, b, :, :]  # [BN, 2, 4]
            for p in range(2):
                qw = w["qs"][e, rows, b, p, :, :]
                for s in range(4):
                    t = 4 * p + s
                    xw, dx, xs = get_x(b, t)
                    q = (repack.shift(qw, 2 * s) & jnp.uint32(MASK2)) | (repack.shift(hw, t - 2) & jnp.uint32(MASKH))  # q + 4 ∈ [0, 8)
                    dot = _slice_dot(q, xw, use_asm)
                    sc = w["sc"][e, rows, b, :, t].astype(F32)[None]  # [1, BN, 2]
                    term = (dot * dx[:, None, :] - 4.0 * xs[:, None, :]) * sc
                    blk = term if blk is None else blk + term
            part = d * jnp.sum(blk, axis=-1)
        elif fmt == "q4_k":
            for p in range(4):
                qw = w["qs"][e, rows, b, p, :, :]
                sc = w["sc"][e, rows, b, :, p].astype(F32)[None]
                mn = w["mn"][e, rows, b, :, p].astype(F32)[None]
                for s in range(2):
                    t = 2 * p + s
                    xw, dx, xs = get_x(b, t)
                    dot = _slice_dot(repack.shift(qw, 4 * s) & jnp.uint32(MASK4), xw, use_asm)
                    term = dot * dx[:, None, :] * sc
                    mterm = xs[:, None, :] * mn
                    blk = term if blk is None else blk + term
                    mins = mterm if mins is None else mins + mterm
            dmin = w["dmin"][e, rows, b].astype(F32)[None]
            part = d * jnp.sum(blk, axis=-1) - dmin * jnp.sum(mins, axis=-1)
        else:
            raise ValueError(fmt)
        return acc + part

    return jax.lax.fori_loop(0, nb, body, jnp.zeros(shape, F32))


def _up_kernel(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, two):
    """Launch A: rows [j·bn, (j+1)·bn) of gate and up for expert ids[g], tokens [i·mt, (i+1)·mt)."""
    k = len(names)
    gate = dict(zip(names, refs[:k]))
    up = dict(zip(names, refs[k:2 * k]))
    xw_ref, xl_ref, dx_ref, xs_ref, h_ref = refs[2 * k:] if two else (*refs[2 * k:2 * k + 1], None, *refs[2 * k + 1:])
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    rows = pl.ds(j * bn, bn)
    ms = pl.ds(i * mt, mt)

    def get_x(b, t):
        lo = xl_ref[ms, b, :, t, :] if two else None
        return (xw_ref[ms, b, :, t, :], lo), dx_ref[ms, b, :, t], xs_ref[ms, b, :, t]

    hg = _tile(fmt, gate, e, rows, nb, get_x, use_asm, (mt, bn))
    hu = _tile(fmt, up, e, rows, nb, get_x, use_asm, (mt, bn))
    h_ref[g, ms, rows] = hg * jax.nn.sigmoid(hg) * hu


def _down_kernel(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, two):
    """Launch B: rows [j·bn, (j+1)·bn) of down for expert ids[g] against that expert's quantized h."""
    k = len(names)
    down = dict(zip(names, refs[:k]))
    hw_ref, hl_ref, hd_ref, hs_ref, y_ref = refs[k:] if two else (*refs[k:k + 1], None, *refs[k + 1:])
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    rows = pl.ds(j * bn, bn)
    ms = pl.ds(i * mt, mt)

    def get_x(b, t):
        lo = hl_ref[g, ms, b, :, t, :] if two else None
        return (hw_ref[g, ms, b, :, t, :], lo), hd_ref[g, ms, b, :, t], hs_ref[g, ms, b, :, t]

    y_ref[g, ms, rows] = _tile(fmt, down, e, rows, nb, get_x, use_asm, (mt, bn))


def _quantize_tile(xf, two: bool):
    """In-kernel activation quantization of xf [MT, NBt, 4, 4] (16 values per slice) → ((hi, lo), step, sum).

    Same arithmetic as `quantize_activations`: words [MT, NBt, 4] uint32, step and block sum [MT, NBt].
    """
    amax = jnp.max(jnp.max(jnp.abs(xf), axis=-1), axis=-1)
    inv = jnp.where(amax > 0, 127.0 / jnp.maximum(amax, 1e-30), 0.0)
    v = xf * inv[:, :, None, None]
    hi = jnp.clip(jnp.floor(v + 0.5), -127.0, 127.0)
    shifts = (jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, 4), 3) * 8).astype(jnp.uint32)
    pack = lambda q: jnp.sum((q.astype(jnp.int32) & 0xFF).astype(jnp.uint32) << shifts, axis=-1)
    if two:
        lo = jnp.clip(jnp.floor((v - hi) * 256.0 + 0.5), -128.0, 127.0)
        step = amax * (1.0 / (127.0 * 256.0))
        qsum = jnp.sum(jnp.sum(hi * 256.0 + lo, axis=-1), axis=-1)
        return (pack(hi), pack(lo)), step, step * qsum
    step = amax * (1.0 / 127.0)
    return (pack(hi), None), step, step * jnp.sum(jnp.sum(hi, axis=-1), axis=-1)


def _tile_vec(fmt: str, w: dict, e, rows, nb: int, get_x, use_asm: bool):
    """acc [MT, BN] float32 = x · W[rows]ᵀ: every super-block at once as a tile axis, no K loop.

    Per (chunk c, slice t) the weight words of all blocks form one [BN, NBt, 4] tile; the
    activations of the same slice come from get_x(blocks, c, t) already quantized.
    """
    acc = None
    for b0, nbt in dequant_fma._chunks(nb):
        bs = pl.ds(b0, nbt)
        d = w["d"][e, rows, bs].astype(F32)[None]  # [1, BN, NBt]
        blk = mins = None
        for c in range(2):
            if fmt == "q2_k":
                for p in range(2):
                    qw = w["qs"][e, rows, bs, p, c, :]  # [BN, NBt, 4]
                    for s in range(4):
                        t = 4 * p + s
                        xw, dx, xs = get_x(bs, c, t)
                        dot = _slice_dot(repack.shift(qw, 2 * s) & jnp.uint32(MASK2), xw, use_asm)  # [MT, BN, NBt]
                        scb = w["sc"][e, rows, bs, c, t]  # [BN, NBt]
                        term = dot * dx[:, None, :] * (scb & 15).astype(F32)[None]
                        mterm = xs[:, None, :] * (scb >> 4).astype(F32)[None]
                        blk = term if blk is None else blk + term
                        mins = mterm if mins is None else mins + mterm
            elif fmt == "q3_k":
                hw = w["hm"][e, rows, bs, c, :]  # [BN, NBt, 4]
                for p in range(2):
                    qw = w["qs"][e, rows, bs, p, c, :]
                    for s in range(4):
                        t = 4 * p + s
                        xw, dx, xs = get_x(bs, c, t)
                        q = (repack.shift(qw, 2 * s) & jnp.uint32(MASK2)) | (repack.shift(hw, t - 2) & jnp.uint32(MASKH))
                        dot = _slice_dot(q, xw, use_asm)
                        sc = w["sc"][e, rows, bs, c, t].astype(F32)[None]
                        term = (dot * dx[:, None, :] - 4.0 * xs[:, None, :]) * sc
                        blk = term if blk is None else blk + term
            else:
                for p in range(4):
                    qw = w["qs"][e, rows, bs, p, c, :]
                    sc = w["sc"][e, rows, bs, c, p].astype(F32)[None]
                    mn = w["mn"][e, rows, bs, c, p].astype(F32)[None]
                    for s in range(2):
                        t = 2 * p + s
                        xw, dx, xs = get_x(bs, c, t)
                        dot = _slice_dot(repack.shift(qw, 4 * s) & jnp.uint32(MASK4), xw, use_asm)
                        term = dot * dx[:, None, :] * sc
                        mterm = xs[:, None, :] * mn
                        blk = term if blk is None else blk + term
                        mins = mterm if mins is None else mins + mterm
        part = d * blk
        if mins is not None:
            part = part - w["dmin"][e, rows, bs].astype(F32)[None] * mins
        part = jnp.sum(part, axis=-1)
        acc = part if acc is None else acc + part
    return acc


def _up_kernel_vec(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, two):
    """Launch A (vec): gate and up rows of one tile, x quantized in-kernel, SiLU·mul → h float32."""
    k = len(names)
    gate, up = dict(zip(names, refs[:k])), dict(zip(names, refs[k:2 * k]))
    x_ref, h_ref = refs[2 * k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    rows, ms = pl.ds(j * bn, bn), pl.ds(i * mt, mt)
    cache = {}

    def get_x(bs, c, t):
        key = (bs.start, c, t)
        if key not in cache:  # gate and up share the quantized slice
            cache[key] = _quantize_tile(x_ref[ms, bs, c, t, :, :].astype(F32), two)
        return cache[key]

    hg = _tile_vec(fmt, gate, e, rows, nb, get_x, use_asm)
    hu = _tile_vec(fmt, up, e, rows, nb, get_x, use_asm)
    h_ref[g, ms, rows] = hg * jax.nn.sigmoid(hg) * hu


def _down_kernel_vec(ids_ref, *refs, fmt, names, nb, bn, mt, use_asm, two):
    """Launch B (vec): down rows of one tile against h of expert ids[g], quantized in-kernel."""
    k = len(names)
    down = dict(zip(names, refs[:k]))
    h_ref, y_ref = refs[k:]
    g, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[g]
    rows, ms = pl.ds(j * bn, bn), pl.ds(i * mt, mt)

    def get_x(bs, c, t):
        return _quantize_tile(h_ref[g, ms, bs, c, t, :, :], two)

    y_ref[g, ms, rows] = _tile_vec(fmt, down, e, rows, nb, get_x, use_asm)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _check_config(cfg: BlockConfig, h: int, f: int):
    for name in ("block_n_up", "block_n_down", "block_m"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"BlockConfig.{name}={v} must be a power of 2")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"BlockConfig.variant must be one of {VARIANTS}, not {cfg.variant!r}")
    if cfg.act_bits not in (8, 16):
        raise ValueError(f"BlockConfig.act_bits must be 8 or 16, not {cfg.act_bits}")
    if f % cfg.block_n_up or h % cfg.block_n_down:
        raise ValueError(f"BlockConfig rows ({cfg.block_n_up}, {cfg.block_n_down}) must divide F={f} and H={h}")


def ffn_pallas(x: jax.Array, bank: dict, ids: jax.Array, fmt: str, block_config: BlockConfig | None = None,
               interpret: bool = False) -> jax.Array:
    """The fused kernels (two launches over all selected experts) → [G, M, H] float32."""
    cfg = block_config or default_config(x.shape[0])
    _, h, f = bank_shapes(bank, fmt)
    _check_config(cfg, h, f)
    m = x.shape[0]
    g = ids.shape[0]
    if cfg.variant == "int":
        return int_dot.ffn(x, bank, ids.astype(jnp.int32), fmt, block_n_up=cfg.block_n_up, num_warps_up=cfg.num_warps_up,
                           block_n_down=cfg.block_n_down, num_warps_down=cfg.num_warps_down, block_m=cfg.block_m,
                           interpret=interpret)
    if cfg.variant in ("fma", "mma"):
        return dequant_fma.ffn(x, bank, ids.astype(jnp.int32), fmt, block_n_up=cfg.block_n_up,
                               num_warps_up=cfg.num_warps_up, block_n_down=cfg.block_n_down,
                               num_warps_down=cfg.num_warps_down, block_m=cfg.block_m, mma=cfg.variant == "mma",
                               split_up=cfg.split_up, interpret=interpret)
    mp = _pow2_at_least(m)
    mt = min(cfg.block_m, mp)
    names = repack.PLANES[fmt]
    use_asm = not interpret
    nb_up, nb_down = h // repack.QK_K, f // repack.QK_K
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    two = cfg.act_bits == 16
    ids = ids.astype(jnp.int32)

    def acts(v, lead):
        hi, lo, step, bsum = quantize_activations(v, cfg.act_bits)
        nb = v.shape[-1] // repack.QK_K
        words = [hi.reshape(*lead, nb, 2, 8, 4)] + ([lo.reshape(*lead, nb, 2, 8, 4)] if two else [])
        return words + [step.reshape(*lead, nb, 2, 8), bsum.reshape(*lead, nb, 2, 8)]

    if cfg.variant == "vec":
        return _ffn_pallas_vec(x, bank, ids, fmt, cfg, interpret, mp, mt, g, h, f)[:, :m]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # JAX 0.11 deprecates the Triton backend
        up_call = pl.pallas_call(
            functools.partial(_up_kernel, fmt=fmt, names=names, nb=nb_up, bn=cfg.block_n_up, mt=mt, use_asm=use_asm,
                              two=two),
            grid=(g, f // cfg.block_n_up, mp // mt),
            out_shape=jax.ShapeDtypeStruct((g, mp, f), F32),
            compiler_params=plt.CompilerParams(num_warps=cfg.num_warps_up, num_stages=cfg.num_stages_up),
            interpret=interpret, name=f"ffn_up_{fmt}")
        hmat = up_call(ids, *[bank["gate"][n] for n in names], *[bank["up"][n] for n in names], *acts(x, (mp,)))
        down_call = pl.pallas_call(
            functools.partial(_down_kernel, fmt=fmt, names=names, nb=nb_down, bn=cfg.block_n_down, mt=mt,
                              use_asm=use_asm, two=two),
            grid=(g, h // cfg.block_n_down, mp // mt),
            out_shape=jax.ShapeDtypeStruct((g, mp, h), F32),
            compiler_params=plt.CompilerParams(num_warps=cfg.num_warps_down, num_stages=cfg.num_stages_down),
            interpret=interpret, name=f"ffn_down_{fmt}")
        y = down_call(ids, *[bank["down"][n] for n in names], *acts(hmat, (g, mp)))
    return y[:, :m]


def _ffn_pallas_vec(x, bank, ids, fmt, cfg, interpret, mp, mt, g, h, f):
    """The "vec" variant: two launches, activations quantized inside the kernels, no jnp glue."""
    names = repack.PLANES[fmt]
    two = cfg.act_bits == 16
    nb_up, nb_down = h // repack.QK_K, f // repack.QK_K
    xv = x.reshape(mp, nb_up, 2, 8, 4, 4)  # free view: weight order k = 256b + 128c + 16t + 4w + i
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # JAX 0.11 deprecates the Triton backend
        up_call = pl.pallas_call(
            functools.partial(_up_kernel_vec, fmt=fmt, names=names, nb=nb_up, bn=cfg.block_n_up, mt=mt,
                              use_asm=not interpret, two=two),
            grid=(g, f // cfg.block_n_up, mp // mt),
            out_shape=jax.ShapeDtypeStruct((g, mp, f), F32),
            compiler_params=plt.CompilerParams(num_warps=cfg.num_warps_up, num_stages=cfg.num_stages_up),
            interpret=interpret, name=f"ffn_up_vec_{fmt}")
        hmat = up_call(ids, *[bank["gate"][n] for n in names], *[bank["up"][n] for n in names], xv)
        down_call = pl.pallas_call(
            functools.partial(_down_kernel_vec, fmt=fmt, names=names, nb=nb_down, bn=cfg.block_n_down, mt=mt,
                              use_asm=not interpret, two=two),
            grid=(g, h // cfg.block_n_down, mp // mt),
            out_shape=jax.ShapeDtypeStruct((g, mp, h), F32),
            compiler_params=plt.CompilerParams(num_warps=cfg.num_warps_down, num_stages=cfg.num_stages_down),
            interpret=interpret, name=f"ffn_down_vec_{fmt}")
        return down_call(ids, *[bank["down"][n] for n in names], hmat.reshape(g, mp, nb_down, 2, 8, 4, 4))


def expert_ffn(x: jax.Array, bank: dict, ids: jax.Array, *, fmt: str, implementation: str = "reference",
               block_config: BlockConfig | None = None, interpret: bool = False) -> jax.Array:
    """SwiGLU FFN of experts `ids` [G] of a bank on tokens x [M, H] → [G, M, H] float32."""
    fmt = fmt.lower()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, not {implementation!r}")
    if fmt != "bf16" and fmt not in repack.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: bf16, {', '.join(repack.FORMATS)}")
    ids = jnp.asarray(ids, jnp.int32).reshape(-1)
    if implementation == "reference":
        return ffn_reference(x, bank, ids, fmt)
    if implementation == "xla":
        return ffn_xla(x, bank, ids, fmt)
    if fmt == "bf16":
        raise ValueError("the pallas implementation needs a quantized format (q2_k, q3_k, q4_k)")
    return ffn_pallas(x, bank, ids, fmt, block_config, interpret)
