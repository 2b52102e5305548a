"""Synthetic MoE routing traces from a small, documented generative model.

The model (prose, calibration and measured statistics in docs/synth.md)
------------------------------------------------------------------------
A trace is a grid of access groups (token step t, MoE layer l), each the top-k expert ids in rank
order plus gate weights. One `numpy.random.Generator(seed)` draws every random number, in a fixed
order (per sequence, in chunks of `_CHUNK_TOKENS` tokens), so a config maps to exactly one trace.

1. Depth profile. d_l = 1 - exp(-l / depth_scale_layers) rises from 0 at the first layer towards
   1; each depth-dependent knob interpolates from its "early" to its "deep" value with d_l, so
   early layers route almost uniformly and with little next-token reuse (as real Qwen3 does).
2. Popularity ("Zipf-like"). The popularity of expert e in layer l for sequence s at token t is
   pi ∝ exp(s_l · (sqrt(1 - a - b) z_le + sqrt(a) y_sle + sqrt(b) x_le(t))), where z, y, x are
   -Exp(1) variables (unit variance) and a = topic_share, b = drift_share. With one component,
   exp(-s·Exp(1)) = U^s makes the sorted popularities a Zipf law of exponent s (rank r gets
   ∝ (r / n_experts)^s): a concentrated head and many experts a sequence almost never uses, which
   matches how few distinct experts a real sequence touches (better than log-normal logits did).
   Skew s_l = (skew_early + (skew_deep - skew_early) d_l) · exp(layer_jitter · N(0, 1)).
   z is global, y is re-drawn per sequence (topic: the current sequence's frequencies matter),
   x drifts within a sequence: each token, Binomial(L·E, 1/drift_tokens) cells chosen uniformly
   get fresh values (autocorrelation ≈ (1 - 1/drift_tokens)^lag).
3. Temporal locality. At each token but the first of its sequence, each of the k experts the
   layer selected at t-1 is kept independently with probability r_l (reuse_p_early → reuse_p with
   d_l; times prefill_reuse_scale in prefill). The remaining slots are successive draws from pi
   without replacement, excluding the kept experts (exact inverse-CDF draws on the unmarked
   mass). A fresh draw can coincide with a non-kept previous expert, so the measured next-token
   reuse exceeds r_l; defaults are calibrated on the measured value (≈ 45 % on Qwen3 decode).
4. Rank order. The k selected experts are ordered by a Plackett-Luce draw from pi restricted to
   them (exponential race), so popular experts tend to rank first and mean gate weight carries
   a signal beyond frequency.
5. Gate weights. The router's top-k logits are the k largest of n = n_experts i.i.d. values
   (1 - X^gate_tail) / gate_tail, X ~ Exp(1) (gate_tail = 0 gives Gumbel logits), drawn exactly
   from exponential spacings; weights = softmax(logit / gate_temperature) over the k, hence
   renormalised (norm_topk_prob) and descending. gate_tail = 0.5 fits real Qwen3 rank means
   far better than Gumbel logits (docs/synth.md).
6. Prefetch hint (optional). predicted[t, l] for l >= 1 keeps each true expert of (t, l) in its
   rank slot with probability predict_accuracy; the other slots get distinct draws from pi that
   exclude every true expert, so the expected fraction of true experts predicted is exactly
   predict_accuracy. Row l = 0 is ABSENT; so is a slot no non-true expert is left for (only when
   top_k > n_experts / 2).

Grounding: "45 % of selections repeat at the next token" and "LRU holding 40 % of experts hits
≈ 90-95 %" on Qwen3-30B-A3B decode (docs/architecture.md, Facts); per-layer entropy, lagged reuse,
distinct experts, LRU curve and gate weight by rank were fitted to a real Qwen3-30B-A3B llama.cpp
route trace (Helldez/BigMoeOnEdge, top-6, 128 decode tokens). Weighted sampling without
replacement by exponential races: Efraimidis & Spirakis, Inf. Process. Lett. 97(5), 2006.
LRU hit rates from stack distances: Mattson et al., IBM Systems Journal 9(2), 1970.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from sim.io import InputError, exit_on_input_error
from sim.trace import ABSENT, DECODE, PREFILL, Trace, TraceMeta, describe, load_trace, save_trace


@dataclass(frozen=True)
class SynthConfig:
    """All knobs of the generative model; one config + seed → one trace."""

    # model geometry
    model: str = "qwen3-30b-a3b"
    n_layers: int = 48
    n_experts: int = 128
    top_k: int = 8
    expert_weights: int | None = 3 * 2048 * 768  # weights per expert (gate + up + down)
    # workload: n_seqs sequences, each prefill_tokens prompt steps then decode_tokens decode steps
    n_seqs: int = 4
    prefill_tokens: int = 64
    decode_tokens: int = 256
    seed: int = 0
    # popularity: per-layer skew (the Zipf exponent of the popularity law) and its growth with depth
    skew_early: float = 1.2
    skew_deep: float = 4.5
    depth_scale_layers: float = 3.5
    layer_jitter: float = 0.3  # std of the log of a random factor on each layer's skew
    topic_share: float = 0.5  # share of the logit variance re-drawn per sequence
    drift_share: float = 0.2  # share of the logit variance that drifts within a sequence
    drift_tokens: float = 100.0  # mean tokens between re-draws of a drifting logit
    # temporal locality: probability each previous-token expert is kept
    reuse_p_early: float = 0.05
    reuse_p: float = 0.21
    prefill_reuse_scale: float = 0.8  # prefill keep probability = this × decode one
    # gate weights: router logits are top-k of n_experts i.i.d. (1 - X**gate_tail)/gate_tail, X ~ Exp(1)
    gate_tail: float = 0.5  # 0 = Gumbel logits; larger = flatter spacing between ranks
    gate_temperature: float = 0.29
    # prefetch hint: None = no `predicted` array
    predict_accuracy: float | None = None
    # mark the last layer absent for prefill steps except each prompt's last (llama.cpp does this)
    prefill_skip_last_layer: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise InputError(None, f"SynthConfig: {msg}")

        for name in ("n_layers", "n_experts", "top_k", "n_seqs"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.top_k > self.n_experts:
            bad(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_experts > np.iinfo(np.int16).max:
            bad(f"n_experts={self.n_experts} exceeds the int16 id range")
        for name in ("prefill_tokens", "decode_tokens"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                bad(f"{name} must be a non-negative integer, got {v!r}")
        if self.prefill_tokens + self.decode_tokens < 1:
            bad("a sequence needs at least one token (prefill_tokens + decode_tokens >= 1)")
        if self.topic_share + self.drift_share > 1.0:
            bad(f"topic_share + drift_share must be <= 1, got {self.topic_share + self.drift_share!r}")
        if not (math.isfinite(self.drift_tokens) and self.drift_tokens >= 1):
            bad(f"drift_tokens must be finite and >= 1, got {self.drift_tokens!r}")
        for name in ("reuse_p_early", "reuse_p", "topic_share", "drift_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                bad(f"{name} must be in [0, 1], got {v!r}")
        if self.predict_accuracy is not None and not 0.0 <= self.predict_accuracy <= 1.0:
            bad(f"predict_accuracy must be in [0, 1], got {self.predict_accuracy!r}")
        if max(self.reuse_p, self.reuse_p_early) * self.prefill_reuse_scale > 1.0 or self.prefill_reuse_scale < 0:
            bad(f"prefill_reuse_scale={self.prefill_reuse_scale!r} makes a keep probability leave [0, 1]")
        if not 0.0 <= self.gate_tail <= 1.0:
            bad(f"gate_tail must be in [0, 1], got {self.gate_tail!r}")
        for name in ("skew_early", "skew_deep", "layer_jitter"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 <= v <= 30):
                bad(f"{name} must be in [0, 30], got {v!r}")
        for name in ("depth_scale_layers", "gate_temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                bad(f"{name} must be finite and > 0, got {v!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            bad(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def n_steps(self) -> int:
        """Token steps in the whole trace."""
        return self.n_seqs * (self.prefill_tokens + self.decode_tokens)


PRESETS: dict[str, SynthConfig] = {
    # Qwen3-30B-A3B: 48 layers, 128 experts, top-8 (calibration in docs/synth.md)
    "qwen3-30b-a3b": SynthConfig(),
    # Mixtral-8x7B: 32 layers, 8 experts, top-2. Not fitted to a trace (docs/synth.md): near-uniform
    # popularity (the Mixtral paper saw no clear domain specialisation), consecutive-token repeats
    # above chance, and a gate temperature that reproduces HOBBIT's 67/30/3 % miss split at T1 = 0.6,
    # T2 = 0.9 if misses fall evenly on the two ranks.
    "mixtral-8x7b": SynthConfig(
        model="mixtral-8x7b", n_layers=32, n_experts=8, top_k=2, expert_weights=3 * 4096 * 14336,
        skew_early=0.3, skew_deep=0.6, depth_scale_layers=4.0, reuse_p_early=0.05, reuse_p=0.15,
        gate_temperature=0.4,
    ),
    # Qwen3-235B-A22B: 94 layers, 128 experts, top-8 (config.json; sim.profiles.qwen3_235b_a22b). No
    # routing trace of it is at hand: the Qwen3-30B-A3B fit (same family, same 128-expert top-8
    # router) is reused, including the depth ramp in absolute layers. An assumption, not a fit.
    "qwen3-235b-a22b": SynthConfig(
        model="qwen3-235b-a22b", n_layers=94, n_experts=128, top_k=8, expert_weights=3 * 4096 * 1536,
    ),
}


def preset(model: str, **overrides: Any) -> SynthConfig:
    """The preset config of `model` with some fields replaced (None values are ignored)."""
    if model not in PRESETS:
        raise InputError(None, f"unknown model {model!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[model], **{k: v for k, v in overrides.items() if v is not None})


def depth_profile(cfg: SynthConfig) -> np.ndarray:
    """d_l in [0, 1) per layer: 0 at layer 0, saturating towards 1 with depth."""
    return 1.0 - np.exp(-np.arange(cfg.n_layers) / cfg.depth_scale_layers)


def layer_skews(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Per-layer popularity skew s_l (depth ramp × log-normal jitter)."""
    d = depth_profile(cfg)
    jitter = np.exp(cfg.layer_jitter * rng.standard_normal(cfg.n_layers))
    return (cfg.skew_early + (cfg.skew_deep - cfg.skew_early) * d) * jitter


