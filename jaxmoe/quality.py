"""Quality cost of serving experts at 2–3 bits: perplexity, KL divergence, same-top-1, Δp.

`python -m jaxmoe.quality --model MODEL.gguf [--float weights.npz] [--direct model-direct-q2_k.gguf] --json OUT`

Method — llama.cpp's `llama-perplexity` [ggml-org/llama.cpp, tools/perplexity/perplexity.cpp;
`--kl-divergence-base` / `--kl-divergence`]: the evaluation token file is cut into chunks of
n_ctx tokens (n_ctx = 512, the tool's default; llama.cpp takes chunks 0, 1, 2, …; here every s-th
chunk of that same grid, s = ⌊available / wanted⌋, so a small sample spans the whole split). Each
chunk runs from a fresh context (no BOS: Qwen adds none); the logits at positions
first = n_ctx/2 … n_ctx-2 score the next tokens (255 per 512-token chunk), the first half only gives
context. Per scored token, against a reference model (the Q4_K GGUF itself, the baseline):
- NLL of the correct token → perplexity exp(mean NLL);
- KL(P_ref ‖ P) over the whole vocabulary, computed as Σ p_ref·(e^{-d} − 1 + d), d = log p_ref − log p
  (equal to Σ p_ref·d for normalised distributions; every term is ≥ 0 in floating point, so a
  per-token KLD is never negative and is exactly 0 for identical logits);
- same top-1: argmax P == argmax P_ref; Δp: p(correct) − p_ref(correct).
Confidence intervals: percentile bootstrap over chunks (the sequences), 95 %, `--boot` resamples from
`--seed`; one set of resampled chunk indices serves every configuration (paired comparisons), and
`ppl_ratio` = exp(mean NLL − mean NLL_ref) gets its own paired interval.

Configurations (one tidy row each; `precision` is the simulator's policy name, for joining):
- native: the Q4_K baseline (reference itself); with --float also Q4_K against the float model
  (reference "float") and the float model against Q4_K.
- static (sim.precision grammar `static:SIGNAL:X%:FMT`): in every layer the bottom X % of experts by
  SIGNAL ∈ {freq, weight, mass, random}, X = 0, 10, …, 100, served in FMT ∈ {q3_k, q2_k}. The
  low-bit copies are `jaxmoe.quants.requantize` of the model's own Q4_K bytes (source "q4_k"). The
  signals are measured on the calibration split: a routing pass of the Q4_K model over
  `--calib-chunks` chunks becomes a `sim.trace.Trace` (phase prefill, one sequence per chunk) and
  `sim.precision.importance` + `demoted_experts` pick the experts, the very functions the simulator
  uses, so both demote the same experts (the random control uses `--seed`, as `sim.replay` does).
- dynamic (`dynamic:T1:T2:q2_k`, HOBBIT [Tang et al., arXiv 2411.01433, §4.2]): per token and layer
  the selected experts are ranked by gate weight; score = summed weight of the higher-ranked ones
  (`sim.precision.hobbit_scores`); score ≤ T1 runs at Q4_K, T1 < score ≤ T2 at Q2_K, score > T2 is
  skipped: its contribution is dropped and the remaining gate weights are NOT renormalised (HOBBIT's
  skip). Here every access is treated as a cache miss (the bound the simulator approaches at small
  capacity; with a cache, resident copies serve more accesses at high precision). The rule is
  evaluated inside the forward pass on that pass's own gates, with compensated (two-sum) float32
  arithmetic, so its decisions agree with the float64 `hobbit_scores` rule (tested).
- compounding (needs --float or --direct): the same demoted experts quantized from the float weights
  (source "float") instead of re-quantized from Q4_K: either read from a GGUF that `jaxmoe.train
  --direct-formats` wrote (experts quantized straight from float) or quantized here from the float npz.
  Against the Q4_K reference the Q4_K-derived copy is favoured (it starts from the reference's own
  weights), so perplexity, which needs no reference, is the fair comparison there; with --float both
  sides are also scored against the float model (rows with reference "float").
`low_mass` / `skipped_mass`: the share of summed gate weight of the selections served in the low
format / skipped, over every token the pass ran (all chunk positions) with that pass's routing —
the simulator's `low_precision_mass` / `skipped_mass` definition (sim.replay.summarize).

Compute: `jaxmoe.record.grouped_experts` (sparse per-expert tiles) inside one jitted pass per weight
shape; a configuration swaps weight arrays only (a static policy mixes the Q4_K and low-bit expert
arrays per (layer, expert); the dynamic pass stacks [Q4_K; Q2_K] experts on one axis and picks per
selection). The LM head runs on the scored half only (`record.hidden_head`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import gguf_io, quants
from jaxmoe import model as M
from jaxmoe.record import (
    grouped_experts,
    head_logits,
    hidden_head,
    load_tokens,
    read_model,
    sha256_file,
    tile_rows,
)
from sim.io import InputError, atomic_path, exit_on_input_error
from sim.precision import SIGNALS, PrecisionPolicy, demoted_experts, hobbit_scores, importance
from sim.precision import UNIFORM_LOW_FORMATS as LOW_FORMATS  # whole experts re-quantized (no tensor-aware mix here)
from sim.trace import PREFILL, Trace, TraceMeta

F32 = jnp.float32
REPORT_ORDER = ("q3_k", "q2_k")  # the order low formats are run and reported in (each in sim.precision.LOW_FORMATS)
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
DEFAULT_T1 = (0.4, 0.6, 0.8, 1.0)
DEFAULT_T2 = (0.8, 0.9, 1.0)
DEFAULT_COMPOUND_FRACTIONS = (0.2, 0.5, 1.0)
DEFAULT_CTX = 512  # llama-perplexity's default context
DEFAULT_CHUNKS = 16  # evaluation chunks (measured budget: docs/quality.md)
DEFAULT_CALIB_CHUNKS = 32
DEFAULT_BATCH = 4  # chunks per jitted call
DEFAULT_BOOT = 1000
CI_LEVEL = 0.95
ROW_KEYS = ("policy", "precision", "signal", "fraction", "format", "source", "reference", "t1", "t2",
            "low_mass", "skipped_mass", "ppl", "ppl_ci", "ppl_ratio", "ppl_ratio_ci", "kld", "kld_ci",
            "top1", "top1_ci", "dp", "dp_ci", "n_tokens", "n_chunks")


@dataclass(frozen=True)
class Settings:
    """What one quality run evaluates (the defaults are the documented full run)."""

    n_ctx: int = DEFAULT_CTX
    n_chunks: int = DEFAULT_CHUNKS
    calib_chunks: int = DEFAULT_CALIB_CHUNKS
    batch: int = DEFAULT_BATCH
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    signals: tuple[str, ...] = SIGNALS
    formats: tuple[str, ...] = REPORT_ORDER
    t1: tuple[float, ...] = DEFAULT_T1
    t2: tuple[float, ...] = DEFAULT_T2
    dynamic_format: str = "q2_k"
    compound_signal: str = "mass"
    compound_fractions: tuple[float, ...] = DEFAULT_COMPOUND_FRACTIONS
    n_boot: int = DEFAULT_BOOT
    seed: int = 0


QUICK = Settings(n_ctx=64, n_chunks=4, calib_chunks=4, batch=2, fractions=(0.0, 0.5, 1.0),
                 t1=(0.6, 1.0), t2=(0.9, 1.0), compound_fractions=(0.5,), n_boot=200)


# ----------------------------------------------------------------------------- expert variants

def _np_experts(ex: M.ExpertWeights) -> M.ExpertWeights:
    return M.ExpertWeights(gate=np.asarray(ex.gate, np.float32), up=np.asarray(ex.up, np.float32),
                           down=np.asarray(ex.down, np.float32))


def model_experts(weights: M.Weights) -> list[M.ExpertWeights]:
    """Per layer, the experts of `weights` as float32 numpy arrays (model layout)."""
    return [_np_experts(lw.experts) for lw in weights.layers]


def _from_gguf_layout(kind: str, a: np.ndarray) -> np.ndarray:
    # GGUF rows run along the last axis: gate/up [E,F,D] -> [E,D,F]; down [E,D,F] -> [E,F,D]
    return np.ascontiguousarray(a.transpose(0, 2, 1))


def requantized_experts(gguf: gguf_io.GGUFModel, fmt: str) -> list[M.ExpertWeights]:
    """Per layer, every expert re-quantized from the file's stored bytes to `fmt` and dequantized."""
    out = []
    for l in range(gguf.cfg.n_layers):
        mats = {}
        for kind in gguf_io.EXPERT_KINDS:
            t = gguf.tensors[gguf_io.expert_tensor_name(l, kind)]
            if t.fmt in gguf_io.FLOAT_FORMATS:
                low = quants.quantize(np.asarray(t.data, np.float32), fmt)
            else:
                low = quants.requantize(t.data, t.fmt, fmt, t.shape)
            mats[kind] = _from_gguf_layout(kind, quants.dequantize(low, fmt, t.shape))
        out.append(M.ExpertWeights(**mats))
    return out


