"""Fused dequantize + matmul for MoE expert SwiGLU FFNs in GGUF Q2_K / Q3_K / Q4_K: the API and its references.

One expert computes y = W_down · (silu(W_gate · x) ⊙ (W_up · x)) with W_gate, W_up: [F, H] and
W_down: [H, F] (Qwen3-30B-A3B: H = 2048, F = 768). A layer's experts live in a *bank*: for each of
gate/up/down the repacked planes of `jaxmoe.kernels.repack`, stacked over the layer's E experts
([E, N, NB, ...]). `expert_ffn(x, bank, ids)` applies each selected expert ids[g] to all M tokens
and returns [G, M, H] float32 (the caller weights and sums them per token).

Implementations: "reference" (float32 dequantize + HIGHEST-precision jnp dots, the test oracle),
"xla" (dequantize to bf16, then bf16 dots: what XLA does without a fused kernel), "pallas" (two
Pallas Triton launches over all selected experts, the family chosen by `BlockConfig.variant`):
  "int": v4, integer `dp2a` dots of the 2/3/4-bit weights on int16 activations (`int_dot.py`);
         the default up to 8 tokens;
  "fma": v3, weights dequantized to float32 in registers, float32 FMAs (`dequant_fma.py`);
  "mma": v3, the same dequantization feeding bf16 tensor-core dots, ≥ 16 tokens per program;
         the default from 16 tokens.
`default_config(m)` holds the measured winners. docs/kernels.md describes the kernels, their
measurements and the earlier versions (v1/v2: int8 `dp4a` dots, removed; see its history).

Backend: Pallas' Triton lowering (`jax.experimental.pallas.triton`); docs/kernels.md says why not
Mosaic GPU. Sources: gguf-py quants.py for the block formats.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.kernels import dequant_fma, int_dot, repack

F32 = jnp.float32
IMPLEMENTATIONS = ("reference", "xla", "pallas")
VARIANTS = ("int", "fma", "mma")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and kernel family of the two launches (rows per program, warps, tokens per program)."""

    block_n_up: int = 16  # gate/up rows per program of launch A (power of 2, divides F; "int": a multiple of 16)
    num_warps_up: int = 4
    block_n_down: int = 8  # down rows per program of launch B (power of 2, divides H)
    num_warps_down: int = 1
    block_m: int = 1  # tokens per program ("mma": ≥ 16, a power of 2)
    variant: str = "fma"  # "int": v4 (int_dot.py); "fma" / "mma": v3 (dequant_fma.py)
    split_up: bool = False  # v3 only: gate and up rows in separate programs of launch A, SiLU·mul as an XLA fusion


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
        half = lambda kk, lo, hi, lead=lead: jax.random.uniform(kk, lead, F32, lo, hi).astype(jnp.float16)
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


def _take(tree, ids):
    return jax.tree_util.tree_map(lambda a: jnp.take(a, ids, axis=0), tree)


def _weights(bank: dict, ids: jax.Array, fmt: str, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    sel = _take(bank, ids)
    if fmt == "bf16":
        return tuple(sel[k].astype(dtype) for k in ("gate", "up", "down"))
    return tuple(dequantize_jnp(sel[k], fmt, dtype) for k in ("gate", "up", "down"))


def ffn_reference(x: jax.Array, bank: dict, ids: jax.Array, fmt: str) -> jax.Array:
    """Float32 reference: dequantize the selected experts, HIGHEST-precision dots → [G, M, H]."""
    wg, wu, wd = _weights(bank, ids, fmt, F32)
    hi = jax.lax.Precision.HIGHEST
    x = x.astype(F32)
    g = jnp.einsum("mk,gnk->gmn", x, wg, precision=hi)
    u = jnp.einsum("mk,gnk->gmn", x, wu, precision=hi)
    h = jax.nn.silu(g) * u
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
# Pallas (Triton) kernels: v3 (dequant_fma) and v4 (int_dot)
# ---------------------------------------------------------------------------------------------


def _check_config(cfg: BlockConfig, h: int, f: int):
    for name in ("block_n_up", "block_n_down", "block_m"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"BlockConfig.{name}={v} must be a power of 2")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"BlockConfig.variant must be one of {VARIANTS}, not {cfg.variant!r}")
    if cfg.split_up and cfg.variant == "int":
        raise ValueError("BlockConfig.split_up applies to the v3 kernels (variant 'fma' or 'mma'), not 'int'")
    if f % cfg.block_n_up or h % cfg.block_n_down:
        raise ValueError(f"BlockConfig rows ({cfg.block_n_up}, {cfg.block_n_down}) must divide F={f} and H={h}")


def ffn_pallas(x: jax.Array, bank: dict, ids: jax.Array, fmt: str, block_config: BlockConfig | None = None,
               interpret: bool = False) -> jax.Array:
    """The fused kernels (two launches over all selected experts) → [G, M, H] float32."""
    cfg = block_config or default_config(x.shape[0])
    _, h, f = bank_shapes(bank, fmt)
    _check_config(cfg, h, f)
    ids = ids.astype(jnp.int32)
    if cfg.variant == "int":
        return int_dot.ffn(x, bank, ids, fmt, block_n_up=cfg.block_n_up, num_warps_up=cfg.num_warps_up,
                           block_n_down=cfg.block_n_down, num_warps_down=cfg.num_warps_down, block_m=cfg.block_m,
                           interpret=interpret)
    return dequant_fma.ffn(x, bank, ids, fmt, block_n_up=cfg.block_n_up, num_warps_up=cfg.num_warps_up,
                           block_n_down=cfg.block_n_down, num_warps_down=cfg.num_warps_down, block_m=cfg.block_m,
                           mma=cfg.variant == "mma", split_up=cfg.split_up, interpret=interpret)


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