def keep_probabilities(cfg: SynthConfig) -> np.ndarray:
    """float [2, layers]: probability of keeping a previous expert, row PREFILL and row DECODE."""
    d = depth_profile(cfg)
    r = cfg.reuse_p_early + (cfg.reuse_p - cfg.reuse_p_early) * d
    out = np.empty((2, cfg.n_layers))
    out[PREFILL] = r * cfg.prefill_reuse_scale
    out[DECODE] = r
    return out


@numba.njit(cache=True)
def _gate_weights_row(u: np.ndarray, n: int, tail: float, temperature: float, out: np.ndarray) -> None:  # pragma: no cover
    """Gate weights of one group from k uniforms `u` (see `gate_weights`), written to `out`."""
    k = u.shape[0]
    x = 0.0
    top = 0.0
    s = 0.0
    for i in range(k):
        x += -math.log(1.0 - u[i]) / (n - i)  # i-th smallest of n Exp(1) (exponential spacings)
        x = max(x, 1e-300)  # u == 0 exactly (probability 2**-53) would give log(0)
        logit = -math.log(x) if tail == 0.0 else (1.0 - x**tail) / tail
        if i == 0:
            top = logit
        v = math.exp((logit - top) / temperature)
        out[i] = v
        s += v
    for i in range(k):
        out[i] /= s