def float_quantized_experts(float_weights: M.Weights, cfg: M.Config, fmt: str) -> list[M.ExpertWeights]:
    """Per layer, every expert quantized from the float weights to `fmt` and dequantized."""
    tensors = gguf_io.weights_to_tensors(float_weights, cfg)
    out = []
    for l in range(cfg.n_layers):
        mats = {}
        for kind in gguf_io.EXPERT_KINDS:
            a = tensors[gguf_io.expert_tensor_name(l, kind)]
            mats[kind] = _from_gguf_layout(kind, quants.dequantize(quants.quantize(a, fmt), fmt, a.shape))
        out.append(M.ExpertWeights(**mats))
    return out


def mix_experts(base: Sequence[M.ExpertWeights], low: Sequence[M.ExpertWeights],
                demoted: np.ndarray) -> list[M.ExpertWeights]:
    """Per layer, expert e from `low` where demoted[layer, e], else from `base`."""
    out = []
    for l, (b, lo) in enumerate(zip(base, low)):
        m = np.asarray(demoted[l], bool)[:, None, None]
        out.append(M.ExpertWeights(*(np.where(m, y, x) for x, y in ((b.gate, lo.gate), (b.up, lo.up),
                                                                    (b.down, lo.down)))))
    return out


def stack_experts(base: Sequence[M.ExpertWeights], low: Sequence[M.ExpertWeights]) -> list[M.ExpertWeights]:
    """Per layer, [base; low] on the expert axis (2E experts: id e + E is expert e's low copy)."""
    return [M.ExpertWeights(*(np.concatenate([x, y]) for x, y in ((b.gate, lo.gate), (b.up, lo.up),
                                                                  (b.down, lo.down))))
            for b, lo in zip(base, low)]


def with_experts(weights: M.Weights, experts: Sequence[M.ExpertWeights]) -> M.Weights:
    """`weights` with each layer's experts replaced."""
    return dataclasses.replace(weights, layers=[dataclasses.replace(lw, experts=ex)
                                                for lw, ex in zip(weights.layers, experts)])


# ----------------------------------------------------------------------------- HOBBIT rule in JAX