def gate_weights(u: np.ndarray, n: int, tail: float, temperature: float) -> np.ndarray:
    """float32 [..., k]: gate weights from uniforms [..., k] (descending, summing to 1).

    The router's top-k logits are the k largest of n i.i.d. values (1 - X**tail) / tail with
    X ~ Exp(1) (tail 0: -log X, a Gumbel); the k smallest X come exactly from exponential spacings
    X_(i) = sum_{j<=i} E_j / (n - j + 1), E_j = -log(1 - u_j). Weights: softmax(logit / temperature).
    """
    u = np.ascontiguousarray(u, dtype=np.float64)
    flat = u.reshape(-1, u.shape[-1])
    out = np.empty(flat.shape, dtype=np.float32)
    for r in range(flat.shape[0]):
        _gate_weights_row(flat[r], n, tail, temperature, out[r])
    return out.reshape(u.shape)


_CHUNK_TOKENS = 256  # random numbers are drawn per chunk of this many tokens (part of the seed → trace map)
_U_KEEP, _U_FRESH, _U_RANK, _U_HIT, _U_REPL, _U_GATE = range(6)  # uniform streams per (token, layer, slot)
_N_STREAMS = 6


@numba.njit(cache=True)
def _draw_excluding(w: np.ndarray, total: float, mark: np.ndarray, u: float) -> int:  # pragma: no cover
    """Inverse-CDF draw from weights `w` restricted to unmarked entries (`total` = their sum)."""
    v = u * total
    acc = 0.0
    last = -1
    for e in range(w.shape[0]):
        if mark[e]:
            continue
        last = e
        acc += w[e]
        if acc > v:
            return e
    return last  # only reached through round-off