def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's error-free sum: s + err == a + b exactly (float32)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def threshold_pair(t: float) -> np.ndarray:
    """A float64 threshold as an unevaluated float32 pair (hi, lo), hi + lo ≈ t to ~2⁻⁴⁸."""
    hi = np.float32(t)
    return np.array([hi, np.float32(t - float(hi))], np.float32)


def _exceeds(hi, lo, t):
    """(hi + lo) > (t[0] + t[1]) for float32 pairs, decided by the sign of an exactly formed difference."""
    return (hi - t[0]) + (lo - t[1]) > 0


def exclusive_scores(gates: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Compensated exclusive prefix sums (hi, lo) of gates [..., k]: HOBBIT's score of each rank."""
    k = gates.shape[-1]
    g = gates.astype(F32)
    zero = jnp.zeros(g.shape[:-1], F32)
    s, c = zero, zero
    his, los = [zero], [zero]
    for r in range(k - 1):
        s, e = _two_sum(s, g[..., r])
        c = c + e
        his.append(s)
        los.append(c)
    return jnp.stack(his, -1), jnp.stack(los, -1)


def hobbit_masks(gates: jax.Array, t1: jax.Array, t2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HOBBIT's rule on gates [..., k] in rank order → (low, skip) bool: T1 < score ≤ T2, score > T2.

    score = exclusive prefix sum of the gates, accumulated with two-sum so that hi + lo is the exact
    sum to ~2⁻⁴⁸; t1, t2 are `threshold_pair`s. Agrees with the float64 `sim.precision.hobbit_scores`
    comparisons except for scores within ~1e-13 of a threshold.
    """
    hi, lo = exclusive_scores(gates)
    over1, over2 = _exceeds(hi, lo, t1), _exceeds(hi, lo, t2)
    return over1 & ~over2, over2


def dynamic_expert_fn(n_experts: int, t1: jax.Array, t2: jax.Array) -> M.ExpertFn:
    """ExpertFn for [Q4_K; low] stacks of 2E experts: HOBBIT's choice per selection, skips weigh 0."""

    def fn(layer, h, ids, gates, experts):
        del layer
        if experts.gate.shape[0] == n_experts:  # a plain (static) expert set
            return grouped_experts(h, ids, gates, experts, tile=_tile(ids, n_experts))
        low, skip = hobbit_masks(gates, t1, t2)
        return grouped_experts(h, ids + n_experts * low.astype(ids.dtype), jnp.where(skip, 0.0, gates), experts,
                               tile=_tile(ids, n_experts))

    return fn


def _tile(ids: jax.Array, n_experts: int) -> int:
    # one tile size per token count (not per stack size), so a [Q4_K; low] stack that picks no low copy
    # runs the same tiles as the plain Q4_K experts and gives bit-identical results
    return tile_rows(int(np.prod(ids.shape)), n_experts)


# ----------------------------------------------------------------------------- passes

def chunk_starts(n_tokens: int, n_ctx: int, n_chunks: int) -> np.ndarray:
    """Start offsets of n_chunks chunks: every s-th chunk of llama.cpp's grid 0, n_ctx, 2·n_ctx, …"""
    available = n_tokens // n_ctx
    if n_chunks < 1 or available < n_chunks:
        raise ValueError(f"{n_tokens} tokens hold {available} chunks of {n_ctx}; {n_chunks} wanted")
    stride = available // n_chunks
    return np.arange(n_chunks, dtype=np.int64) * stride * n_ctx


def make_chunks(tokens: np.ndarray, n_ctx: int, n_chunks: int, path=None) -> np.ndarray:
    """int32 [n_chunks, n_ctx] chunks of a token array (see `chunk_starts`)."""
    try:
        starts = chunk_starts(tokens.size, n_ctx, n_chunks)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    return np.stack([tokens[s:s + n_ctx] for s in starts]).astype(np.int32)


def _kl_terms(lp_ref: jax.Array, lp: jax.Array) -> jax.Array:
    """Per-token KL(P_ref ‖ P) = Σ p_ref·(e^{-d} − 1 + d), d = lp_ref − lp; each term ≥ 0."""
    d = lp_ref - lp
    p_ref = jnp.exp(lp_ref)
    safe = jnp.where(d < -30.0, 0.0, d)  # e^{-d} would overflow: use p − p_ref + p_ref·d there (≈ p ≥ 0)
    term = jnp.where(d < -30.0, jnp.exp(lp) - p_ref + p_ref * d, p_ref * (jnp.expm1(-safe) + safe))
    return jnp.sum(term, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "first"))
def _pass(tokens, weights, head, ref_logp, t1, t2, cfg, first):
    """One batch of chunks: hidden states → scored log-probs, stats against ref_logp, routing."""
    fn = dynamic_expert_fn(cfg.n_experts, t1, t2)
    hidden, routing = M.forward(tokens, weights, cfg, expert_fn=fn)
    logp = jax.nn.log_softmax(head_logits(hidden[:, first:-1], head), axis=-1)  # [B, n, V]
    tgt = tokens[:, first + 1:]
    lp_t = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    ref_t = jnp.take_along_axis(ref_logp, tgt[..., None], axis=-1)[..., 0]
    stats = {
        "nll": -lp_t, "ref_nll": -ref_t,
        "kl": _kl_terms(ref_logp, logp), "kl_rev": _kl_terms(logp, ref_logp),
        "top1": (jnp.argmax(logp, -1) == jnp.argmax(ref_logp, -1)).astype(F32),
        "dp": jnp.exp(lp_t) - jnp.exp(ref_t),
    }
    return logp, stats, routing.ids, routing.gates


@dataclass
class PassResult:
    """Per-chunk sums of one configuration's pass, and its routing-mass accounting."""

    sums: dict[str, np.ndarray]  # key → float64 [n_chunks] (nll, ref_nll, kl, kl_rev, top1, dp)
    n_per_chunk: int
    low_mass: float
    skipped_mass: float
    logp: np.ndarray | None = None  # float32 [n_chunks, n, V] when kept (the reference pass)
    ids: np.ndarray | None = None  # int32 [n_chunks, n_ctx, L, k] routing, when kept
    gates: np.ndarray | None = None  # float32 [n_chunks, n_ctx, L, k]


class Evaluator:
    """Runs configurations over fixed evaluation chunks against a stored reference distribution."""

    def __init__(self, weights: M.Weights, cfg: M.Config, chunks: np.ndarray, batch: int,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.chunks = chunks
        self.batch = max(1, min(batch, chunks.shape[0]))
        self.first = chunks.shape[1] // 2
        self.n_scored = chunks.shape[1] - 1 - self.first
        w_hidden, head = hidden_head(weights)
        self.base = jax.tree_util.tree_map(jnp.asarray, w_hidden)
        self.head = head
        self.ref_logp: np.ndarray | None = None
        self.log = log or (lambda msg: None)

    def _batches(self):
        C, B = self.chunks.shape[0], self.batch
        for lo in range(0, C, B):
            idx = np.arange(lo, lo + B)
            n_real = min(B, C - lo)
            idx[n_real:] = idx[n_real - 1] if n_real else 0  # pad the last batch by repeating a chunk
            yield lo, n_real, self.chunks[np.minimum(idx, C - 1)]

    def run(self, experts: Sequence[M.ExpertWeights] | None = None, *, t1: float = 1.0, t2: float = 1.0,
            demoted: np.ndarray | None = None, keep_logp: bool = False, keep_routing: bool = False,
            weights: M.Weights | None = None) -> PassResult:
        """Evaluate one configuration: `experts` replace the model's (E, or 2E = [Q4_K; low] for HOBBIT's
        rule with t1, t2); `demoted` [L,E] marks the static low-precision experts for the mass accounting;
        `weights` (hidden-head form) replaces the whole model (the float model)."""
        w = self.base if weights is None else weights
        if experts is not None:
            w = with_experts(w, [jax.tree_util.tree_map(jnp.asarray, ex) for ex in experts])
        dynamic = experts is not None and np.shape(experts[0].gate)[0] == 2 * self.cfg.n_experts
        C, n, V = self.chunks.shape[0], self.n_scored, self.cfg.vocab
        sums = {k: np.zeros(C) for k in ("nll", "ref_nll", "kl", "kl_rev", "top1", "dp")}
        logp_all = np.zeros((C, n, V), np.float32) if keep_logp else None
        mass = np.zeros(3)  # total, low, skipped
        routing = []
        ref = self.ref_logp
        for lo, n_real, toks in self._batches():
            ref_b = np.zeros((toks.shape[0], n, V), np.float32) if ref is None else \
                ref[np.minimum(np.arange(lo, lo + toks.shape[0]), C - 1)]
            logp, stats, ids, gates = _pass(jnp.asarray(toks), w, self.head, jnp.asarray(ref_b),
                                            jnp.asarray(threshold_pair(t1)), jnp.asarray(threshold_pair(t2)),
                                            self.cfg, self.first)
            for k, v in stats.items():
                sums[k][lo:lo + n_real] = np.asarray(v, np.float64)[:n_real].sum(axis=1)
            if keep_logp:
                logp_all[lo:lo + n_real] = np.asarray(logp)[:n_real]
            ids, gates = np.asarray(ids)[:n_real], np.asarray(gates)[:n_real]
            mass += selection_mass(ids, gates, demoted=demoted, t1=t1 if dynamic else None,
                                   t2=t2 if dynamic else None)
            if keep_routing:
                routing.append((ids, gates))
        total = mass[0] or 1.0
        res = PassResult(sums=sums, n_per_chunk=n, low_mass=float(mass[1] / total),
                         skipped_mass=float(mass[2] / total), logp=logp_all)
        if keep_routing:
            res.ids, res.gates = (np.concatenate([r[i] for r in routing]) for i in range(2))
        return res


def selection_mass(ids: np.ndarray, gates: np.ndarray, *, demoted: np.ndarray | None = None,
                   t1: float | None = None, t2: float | None = None) -> np.ndarray:
    """[total, low, skipped] summed gate weight of selections ids/gates [..., L, k] (float64).

    Static: low = selections of demoted[l, e] experts. Dynamic (t1, t2): HOBBIT's rule on
    `sim.precision.hobbit_scores` — low = T1 < score ≤ T2, skipped = score > T2 (every access a miss).
    """
    g = np.asarray(gates, np.float64)
    total = g.sum()
    low = np.zeros(g.shape, bool)
    skip = np.zeros(g.shape, bool)
    if demoted is not None:
        L = ids.shape[-2]
        low |= np.asarray(demoted, bool)[np.arange(L)[:, None], ids]
    if t1 is not None:
        s = hobbit_scores(g)
        skip = s > t2
        low |= (s > t1) & ~skip
    return np.array([total, g[low & ~skip].sum(), g[skip].sum()])


# ----------------------------------------------------------------------------- calibration

def calibration_trace(weights: M.Weights, cfg: M.Config, chunks: np.ndarray, batch: int,
                      model_name: str = "calibration") -> Trace:
    """Route calibration chunks through the model → a Trace (phase prefill, one sequence per chunk)."""
    ev = Evaluator(weights, cfg, chunks, batch)
    ids_all, gates_all = [], []
    zeros = jnp.zeros((ev.batch, ev.n_scored, cfg.vocab), F32)
    t = jnp.asarray(threshold_pair(1.0))
    for _, n_real, toks in ev._batches():
        _, _, ids, gates = _pass(jnp.asarray(toks), ev.base, ev.head, zeros, t, t, cfg, ev.first)
        ids_all.append(np.asarray(ids)[:n_real])
        gates_all.append(np.asarray(gates)[:n_real])
    ids, gates = np.concatenate(ids_all), np.concatenate(gates_all)  # [C, T, L, k]
    C, T, L, k = ids.shape
    meta = TraceMeta(model=model_name, n_layers=L, n_experts=cfg.n_experts, top_k=k,
                     provenance="jaxmoe.quality calibration routing pass",
                     extra={"norm_topk": bool(cfg.norm_topk_prob)})
    return Trace.from_arrays(ids.reshape(C * T, L, k), gates.reshape(C * T, L, k),
                             np.full(C * T, PREFILL, np.uint8), np.repeat(np.arange(C), T), meta)


def demoted_set(calib: Trace, signal: str, fraction: float, seed: int) -> np.ndarray:
    """bool [L, E]: the experts a static policy demotes — exactly sim.precision's choice."""
    return demoted_experts(importance(calib, signal, seed), fraction)


# ----------------------------------------------------------------------------- statistics

def bootstrap_indices(n_chunks: int, n_boot: int, seed: int) -> np.ndarray:
    """int [n_boot, n_chunks]: chunk resamples with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n_chunks, size=(n_boot, n_chunks))


def _ci(samples: np.ndarray) -> list[float]:
    a = (1 - CI_LEVEL) / 2
    return [float(np.percentile(samples, 100 * a)), float(np.percentile(samples, 100 * (1 - a)))]


def metrics(res: PassResult, boot: np.ndarray, reverse: bool = False) -> dict:
    """Point estimates and bootstrap CIs. `reverse`: the reference's numbers against this pass's
    distribution (KL(P‖P_ref) becomes the KLD, Δp flips sign, ppl is the reference's)."""
    s = res.sums
    nll, ref_nll = (s["ref_nll"], s["nll"]) if reverse else (s["nll"], s["ref_nll"])
    kl = s["kl_rev"] if reverse else s["kl"]
    dp = -s["dp"] if reverse else s["dp"]
    n = res.n_per_chunk

    def mean(v, idx=None):
        return v.sum() / (v.size * n) if idx is None else v[idx].sum(axis=1) / (idx.shape[1] * n)

    out = {
        "ppl": math.exp(mean(nll)), "ppl_ci": _ci(np.exp(mean(nll, boot))),
        "ppl_ratio": math.exp(mean(nll) - mean(ref_nll)),
        "ppl_ratio_ci": _ci(np.exp(mean(nll, boot) - mean(ref_nll, boot))),
        "kld": mean(kl), "kld_ci": _ci(mean(kl, boot)),
        "top1": mean(s["top1"]), "top1_ci": _ci(mean(s["top1"], boot)),
        "dp": mean(dp), "dp_ci": _ci(mean(dp, boot)),
        "n_tokens": int(nll.size * n), "n_chunks": int(nll.size),
    }
    return out


def make_row(policy: str, res: PassResult, boot: np.ndarray, *, signal=None, fraction=None, fmt="q4_k",
             source=None, reference="q4_k", t1=None, t2=None, reverse=False, precision=None) -> dict:
    """One tidy result row (keys ROW_KEYS)."""
    if precision is None:
        if policy == "static":
            precision = PrecisionPolicy(static_signal=signal, static_fraction=fraction, static_format=fmt).name
        elif policy == "dynamic":
            precision = PrecisionPolicy(t1=t1, t2=t2, dynamic_format=fmt).name
        else:
            precision = "native"
    row = {"policy": policy, "precision": precision, "signal": signal, "fraction": fraction, "format": fmt,
           "source": source, "reference": reference, "t1": t1, "t2": t2,
           "low_mass": 0.0 if reverse else res.low_mass, "skipped_mass": 0.0 if reverse else res.skipped_mass}
    row |= metrics(res, boot, reverse)
    return {k: row[k] for k in ROW_KEYS}


# ----------------------------------------------------------------------------- the run

def load_float_npz(path: str | Path, cfg: M.Config) -> M.Weights:
    """Float weights from an npz keyed by GGUF tensor name in GGUF layout (jaxmoe.train's weights.npz)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read float weights npz: {exc}") from None
    return gguf_io.tensors_to_weights(arrays, cfg, path)


def direct_experts(path: str | Path, cfg: M.Config, base: gguf_io.GGUFModel | None = None
                   ) -> tuple[str, list[M.ExpertWeights]]:
    """(format, experts) quantized straight from float (jaxmoe.train --direct-formats), all in one low
    format: a GGUF of the same geometry, or an npz of its expert tensors' stored bytes keyed by GGUF
    tensor name (jaxmoe/trained/experts-direct-q2_k.npz; shapes come from the `base` model)."""
    if str(path).endswith(".npz"):
        if base is None:
            raise InputError(path, "an npz of expert bytes needs the baseline model for tensor shapes")
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise InputError(path, f"cannot read expert-bytes npz: {exc}") from None
        fmts, layers = set(), []
        for l in range(cfg.n_layers):
            mats = {}
            for kind in gguf_io.EXPERT_KINDS:
                name = gguf_io.expert_tensor_name(l, kind)
                if name not in arrays:
                    raise InputError(path, f"missing expert tensor {name}")
                shape = base.tensors[name].shape
                data = np.asarray(arrays[name], np.uint8)
                fmt = next((f for f in LOW_FORMATS if data.shape[-1] == quants.get_quant(f).type_size
                            * shape[-1] // quants.get_quant(f).block_weights), None)
                if fmt is None:
                    raise InputError(path, f"{name}: {data.shape[-1]} bytes per row is no low format of a "
                                           f"{shape[-1]}-wide row")
                fmts.add(fmt)
                mats[kind] = _from_gguf_layout(kind, quants.dequantize(data, fmt, shape))
            layers.append(M.ExpertWeights(**mats))
        if len(fmts) != 1:
            raise InputError(path, f"experts must all be in one low format, found {sorted(fmts)}")
        return next(iter(fmts)), layers
    g = read_model(path)
    if g.cfg != cfg:
        raise InputError(path, "model geometry differs from the baseline model's")
    fmts = {g.expert_format(l, k) for l in range(cfg.n_layers) for k in gguf_io.EXPERT_KINDS}
    if len(fmts) != 1 or next(iter(fmts)) not in LOW_FORMATS:
        raise InputError(path, f"experts must all be in one of {', '.join(LOW_FORMATS)}, found {sorted(fmts)}")
    return next(iter(fmts)), model_experts(g.weights)


def _dynamic_grid(t1s: Sequence[float], t2s: Sequence[float]) -> list[tuple[float, float]]:
    return [(a, b) for a in t1s for b in t2s if a <= b]


def run_quality(gguf: gguf_io.GGUFModel, eval_tokens: np.ndarray, calib_tokens: np.ndarray,
                st: Settings, float_weights: M.Weights | None = None,
                log: Callable[[str], None] = lambda msg: None, eval_path=None, calib_path=None,
                direct: dict[str, list[M.ExpertWeights]] | None = None) -> dict:
    """Evaluate every configuration of `st` → {"rows": [...], "setup": {...}, "timing": {...}}.

    Compounding rows use float → low copies of the experts: `direct[fmt]` (experts read from a GGUF
    quantized straight from float, `direct_experts`) or else, with `float_weights`, quantized here.
    """
    cfg = gguf.cfg
    t_start = time.perf_counter()
    for f in (*st.formats, st.dynamic_format):
        if f not in LOW_FORMATS:
            raise InputError(None, f"low format {f!r} must be one of {', '.join(LOW_FORMATS)}")
    for s in st.signals + (st.compound_signal,):
        if s not in SIGNALS:
            raise InputError(None, f"signal {s!r} must be one of {', '.join(SIGNALS)}")
    if st.n_ctx > cfg.max_seq or st.n_ctx < 4:
        raise InputError(None, f"chunk length {st.n_ctx} must be in 4..{cfg.max_seq} (the model's context)")
    eval_chunks = make_chunks(eval_tokens, st.n_ctx, st.n_chunks, eval_path)
    calib_chunks = make_chunks(calib_tokens, st.n_ctx, st.calib_chunks, calib_path)

    t0 = time.perf_counter()
    base_experts = model_experts(gguf.weights)
    low_formats = sorted(set(st.formats) | {st.dynamic_format}, key=REPORT_ORDER.index)
    low = {f: requantized_experts(gguf, f) for f in low_formats}
    float_low = {}
    if st.compound_fractions:
        for f in st.formats:
            if direct and f in direct:
                float_low[f] = direct[f]
            elif float_weights is not None:
                float_low[f] = float_quantized_experts(float_weights, cfg, f)
    quant_s = time.perf_counter() - t0
    log(f"quality: experts re-quantized to {', '.join(low_formats)}"
        f"{' (float → ' + ', '.join(float_low) + ' copies ready)' if float_low else ''} in {quant_s:.1f} s")

    t0 = time.perf_counter()
    calib = calibration_trace(gguf.weights, cfg, calib_chunks, st.batch)
    calib_s = time.perf_counter() - t0
    log(f"quality: calibration routing over {calib.n_steps} tokens in {calib_s:.1f} s")

    ev = Evaluator(gguf.weights, cfg, eval_chunks, st.batch, log)
    boot = bootstrap_indices(st.n_chunks, st.n_boot, st.seed)
    demoted: dict[str, np.ndarray] = {}

    def demote(sig: str, frac: float) -> np.ndarray:
        return demoted.setdefault(f"{sig}:{frac * 100:g}%", demoted_set(calib, sig, frac, st.seed))

    # the plan: (label, key, thunk, rows); jobs with equal keys (e.g. every signal at X = 0 or 100 %) share a pass
    jobs: list[tuple[str, tuple, Callable[[], PassResult], list[dict]]] = [
        ("native q4_k (reference)", ("ref",), lambda: ev.run(keep_logp=True), [{"policy": "native"}])]
    if float_weights is not None:
        fw = jax.tree_util.tree_map(jnp.asarray, hidden_head(float_weights)[0])
        jobs.append(("float model", ("float",), lambda: ev.run(weights=fw, keep_logp=True),
                     [{"policy": "native", "fmt": "f32"},
                      {"policy": "native", "reference": "float", "reverse": True}]))
    for fmt in st.formats:
        for frac in st.fractions:
            for sig in st.signals:
                dm = demote(sig, frac)
                jobs.append((f"static {sig} {frac:.0%} {fmt}", ("q4_k", fmt, dm.tobytes()),
                             lambda dm=dm, fmt=fmt: ev.run(mix_experts(base_experts, low[fmt], dm), demoted=dm),
                             [{"policy": "static", "signal": sig, "fraction": frac, "fmt": fmt, "source": "q4_k"}]))
    if st.t1 and st.t2:
        stack = stack_experts(base_experts, low[st.dynamic_format])
        for a, b in _dynamic_grid(st.t1, st.t2):
            jobs.append((f"dynamic T1={a:g} T2={b:g} {st.dynamic_format}", ("dynamic", a, b),
                         lambda a=a, b=b: ev.run(stack, t1=a, t2=b),
                         [{"policy": "dynamic", "fmt": st.dynamic_format, "source": "q4_k", "t1": a, "t2": b}]))
    for fmt, fl in float_low.items():
        for frac in st.compound_fractions:
            dm = demote(st.compound_signal, frac)
            jobs.append((f"compound float→{fmt} {st.compound_signal} {frac:.0%}", ("float", fmt, dm.tobytes()),
                         lambda dm=dm, fl=fl: ev.run(mix_experts(base_experts, fl, dm), demoted=dm),
                         [{"policy": "static", "signal": st.compound_signal, "fraction": frac, "fmt": fmt,
                           "source": "float"}]))

    # with the float model as reference: both sides of each compounding pair (a Q4_K reference favours the
    # copy re-quantized from Q4_K, which starts from the reference's own weights)
    n_q4_jobs = len(jobs)
    if float_weights is not None:
        for fmt, fl in float_low.items():
            for frac in st.compound_fractions:
                dm = demote(st.compound_signal, frac)
                for source, copies in (("q4_k", low[fmt]), ("float", fl)):
                    jobs.append((f"vs float: {source}→{fmt} {st.compound_signal} {frac:.0%}",
                                 ("vs float", source, fmt, dm.tobytes()),
                                 lambda dm=dm, copies=copies: ev.run(mix_experts(base_experts, copies, dm), demoted=dm),
                                 [{"policy": "static", "signal": st.compound_signal, "fraction": frac, "fmt": fmt,
                                   "source": source, "reference": "float"}]))

    rows: list[dict] = []
    done: dict[tuple, PassResult] = {}
    pass_times: list[float] = []
    float_logp = None
    for i, (label, key, thunk, row_kws) in enumerate(jobs):
        if i == n_q4_jobs:
            ev.ref_logp = float_logp
        t0 = time.perf_counter()
        fresh = key not in done
        if fresh:
            done[key] = thunk()
            pass_times.append(time.perf_counter() - t0)
        res = done[key]
        if i == 0:  # the reference pass: keep its distribution; its row compares it with itself
            ev.ref_logp = res.logp
            res.logp = None
            sums = res.sums
            sums["ref_nll"] = sums["nll"].copy()
            for k in ("kl", "kl_rev", "dp"):
                sums[k] = np.zeros_like(sums[k])
            sums["top1"] = np.full_like(sums["top1"], res.n_per_chunk)
        if key == ("float",):
            float_logp, res.logp = res.logp, None
        for kw in row_kws:
            rows.append(make_row(res=res, boot=boot, **kw))
        r = rows[-1]
        log(f"[{i + 1}/{len(jobs)}] {label}: ppl {r['ppl']:.4f} kld {r['kld']:.5f} top1 {r['top1']:.2%} "
            f"low {r['low_mass']:.1%} skip {r['skipped_mass']:.1%}"
            + (f" ({pass_times[-1]:.1f} s)" if fresh else " (same pass as above)"))
    total_s = time.perf_counter() - t_start
    return {
        "rows": rows,
        "setup": {
            "n_ctx": st.n_ctx, "n_chunks": st.n_chunks, "scored_per_chunk": ev.n_scored,
            "eval_chunk_starts": chunk_starts(eval_tokens.size, st.n_ctx, st.n_chunks).tolist(),
            "calib_chunks": st.calib_chunks, "calib_tokens": int(calib.n_steps),
            "fractions": list(st.fractions), "signals": list(st.signals), "formats": list(st.formats),
            "dynamic_grid": _dynamic_grid(st.t1, st.t2), "dynamic_format": st.dynamic_format,
            "compound_signal": st.compound_signal, "compound_fractions": list(st.compound_fractions),
            "compound_sources": {f: "direct GGUF" if direct and f in direct else "float npz quantized here"
                                 for f in float_low},
            "n_boot": st.n_boot, "ci_level": CI_LEVEL, "seed": st.seed, "batch": st.batch,
            "skip_rule": "skipped selections contribute nothing; the other gate weights are not renormalised",
            "dynamic_accesses": "every access treated as a miss (no cache)",
            "mass_tokens": "all chunk positions of the evaluation pass, that pass's own routing",
            "demoted": {k: [np.flatnonzero(layer).tolist() for layer in v] for k, v in demoted.items()},
        },
        "timing": {"total_s": round(total_s, 1), "quantize_s": round(quant_s, 1), "calib_s": round(calib_s, 1),
                   "passes": len(pass_times), "pass_s_mean": round(float(np.mean(pass_times)), 2) if pass_times else 0,
                   "first_pass_s": round(pass_times[0], 1) if pass_times else 0},
    }


# ----------------------------------------------------------------------------- CLI

def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return vals


def _fractions(text: str) -> tuple[float, ...]:
    vals = tuple(v / 100 for v in _floats(text))
    if any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"percentages must lie in 0..100, got {text!r}")
    return vals


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip().lower() for x in text.split(",") if x.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxmoe.quality",
        description="Quality of low-bit expert policies (static bottom-X%, HOBBIT dynamic, compounding) against "
                    "the Q4_K model: perplexity, KL divergence, same-top-1, Δp with bootstrap CIs (llama.cpp's "
                    "perplexity method). Writes one JSON with tidy rows; progress on stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m jaxmoe.quality --model jaxmoe/trained/qwen3moe-small.gguf --float runs/small/weights.npz "
               "--json results/quality.json\n"
               "  python -m jaxmoe.quality --model m.gguf --quick --json /tmp/q.json   # seconds, for tests\n"
               "  python -m jaxmoe.quality --model m.gguf --chunks 32 --signals mass,random --formats q2_k "
               "--json q.json\n")
    p.add_argument("--model", required=True, help="qwen3moe GGUF with Q4_K experts (the baseline)")
    p.add_argument("--float", dest="float_npz", default=None,
                   help="float32 weights npz keyed by GGUF tensor name (jaxmoe.train's weights.npz): adds Q4_K vs "
                        "float and the float→low compounding rows")
    p.add_argument("--direct", nargs="*", default=[], metavar="GGUF",
                   help="GGUF(s) whose experts were quantized straight from float to q2_k/q3_k (jaxmoe.train "
                        "--direct-formats): the float→low side of the compounding rows, without the float npz")
    p.add_argument("--tokens", default="data/corpus/eval.bin", help="evaluation token file (default %(default)s)")
    p.add_argument("--calib", default="data/corpus/calib.bin", help="calibration token file (default %(default)s)")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--quick", action="store_true", help="tiny run (4 chunks of 64, 3 fractions, 2×2 grid)")
    p.add_argument("--ctx", type=int, default=None, help=f"chunk length n_ctx (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, default=None, help=f"evaluation chunks (default {DEFAULT_CHUNKS})")
    p.add_argument("--calib-chunks", type=int, default=None,
                   help=f"calibration chunks (default {DEFAULT_CALIB_CHUNKS})")
    p.add_argument("--batch", type=int, default=None, help=f"chunks per jitted call (default {DEFAULT_BATCH})")
    p.add_argument("--fractions", type=_fractions, default=None, help="static X in percent, e.g. 0,10,50,100")
    p.add_argument("--signals", type=_names, default=None, help="static signals (default freq,weight,mass,random)")
    p.add_argument("--formats", type=_names, default=None, help="static low formats (default q3_k,q2_k)")
    p.add_argument("--t1", type=_floats, default=None, help="dynamic T1 grid (default 0.4,0.6,0.8,1.0)")
    p.add_argument("--t2", type=_floats, default=None, help="dynamic T2 grid (default 0.8,0.9,1.0)")
    p.add_argument("--compound-fractions", type=_fractions, default=None,
                   help="X (percent) of the float→low compounding rows (default 20,50,100)")
    p.add_argument("--boot", type=int, default=None, help=f"bootstrap resamples (default {DEFAULT_BOOT})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and random-signal seed (default 0)")
    return p


def settings_from_args(a: argparse.Namespace) -> Settings:
    """Settings from parsed CLI arguments (--quick first, then explicit options)."""
    st = QUICK if a.quick else Settings()
    over = {"n_ctx": a.ctx, "n_chunks": a.chunks, "calib_chunks": a.calib_chunks, "batch": a.batch,
            "fractions": a.fractions, "signals": a.signals, "formats": a.formats, "t1": a.t1, "t2": a.t2,
            "compound_fractions": a.compound_fractions, "n_boot": a.boot, "seed": a.seed}
    st = dataclasses.replace(st, **{k: v for k, v in over.items() if v is not None})
    for name in ("n_chunks", "calib_chunks", "batch", "n_boot"):
        if getattr(st, name) < 1:
            raise InputError(None, f"--{name.replace('n_', '').replace('_', '-')} must be ≥ 1")
    if any(not 0 <= t <= 1 for t in st.t1 + st.t2):
        raise InputError(None, "dynamic thresholds must lie in 0..1")
    return st


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: evaluate and write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    st = settings_from_args(a)
    gguf = read_model(a.model)
    cfg = gguf.cfg
    if st.n_ctx > cfg.max_seq and a.ctx is None:
        st = dataclasses.replace(st, n_ctx=cfg.max_seq)
    eval_tokens = load_tokens(a.tokens, cfg.vocab)
    calib_tokens = load_tokens(a.calib, cfg.vocab)
    fw = load_float_npz(a.float_npz, cfg) if a.float_npz else None
    direct = dict(direct_experts(p, cfg, gguf) for p in a.direct)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out = run_quality(gguf, eval_tokens, calib_tokens, st, fw, log, a.tokens, a.calib, direct)
    out = {
        "command": "python -m jaxmoe.quality " + " ".join(shlex.quote(x) for x in argv),
        "model": {"file": str(a.model), "sha256": sha256_file(a.model),
                  "name": str(gguf.metadata.get("general.name", "")), "config": cfg.to_dict(),
                  "expert_formats": sorted({gguf.expert_format(l, k) for l in range(cfg.n_layers)
                                            for k in gguf_io.EXPERT_KINDS})},
        "float": None if not a.float_npz else {"file": str(a.float_npz), "sha256": sha256_file(a.float_npz)},
        "direct": [{"file": str(p), "sha256": sha256_file(p)} for p in a.direct],
        "eval": {"file": str(a.tokens), "sha256": sha256_file(a.tokens), "tokens": int(eval_tokens.size)},
        "calib": {"file": str(a.calib), "sha256": sha256_file(a.calib), "tokens": int(calib_tokens.size)},
        "jax": jax.__version__, "backend": jax.default_backend(),
    } | out
    with atomic_path(a.json) as tmp:
        tmp.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    log(f"wrote {a.json}: {len(out['rows'])} rows in {out['timing']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