@numba.njit(cache=True)
def _route_chunk(
    w, total, base, sx, x, prev, has_prev, keep_p, phase, u, jump_n, jump_pos, jump_val,
    predict_p, gate_n, gate_tail, gate_temperature, experts, weights, predicted,
):  # pragma: no cover - jitted
    """Route a chunk of tokens of one sequence, updating the drift/popularity/prev state in place."""
    C, L, _, K = u.shape
    E = w.shape[1]
    mark = np.zeros(E, dtype=np.bool_)
    sel = np.empty(K, dtype=np.int64)
    key = np.empty(K, dtype=np.float64)
    dirty = np.zeros(L, dtype=np.bool_)
    j0 = 0
    for c in range(C):
        # 1. within-sequence drift: re-draw some (layer, expert) logits
        for j in range(j0, j0 + jump_n[c]):
            pos = jump_pos[j]
            l = pos // E
            e = pos - l * E
            x[l, e] = jump_val[j]
            w[l, e] = math.exp(base[l, e] + sx[l] * x[l, e])
            dirty[l] = True
        j0 += jump_n[c]
        for l in range(L):
            if dirty[l]:
                total[l] = w[l].sum()
                dirty[l] = False
        kp = keep_p[phase[c]]
        for l in range(L):
            wl = w[l]
            # 2. keep each previous expert with probability kp[l]
            n = 0
            excl = 0.0
            if has_prev[0]:
                for j in range(K):
                    if u[c, l, _U_KEEP, j] < kp[l]:
                        e = prev[l, j]
                        sel[n] = e
                        n += 1
                        mark[e] = True
                        excl += wl[e]
            # 3. fill the remaining slots by successive draws from the popularity (no repeats)
            j = 0
            while n < K:
                e = _draw_excluding(wl, total[l] - excl, mark, u[c, l, _U_FRESH, j])
                sel[n] = e
                n += 1
                mark[e] = True
                excl += wl[e]
                j += 1
            # 4. rank order: Plackett-Luce on the popularity restricted to the selection
            for j in range(K):
                key[j] = -math.log(1.0 - u[c, l, _U_RANK, j]) / wl[sel[j]]
            for j in range(1, K):  # insertion sort by key, ascending
                kj, sj = key[j], sel[j]
                m = j - 1
                while m >= 0 and key[m] > kj:
                    key[m + 1] = key[m]
                    sel[m + 1] = sel[m]
                    m -= 1
                key[m + 1] = kj
                sel[m + 1] = sj
            for j in range(K):
                experts[c, l, j] = sel[j]
                prev[l, j] = sel[j]
            _gate_weights_row(u[c, l, _U_GATE], gate_n, gate_tail, gate_temperature, weights[c, l])
            # 5. prefetch hint for this layer, made at layer l - 1 (all true experts stay marked)
            if predict_p >= 0.0:
                if l == 0:
                    for j in range(K):
                        predicted[c, l, j] = -1
                else:
                    for j in range(K):
                        if u[c, l, _U_HIT, j] < predict_p:
                            predicted[c, l, j] = sel[j]
                    for j in range(K):
                        if not u[c, l, _U_HIT, j] < predict_p:
                            # -1 (unknown) only when every expert is already taken (top_k near n_experts)
                            e = _draw_excluding(wl, total[l] - excl, mark, u[c, l, _U_REPL, j])
                            predicted[c, l, j] = e
                            if e >= 0:
                                mark[e] = True
                                excl += wl[e]
                    for j in range(K):
                        if predicted[c, l, j] >= 0:
                            mark[predicted[c, l, j]] = False
            for j in range(K):
                mark[sel[j]] = False
        has_prev[0] = True


def synthesize(cfg: SynthConfig) -> Trace:
    """Draw a routing trace from the generative model (module docstring); deterministic per seed."""
    rng = np.random.default_rng(cfg.seed)
    L, E, K = cfg.n_layers, cfg.n_experts, cfg.top_k
    T = cfg.prefill_tokens + cfg.decode_tokens
    S = cfg.n_seqs * T

    skew = layer_skews(cfg, rng)  # [L]
    z = -rng.standard_exponential((L, E))  # global popularity
    keep_p = keep_probabilities(cfg)  # [2, L]
    jump_q = 1.0 / cfg.drift_tokens if cfg.drift_share > 0 else 0.0
    sx = skew * math.sqrt(cfg.drift_share)
    experts = np.empty((S, L, K), dtype=np.int16)
    weights = np.empty((S, L, K), dtype=np.float32)
    predict_p = -1.0 if cfg.predict_accuracy is None else float(cfg.predict_accuracy)
    predicted = np.empty((S, L, K), dtype=np.int16)  # filled only when predict_p >= 0
    phase = np.where(np.arange(S) % T < cfg.prefill_tokens, PREFILL, DECODE).astype(np.uint8)
    seq = np.repeat(np.arange(cfg.n_seqs, dtype=np.int32), T)
    for s in range(cfg.n_seqs):
        y = -rng.standard_exponential((L, E))  # this sequence's topic
        x = -rng.standard_exponential((L, E))  # this sequence's drifting part, at its first token
        base = skew[:, None] * (math.sqrt(1.0 - cfg.topic_share - cfg.drift_share) * z
                                + math.sqrt(cfg.topic_share) * y)
        w = np.exp(base + sx[:, None] * x)  # popularity, unnormalised
        total = w.sum(axis=1)
        prev = np.zeros((L, K), dtype=np.int64)
        has_prev = np.zeros(1, dtype=np.bool_)
        for t0 in range(0, T, _CHUNK_TOKENS):
            C = min(_CHUNK_TOKENS, T - t0)
            i0 = s * T + t0
            u = rng.random((C, L, _N_STREAMS, K))
            jump_n = rng.binomial(L * E, jump_q, size=C)
            jump_n[0] = 0 if t0 == 0 else jump_n[0]  # the first token uses the fresh draw of x
            jump_pos = rng.integers(0, L * E, size=int(jump_n.sum()))
            jump_val = -rng.standard_exponential(jump_pos.size)
            _route_chunk(
                w, total, base, sx, x, prev, has_prev, keep_p, phase[i0:i0 + C], u, jump_n, jump_pos,
                jump_val, predict_p, E, cfg.gate_tail, cfg.gate_temperature, experts[i0:i0 + C],
                weights[i0:i0 + C], predicted[i0:i0 + C],
            )
    if cfg.predict_accuracy is None:
        predicted = None
    if cfg.prefill_skip_last_layer and cfg.prefill_tokens > 0:
        t_in_seq = np.arange(S) % T
        skip = t_in_seq < cfg.prefill_tokens - 1
        experts[skip, L - 1, :] = ABSENT
        weights[skip, L - 1, :] = 0.0
        if predicted is not None:
            predicted[skip, L - 1, :] = ABSENT
    meta = TraceMeta(
        model=cfg.model,
        n_layers=L,
        n_experts=E,
        top_k=K,
        provenance=f"synthetic: sim.synth generative model, seed {cfg.seed}",
        expert_weights=cfg.expert_weights,
        extra={"synth_config": dataclasses.asdict(cfg)},
    )
    return Trace.from_arrays(experts, weights, phase, seq, meta, predicted, copy=False)


# ---------------------------------------------------------------------------------------------
# statistics


@numba.njit(cache=True)
def _stack_distances(keys: np.ndarray, n_keys: int) -> np.ndarray:  # pragma: no cover - jitted
    """LRU stack distance of each access (distinct other keys since its last use; -1 if first)."""
    n = keys.shape[0]
    tree = np.zeros(n + 1, dtype=np.int64)  # Fenwick tree: 1 at each key's latest access position
    last = np.full(n_keys, -1, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        key = keys[i]
        p = last[key]
        if p < 0:
            out[i] = -1
        else:
            # live marks in (p, i): prefix(i) - prefix(p + 1)
            s = 0
            j = i
            while j > 0:
                s += tree[j]
                j -= j & -j
            j = p + 1
            while j > 0:
                s -= tree[j]
                j -= j & -j
            out[i] = s
            j = p + 1
            while j <= n:
                tree[j] -= 1
                j += j & -j
        j = i + 1
        while j <= n:
            tree[j] += 1
            j += j & -j
        last[key] = i
    return out


def lru_hit_rates(trace: Trace, fractions: Sequence[float], phase: int | None = DECODE) -> dict[float, float]:
    """Global LRU hit rate (equal-size experts) at each capacity fraction of all experts.

    Every present access, in step → layer → rank order, goes through the cache; hits are counted
    on the accesses of `phase` (None: all). Computed exactly from LRU stack distances.
    """
    m = trace.meta
    ex = trace.experts.astype(np.int64)
    present = np.broadcast_to(trace.present[:, :, None], ex.shape)
    keys = (np.arange(m.n_layers)[None, :, None] * m.n_experts + ex)[present]
    counted = np.broadcast_to(
        (np.ones(trace.n_steps, bool) if phase is None else trace.phase == phase)[:, None, None], ex.shape
    )[present]
    if not counted.any():
        return {float(f): float("nan") for f in fractions}
    dist = _stack_distances(np.ascontiguousarray(keys), m.n_layers * m.n_experts)[counted]
    out = {}
    for f in fractions:
        cap = round(f * m.n_layers * m.n_experts)
        out[float(f)] = float(((dist >= 0) & (dist < cap)).mean())
    return out


def reuse_by_layer(trace: Trace, phase: int | None = DECODE, lag: int = 1) -> tuple[np.ndarray, float]:
    """Fraction of each group's experts also selected by the same layer `lag` tokens earlier.

    Pairs are steps t - lag, t of one sequence with t in `phase` (None: any), both groups present.
    Returns (per-layer fraction [layers], overall fraction); NaN where there is no pair.
    """
    ex = trace.experts
    L, k = trace.meta.n_layers, trace.meta.top_k
    if lag < 1 or lag >= trace.n_steps:
        return np.full(L, np.nan), float("nan")
    pair = trace.seq[lag:] == trace.seq[:-lag]
    if phase is not None:
        pair &= trace.phase[lag:] == phase
    cur, prv = ex[lag:][pair], ex[:-lag][pair]  # [P, L, K]
    ok = (cur[:, :, 0] != ABSENT) & (prv[:, :, 0] != ABSENT)
    hits = np.where(ok, (cur[:, :, :, None] == prv[:, :, None, :]).any(axis=3).sum(axis=2), 0)  # [P, L]
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_layer = hits.sum(axis=0) / (n * k)
    overall = float(hits.sum() / (ok.sum() * k)) if ok.any() else float("nan")
    return per_layer, overall


def distinct_experts(trace: Trace, phase: int | None = DECODE) -> float:
    """Distinct (layer, expert) pairs a sequence selects during `phase`, averaged over sequences."""
    m = trace.meta
    sel = np.ones(trace.n_steps, bool) if phase is None else trace.phase == phase
    counts = []
    for s in np.unique(trace.seq[sel]):
        ex = trace.experts[sel & (trace.seq == s)].astype(np.int64)  # [steps, L, K]
        keys = (np.arange(m.n_layers)[None, :, None] * m.n_experts + ex)[ex != ABSENT]
        counts.append(np.unique(keys).size)
    return float(np.mean(counts)) if counts else float("nan")


def calibration_fraction(calib_seqs: int, n_seqs: int) -> float:
    """The `--calib-fraction` that makes the replay calibrate on exactly the first `calib_seqs` of
    `n_seqs` sequences (sim.engine.calibration_steps rounds fraction × sequences)."""
    if not 1 <= calib_seqs < n_seqs:
        raise InputError(None, f"calibration sequences must be in [1, {n_seqs - 1}], got {calib_seqs}")
    return calib_seqs / n_seqs


def with_calibration(trace: Trace, calib_seqs: int) -> Trace:
    """`trace` with meta.extra recording that its first `calib_seqs` sequences are for calibration."""
    n = len(np.unique(trace.seq))
    extra = dict(trace.meta.extra, calib_seqs=int(calib_seqs), calib_fraction=calibration_fraction(calib_seqs, n))
    meta = dataclasses.replace(trace.meta, extra=extra)
    return Trace.from_arrays(trace.experts, trace.weights, trace.phase, trace.seq, meta, trace.predicted, copy=False)


def distinct_keys(trace: Trace, steps: np.ndarray | None = None) -> int:
    """Distinct (layer, expert) pairs selected in the steps where `steps` is True (all by default)."""
    m = trace.meta
    ex = (trace.experts if steps is None else trace.experts[steps]).astype(np.int64)
    keys = (np.arange(m.n_layers)[None, :, None] * m.n_experts + ex)[ex != ABSENT]
    return int(np.unique(keys).size)


def pressure(trace: Trace, budget_bytes: int, expert_bytes_per_layer: np.ndarray, calib_seqs: int = 0) -> dict:
    """How far the experts a trace touches exceed what a byte budget holds (native sizes).

    `fit` counts the experts the budget holds if filled smallest-first (an upper bound on any
    policy's residency); `touched_eval` is the distinct (layer, expert) pairs of the sequences after
    the first `calib_seqs`. A ratio touched_eval / fit above 1 means the cache must evict.
    """
    m = trace.meta
    sizes = np.asarray(expert_bytes_per_layer, dtype=np.int64)
    if sizes.shape != (m.n_layers,):
        raise InputError(None, f"need one expert size per layer ({m.n_layers}), got {sizes.shape}")
    per_key = np.sort(np.repeat(sizes, m.n_experts))
    fit = int(np.searchsorted(np.cumsum(per_key), budget_bytes, side="right"))
    seqs = list(dict.fromkeys(trace.seq.tolist()))
    evals = ~np.isin(trace.seq, seqs[:calib_seqs])
    touched_eval = distinct_keys(trace, evals)
    return {
        "model": m.model, "steps": int(trace.n_steps), "sequences": len(seqs), "calib_seqs": int(calib_seqs),
        "decode_steps_eval": int((evals & (trace.phase == DECODE)).sum()),
        "experts_total": m.n_layers * m.n_experts, "budget_bytes": int(budget_bytes), "fit": fit,
        "touched_all": distinct_keys(trace), "touched_eval": touched_eval,
        "touched_per_seq": distinct_experts(trace, None),
        "touched_over_fit": touched_eval / fit if fit else float("inf"),
    }


def popularity_entropy(trace: Trace, phase: int | None = DECODE) -> np.ndarray:
    """Per-layer entropy of the expert-selection histogram divided by log(n_experts) (1 = uniform)."""
    m = trace.meta
    sel = trace.experts if phase is None else trace.experts[trace.phase == phase]
    out = np.full(m.n_layers, np.nan)
    for l in range(m.n_layers):
        ids = sel[:, l].ravel()
        ids = ids[ids != ABSENT]
        if ids.size == 0:
            continue
        p = np.bincount(ids, minlength=m.n_experts) / ids.size
        p = p[p > 0]
        out[l] = float(-(p * np.log(p)).sum() / math.log(m.n_experts)) if m.n_experts > 1 else 1.0
    return out


def prediction_accuracy(trace: Trace) -> float:
    """Fraction of true experts (layers >= 1, present groups) found in the predicted set."""
    if trace.predicted is None:
        return float("nan")
    ex, pr = trace.experts[:, 1:], trace.predicted[:, 1:]
    ok = ex[:, :, 0] != ABSENT
    found = (ex[:, :, :, None] == pr[:, :, None, :]).any(axis=3)[ok]
    return float(found.mean()) if found.size else float("nan")


REUSE_LAGS = (1, 2, 4, 8, 16, 32, 64)


def stats(trace: Trace, lru_fractions: Sequence[float] = (0.2, 0.3, 0.4, 0.5), phase: int = DECODE) -> dict:
    """Locality, skew, gate-weight and LRU statistics of a trace (JSON-ready dict)."""
    reuse_l, reuse = reuse_by_layer(trace, phase)
    ent = popularity_entropy(trace, phase)
    sel = trace.phase == phase
    present = trace.present[sel]
    w = trace.weights[sel][present]
    L = trace.meta.n_layers
    early = slice(0, max(1, L // 8))
    deep = slice(L // 2, L)
    out = {
        "phase": "decode" if phase == DECODE else "prefill",
        "steps": int(sel.sum()),
        "reuse": reuse,
        "reuse_by_layer": [round(float(x), 4) for x in reuse_l],
        "reuse_at_lag": {str(g): reuse_by_layer(trace, phase, g)[1] for g in REUSE_LAGS},
        "entropy_by_layer": [round(float(x), 4) for x in ent],
        "entropy_early": float(np.nanmean(ent[early])),
        "entropy_deep": float(np.nanmean(ent[deep])),
        "distinct_experts_per_seq": distinct_experts(trace, phase),
        "weight_mean_by_rank": [round(float(x), 4) for x in (w.mean(axis=0) if w.size else [])],
        "lru_hit_rate": {f"{f:g}": v for f, v in lru_hit_rates(trace, lru_fractions, phase).items()},
    }
    if trace.predicted is not None:
        out["prediction_accuracy"] = prediction_accuracy(trace)
    return out


def _summary_row(trace: Trace) -> dict[str, float]:
    """The flat statistics `compare` puts side by side (decode phase)."""
    ent = popularity_entropy(trace, DECODE)
    L = trace.meta.n_layers
    row = {f"reuse lag {g}": reuse_by_layer(trace, DECODE, g)[1] for g in REUSE_LAGS}
    row["entropy layer 0"] = float(ent[0])
    row[f"entropy layers 1-{min(5, L - 1)}"] = float(np.nanmean(ent[1:6])) if L > 1 else float("nan")
    row[f"entropy layers 6-{L - 1}"] = float(np.nanmean(ent[6:])) if L > 6 else float("nan")
    row[f"entropy sd over layers 8-{L - 1}"] = float(np.nanstd(ent[8:])) if L > 9 else float("nan")
    row["distinct experts per sequence"] = distinct_experts(trace, DECODE)
    for f, v in lru_hit_rates(trace, (0.2, 0.3, 0.4, 0.5), DECODE).items():
        row[f"LRU hit rate at {f:.0%} of experts"] = v
    w = trace.weights[trace.phase == DECODE][trace.present[trace.phase == DECODE]]
    for r, v in enumerate(w.mean(axis=0) if w.size else []):
        row[f"gate weight rank {r + 1}"] = float(v)
    return row


def compare(real: Trace, model: str = "qwen3-30b-a3b", seeds: int = 8, **overrides: Any) -> list[dict]:
    """Statistics of `real` beside those of synthetic traces of the same shape (mean, sd over seeds).

    The synthetic config is the preset of `model` with the real trace's geometry (layers, experts,
    top-k) and workload (number of sequences; prefill and decode steps of its first sequence).
    """
    m = real.meta
    first = real.seq == real.seq[0]
    base = preset(
        model, n_layers=m.n_layers, n_experts=m.n_experts, top_k=m.top_k, n_seqs=len(np.unique(real.seq)),
        prefill_tokens=int((real.phase[first] == PREFILL).sum()),
        decode_tokens=int((real.phase[first] == DECODE).sum()), **overrides,
    )
    real_row = _summary_row(real)
    syn_rows = [_summary_row(synthesize(dataclasses.replace(base, seed=s))) for s in range(seeds)]
    out = []
    for key, v in real_row.items():
        vals = np.array([r.get(key, np.nan) for r in syn_rows], dtype=np.float64)
        out.append({"statistic": key, "real": v, "synth_mean": float(np.mean(vals)), "synth_sd": float(np.std(vals))})
    return out


# ---------------------------------------------------------------------------------------------
# CLI

_EXAMPLES = """\
examples:
  python -m sim.synth -o traces/synth-qwen3.npz
  python -m sim.synth -o /tmp/long.npz --seqs 1 --prefill 0 --decode 10000 --seed 3
  python -m sim.synth -o /tmp/mixtral.npz --model mixtral-8x7b --predict-accuracy 0.8
  python -m sim.synth -o /tmp/sticky.npz --reuse-p 0.5 --stats     # also print full stats JSON
  python -m sim.convert ../shared/traces/bigmoeonedge/qwen.route.csv -o /tmp/real.npz
  python -m sim.synth --compare /tmp/real.npz    # real vs synthetic statistics, same shape, 8 seeds
"""


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> None:
    """Synthesize a routing trace and write it as an npz."""
    ap = argparse.ArgumentParser(
        prog="python -m sim.synth",
        description="Synthesize an MoE routing trace from the generative model of docs/synth.md "
                    "(Zipf-like per-layer popularity skewed with depth, per-sequence topic and drift, "
                    "next-token reuse, top-k gate weights, optional prefetch predictions).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-o", "--output", help="output npz trace (written atomically); required unless --compare")
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(PRESETS), help="preset (default %(default)s)")
    ap.add_argument("--seqs", type=int, help="number of sequences (default 4)")
    ap.add_argument("--prefill", type=int, help="prefill tokens per sequence (default 64)")
    ap.add_argument("--decode", type=int, help="decode tokens per sequence (default 256)")
    ap.add_argument("--seed", type=int, help="random seed (default 0)")
    ap.add_argument("--reuse-p", type=float, help="deep-layer probability of keeping each previous-token "
                    "expert (the measured reuse is higher: fresh draws can repeat too)")
    ap.add_argument("--skew-deep", type=float, help="deep layers' popularity skew (Zipf exponent; default 4.5)")
    ap.add_argument("--topic-share", type=float, help="share of popularity re-drawn per sequence, in [0, 1]")
    ap.add_argument("--predict-accuracy", type=float, help="add next-layer predictions, each true expert "
                    "predicted with this probability")
    ap.add_argument("--prefill-skip-last-layer", action="store_true", default=None,
                    help="mark the last layer absent on prefill steps but each prompt's last (as llama.cpp)")
    ap.add_argument("--calib-seqs", type=int, help="of the --seqs sequences, this many first ones are for "
                    "calibration: recorded in meta.extra (calib_seqs, calib_fraction) and printed as the "
                    "sim.replay --calib-fraction that selects them")
    ap.add_argument("--pressure-gib", type=float, help="also print how many distinct experts the evaluation "
                    "sequences touch vs how many fit in the expert budget of a GPU with this much VRAM "
                    "(sim.hwgrid from --pressure-base, the model's built-in profile, 4 k context)")
    ap.add_argument("--pressure-base", default="rtx3060-12gb", help="hardware profile for --pressure-gib "
                    "(default %(default)s: its runtime reserve is used)")
    ap.add_argument("--stats", action="store_true", help="print the full stats() JSON after the summary")
    ap.add_argument("--compare", metavar="REAL.npz", help="instead of writing a trace: print REAL's statistics "
                    "beside synthetic traces of the same shape (model knobs above apply)")
    ap.add_argument("--seeds", type=int, default=8, help="--compare: synthetic traces to average (default 8)")
    a = ap.parse_args(argv)
    knobs = {"reuse_p": a.reuse_p, "skew_deep": a.skew_deep, "topic_share": a.topic_share}
    if a.compare:
        real = load_trace(a.compare)
        if not (real.phase == DECODE).any():
            raise InputError(a.compare, "has no decode steps to compare")
        if a.seeds < 1:
            raise InputError(None, f"--seeds must be >= 1, got {a.seeds}")
        rows = compare(real, a.model, a.seeds, **knobs)
        print(f"{a.compare} ({describe(real)}) vs sim.synth --model {a.model}, {a.seeds} seeds, decode phase:")
        print(f"{'statistic':<36} {'real':>8} {'synth':>8} {'sd':>7}")
        for r in rows:
            print(f"{r['statistic']:<36} {r['real']:>8.3f} {r['synth_mean']:>8.3f} {r['synth_sd']:>7.3f}")
        return
    if not a.output:
        ap.error("-o/--output is required (unless --compare)")
    cfg = preset(
        a.model, n_seqs=a.seqs, prefill_tokens=a.prefill, decode_tokens=a.decode, seed=a.seed,
        predict_accuracy=a.predict_accuracy, prefill_skip_last_layer=a.prefill_skip_last_layer, **knobs,
    )
    if a.calib_seqs is not None:
        calib_fraction = calibration_fraction(a.calib_seqs, cfg.n_seqs)
    pressure_model = None
    if a.pressure_gib is not None:
        from sim.hwgrid import derive
        from sim.profiles import derived_expert_budget, get_model

        pressure_model = get_model(cfg.model)
        budget = derived_expert_budget(pressure_model, derive(a.pressure_base, a.pressure_gib, "gen4x16"))
    t0 = time.perf_counter()
    trace = synthesize(cfg)
    if a.calib_seqs is not None:
        trace = with_calibration(trace, a.calib_seqs)
    elapsed_s = time.perf_counter() - t0
    save_trace(trace, a.output)
    ph = DECODE if cfg.decode_tokens > 0 else PREFILL
    _, reuse = reuse_by_layer(trace, ph)
    extra = ""
    if trace.predicted is not None:
        extra = f", prediction accuracy {prediction_accuracy(trace):.3f}"
    print(f"{a.output}: {describe(trace)}; {PHASE_WORD[ph]} next-token reuse {reuse:.3f}{extra} "
          f"(synthesized in {elapsed_s:.2f} s)")
    if a.calib_seqs is not None:
        print(f"calibration: first {a.calib_seqs} of {cfg.n_seqs} sequences; replay with --calib-fraction "
              f"{calib_fraction!r}")
    if pressure_model is not None:
        rep = pressure(trace, budget, pressure_model.native_bytes_per_layer(), a.calib_seqs or 0)
        print(f"pressure at {a.pressure_gib:g} GiB ({pressure_model.name}, budget {budget / 2**30:.2f} GiB): "
              f"evaluation sequences touch {rep['touched_eval']:,} distinct experts of {rep['experts_total']:,}; "
              f"{rep['fit']:,} fit ({rep['touched_over_fit']:.2f}× the budget)")
    if a.stats:
        print(json.dumps(stats(trace, phase=ph), indent=1))


PHASE_WORD = {PREFILL: "prefill", DECODE: "decode"}

if __name__ == "__main__":
    main(sys.argv[1:])
