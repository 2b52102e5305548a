"""Qwen3-MoE forward pass in plain JAX: batched prefill, KV-cache decode, routing as a return value.

The architecture is Qwen3's mixture-of-experts decoder [Qwen3 Technical Report, arXiv 2505.09388;
Hugging Face transformers `Qwen3MoeForCausalLM`; llama.cpp `LLM_ARCH_QWEN3MOE`]. Per layer:

    x += Attn(RMSNorm(x))    GQA; q and k are RMS-normalised per head, then rotated by RoPE
                             (NeoX / "rotate-half" layout: pairs (i, i + head_dim/2))
    x += MoE(RMSNorm(x))     router logits h @ W_router; softmax over ALL experts in float32;
                             top-k; the k gate weights renormalised to sum 1 (norm_topk_prob);
                             expert e computes down_e(silu(gate_e h) * up_e h)

then a final RMSNorm and the LM head. Everything is a pure function of (tokens, weights, cfg).

Routing is returned, never recorded as a side effect (`Routing`): per layer the top-k expert ids
in rank order and their gate weights, optionally the full router distribution, and two
*predictions* of layer l's choice made one step early, for prefetch studies. `predicted[l]` applies
layer l's ffn_norm + router to the residual stream leaving layer l-1; `predicted_post_attn[l]`
applies them to layer l-1's residual stream after its attention but before its MoE (earlier still,
so more time to prefetch). Both are approximations: layer l's real router input also contains layer
l's attention output (and for the post-attention one, layer l-1's MoE output). Layer 0 has no
prediction (ABSENT = -1), matching `sim.trace.Trace.predicted`.

The MoE block calls an `ExpertFn` (`expert_fn(layer, h, ids, gates, experts) -> out`). The default,
`dense_experts`, runs every expert on every token and weights the results by a [token, expert]
combine matrix: E/k times the FLOPs of a sparse dispatch, but one large matmul, which is the fast
choice on a GPU for the small models trained here. `variant_expert_fn` is the hook for quality
measurements: it chooses per (layer, expert) or per (token, layer, rank) which copy of an expert's
weights to use (the model's own, or e.g. a Q2_K round trip) and drops skipped (token, layer, rank)
selections.

Numerics: the residual stream, norms, router, softmaxes and logits are float32; each matmul runs in
its weight's dtype (bfloat16 weights → bfloat16 matmuls with float32 accumulation on a GPU).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ABSENT = -1  # expert id of a prediction that does not exist (layer 0)
F32 = jnp.float32


@dataclass(frozen=True)
class Config:
    """Geometry of a Qwen3-MoE model (names follow HF `Qwen3MoeConfig` where noted)."""

    # vocabulary and residual width
    vocab: int = 8192  # vocab_size
    hidden: int = 256  # hidden_size
    # depth and attention: n_heads query heads share n_kv_heads key/value heads (GQA)
    n_layers: int = 8  # num_hidden_layers
    n_heads: int = 4  # num_attention_heads
    n_kv_heads: int = 2  # num_key_value_heads
    head_dim: int = 64
    # mixture of experts (every layer is an MoE layer)
    n_experts: int = 32  # num_experts
    top_k: int = 4  # num_experts_per_tok
    expert_ffn: int = 256  # moe_intermediate_size
    norm_topk_prob: bool = True
    # positions and numerics
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6  # rms_norm_eps
    max_seq: int = 512  # longest sequence (KV-cache length; GGUF context_length)
    tie_embeddings: bool = False  # lm head = token embedding (tie_word_embeddings)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..n_experts ({self.n_experts})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of `to_dict` (unknown keys are an error)."""
        return cls(**d)


def _pytree(cls):
    """Register a dataclass as a pytree whose fields are all children."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
@dataclass
class ExpertWeights:
    """One layer's experts stacked on a leading expert axis (E experts, D hidden, F expert_ffn)."""

    gate: jax.Array  # [E, D, F]
    up: jax.Array  # [E, D, F]
    down: jax.Array  # [E, F, D]


@_pytree
@dataclass
class LayerWeights:
    """One decoder layer (N query heads, K kv heads, H head_dim)."""

    attn_norm: jax.Array  # [D]
    wq: jax.Array  # [D, N, H]
    wk: jax.Array  # [D, K, H]
    wv: jax.Array  # [D, K, H]
    wo: jax.Array  # [N, H, D]
    q_norm: jax.Array  # [H]
    k_norm: jax.Array  # [H]
    ffn_norm: jax.Array  # [D]
    router: jax.Array  # [D, E]
    experts: ExpertWeights


@_pytree
@dataclass
class Weights:
    """The whole model; `lm_head` is None when the embedding is tied."""

    embed: jax.Array  # [V, D]
    layers: list[LayerWeights]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]


@_pytree
@dataclass
class Routing:
    """Routing decisions of one forward pass (B batch, T tokens, L layers, k top_k, E experts)."""

    ids: jax.Array  # int32 [B, T, L, k]  expert ids in rank order (highest gate first)
    gates: jax.Array  # f32 [B, T, L, k]  gate weights (sum 1 over k when norm_topk_prob)
    predicted: jax.Array  # int32 [B, T, L, k]  layer l's router on layer l-1's output; l=0 ABSENT
    predicted_post_attn: jax.Array  # int32 [B, T, L, k]  ... on layer l-1's post-attention stream
    probs: jax.Array | None = None  # f32 [B, T, L, E]  full router softmax (return_router_probs)


@_pytree
@dataclass
class KVCache:
    """Keys/values of all layers for positions [0, length); S = capacity (cfg.max_seq by default)."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    length: jax.Array  # int32 []  positions filled so far


# expert_fn(layer, h [B,T,D] (normed, f32), ids [B,T,k], gates [B,T,k], experts) -> [B,T,D] f32
ExpertFn = Callable[[int, jax.Array, jax.Array, jax.Array, ExpertWeights], jax.Array]


# ----------------------------------------------------------------------------- initialisation

def init_weights(cfg: Config, seed: int = 0, dtype=F32, std: float = 0.02) -> Weights:
    """Random weights: normal(std) matrices (output projections scaled by 1/sqrt(2 L)), unit norms.

    Drawn with numpy's PCG64 (seeded): eager jax.random would compile one program per tensor shape.
    """
    D, N, K, H, E, F, V = (cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts,
                           cfg.expert_ffn, cfg.vocab)
    out_std = std / math.sqrt(2 * cfg.n_layers)
    rng = np.random.default_rng(seed)

    def normal(shape, s=std):
        return jnp.asarray((s * rng.standard_normal(shape, np.float32)), dtype)

    def ones(n):
        return jnp.ones((n,), dtype)

    layers = []
    for _ in range(cfg.n_layers):
        layers.append(LayerWeights(
            attn_norm=ones(D), wq=normal((D, N, H)), wk=normal((D, K, H)), wv=normal((D, K, H)),
            wo=normal((N, H, D), out_std), q_norm=ones(H), k_norm=ones(H), ffn_norm=ones(D),
            router=normal((D, E)),
            experts=ExpertWeights(gate=normal((E, D, F)), up=normal((E, D, F)), down=normal((E, F, D), out_std)),
        ))
    embed = normal((V, D))
    lm_head = None if cfg.tie_embeddings else normal((D, V))
    return Weights(embed=embed, layers=layers, final_norm=ones(D), lm_head=lm_head)


def cast_matrices(weights: Weights, dtype) -> Weights:
    """Cast every matrix except the routers to `dtype`; norms and routers keep their dtype."""
    def cast_layer(lw: LayerWeights) -> LayerWeights:
        return dataclasses.replace(
            lw, wq=lw.wq.astype(dtype), wk=lw.wk.astype(dtype), wv=lw.wv.astype(dtype), wo=lw.wo.astype(dtype),
            experts=jax.tree_util.tree_map(lambda a: a.astype(dtype), lw.experts))

    return dataclasses.replace(
        weights, embed=weights.embed.astype(dtype), layers=[cast_layer(lw) for lw in weights.layers],
        lm_head=None if weights.lm_head is None else weights.lm_head.astype(dtype))


def param_count(cfg: Config) -> dict[str, int]:
    """Parameter counts: total, in experts, and active per token (top_k experts per layer)."""
    D, N, K, H, E, F, V = (cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts,
                           cfg.expert_ffn, cfg.vocab)
    attn = D * N * H * 2 + D * K * H * 2 + 2 * H + 2 * D + D * E
    expert = 3 * D * F
    embed = V * D * (1 if cfg.tie_embeddings else 2) + D
    total = embed + cfg.n_layers * (attn + E * expert)
    return {"total": total, "experts": cfg.n_layers * E * expert,
            "active": embed + cfg.n_layers * (attn + cfg.top_k * expert)}


# ----------------------------------------------------------------------------- blocks

def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, in float32: x / sqrt(mean(x^2) + eps) * w."""
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(F32)


def rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, NeoX/Qwen 'rotate-half' layout; x [B,T,N,H] f32, pos [T] int."""
    H = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, H, 2, dtype=F32) / H)  # [H/2]
    ang = pos.astype(F32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]  # [1, T, 1, H/2]
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(h: jax.Array, lw: LayerWeights, cfg: Config, pos: jax.Array,
              kv: tuple[jax.Array, jax.Array] | None = None):
    """GQA self-attention of h [B,T,D] at positions pos [T]; with a cache kv=(k,v) [B,S,K,H] the new
    keys/values are written at pos and attention runs over the cache. Returns (out [B,T,D], (k, v))."""
    B, T, _ = h.shape
    K, H = cfg.n_kv_heads, cfg.head_dim
    G = cfg.n_heads // K
    hc = h.astype(lw.wq.dtype)
    q = jnp.einsum("btd,dnh->btnh", hc, lw.wq)
    k = jnp.einsum("btd,dkh->btkh", hc, lw.wk)
    v = jnp.einsum("btd,dkh->btkh", hc, lw.wv)
    q = rope(rms_norm(q, lw.q_norm, cfg.rms_eps), pos, cfg.rope_theta)  # [B,T,N,H] f32
    k = rope(rms_norm(k, lw.k_norm, cfg.rms_eps), pos, cfg.rope_theta)  # [B,T,K,H] f32
    if kv is None:
        k_all, v_all, kv_pos = k, v.astype(F32), pos
    else:
        k_cache, v_cache = kv
        k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos[0], 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos[0], 0, 0))
        kv_pos = jnp.arange(k_cache.shape[1])
    q = q.reshape(B, T, K, G, H)  # [B,T,N,H] -> [B,T,K,G,H]: query head n = k*G + g uses kv head k
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_all.astype(F32)) * (H ** -0.5)
    causal = kv_pos[None, :] <= pos[:, None]  # [T, S]
    scores = jnp.where(causal, scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_all.astype(F32))
    out = out.reshape(B, T, cfg.n_heads, H)  # [B,T,K,G,H] -> [B,T,N,H]
    out = jnp.einsum("btnh,nhd->btd", out.astype(lw.wo.dtype), lw.wo).astype(F32)
    return out, (k_all, v_all)


def route(h: jax.Array, router: jax.Array, cfg: Config):
    """Router: softmax over all experts (f32), top-k, renormalised → (ids, gates [B,T,k], probs [B,T,E])."""
    logits = jnp.einsum("btd,de->bte", h.astype(F32), router.astype(F32))
    probs = jax.nn.softmax(logits, axis=-1)
    gates, ids = jax.lax.top_k(probs, cfg.top_k)
    if cfg.norm_topk_prob:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), gates, probs


def dense_experts(layer: int, h: jax.Array, ids: jax.Array, gates: jax.Array, experts: ExpertWeights) -> jax.Array:
    """Default ExpertFn: every expert on every token, weighted by a [B,T,E] combine matrix."""
    del layer
    E = experts.gate.shape[0]
    combine = jnp.einsum("btk,btke->bte", gates, jax.nn.one_hot(ids, E, dtype=F32))
    hc = h.astype(experts.gate.dtype)
    g = jnp.einsum("btd,edf->btef", hc, experts.gate)
    u = jnp.einsum("btd,edf->btef", hc, experts.up)
    a = jax.nn.silu(g) * u * combine[..., None].astype(g.dtype)  # [B,T,E,F]
    return jnp.einsum("btef,efd->btd", a, experts.down).astype(F32)


def variant_expert_fn(alternates: Sequence[ExpertWeights] | None = None, *,
                      expert_variant: jax.Array | None = None, rank_variant: jax.Array | None = None,
                      skip: jax.Array | None = None) -> ExpertFn:
    """An ExpertFn that picks, per selection, which copy of an expert's weights runs, and drops skips.

    Variant 0 is the layer's own experts (from `Weights`); variant j >= 1 is `alternates[layer]` with
    index j-1 on a leading axis (arrays [A, E, D, F] / [A, E, F, D], e.g. the Q2_K and Q3_K round trips).
    The choice comes from `rank_variant` int [B,T,L,k] (per token, layer, rank) if given, else from
    `expert_variant` int [L,E] (per layer, expert), else 0. `skip` bool [B,T,L,k] zeroes the selection's
    contribution without renormalising the other gates (HOBBIT's skip). Ranks index this forward pass's
    own routing, which can differ from a baseline's once upstream layers are perturbed. Pass the arrays
    as jit arguments (build the ExpertFn inside the jitted function) to avoid baking them in as constants.
    """

    def fn(layer: int, h: jax.Array, ids: jax.Array, gates: jax.Array, experts: ExpertWeights) -> jax.Array:
        if alternates is not None:
            alt = alternates[layer]
            stack = jax.tree_util.tree_map(lambda own, a: jnp.concatenate([own[None].astype(a.dtype), a]), experts, alt)
        else:
            stack = jax.tree_util.tree_map(lambda own: own[None], experts)
        V, E = stack.gate.shape[:2]
        if rank_variant is not None:
            choice = rank_variant[:, :, layer, :]  # [B,T,k]
        elif expert_variant is not None:
            choice = jnp.asarray(expert_variant)[layer][ids]  # [B,T,k]
        else:
            choice = jnp.zeros_like(ids)
        w = gates if skip is None else jnp.where(skip[:, :, layer, :], 0.0, gates)
        combine = jnp.einsum("btk,btke,btkv->btve", w, jax.nn.one_hot(ids, E, dtype=F32),
                             jax.nn.one_hot(choice, V, dtype=F32))
        hc = h.astype(stack.gate.dtype)
        g = jnp.einsum("btd,vedf->btvef", hc, stack.gate)
        u = jnp.einsum("btd,vedf->btvef", hc, stack.up)
        a = jax.nn.silu(g) * u * combine[..., None].astype(g.dtype)  # [B,T,V,E,F]
        return jnp.einsum("btvef,vefd->btd", a, stack.down).astype(F32)

    return fn


def stack_alternates(models: Sequence[Weights]) -> list[ExpertWeights]:
    """Per layer, stack the experts of several same-shaped models on a leading axis for variant_expert_fn."""
    n_layers = len(models[0].layers)
    return [jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[m.layers[l].experts for m in models])
            for l in range(n_layers)]


# ----------------------------------------------------------------------------- the model

def _run(tokens: jax.Array, weights: Weights, cfg: Config, start: jax.Array, cache: KVCache | None,
         expert_fn: ExpertFn, return_router_probs: bool):
    """Shared body of forward / prefill / decode_step; tokens [B,T] at positions start + [0, T)."""
    B, T = tokens.shape
    L, k = len(weights.layers), cfg.top_k
    pos = start + jnp.arange(T, dtype=jnp.int32)  # [T]
    absent = jnp.full((B, T, k), ABSENT, jnp.int32)
    x = weights.embed[tokens].astype(F32)  # [B,T,D]
    ids_l, gates_l, probs_l, pred_l, pred_pa_l, new_k, new_v = [], [], [], [absent], [absent], [], []
    for l, lw in enumerate(weights.layers):
        with jax.named_scope(f"layer{l}"):
            if l > 0:
                pred_l.append(route(rms_norm(x, lw.ffn_norm, cfg.rms_eps), lw.router, cfg)[0])
            with jax.named_scope("attention"):
                kv = None if cache is None else (cache.k[l], cache.v[l])
                attn_out, (k_all, v_all) = attention(rms_norm(x, lw.attn_norm, cfg.rms_eps), lw, cfg, pos, kv)
                x = x + attn_out
                new_k.append(k_all)
                new_v.append(v_all)
            if l + 1 < L:
                nxt = weights.layers[l + 1]
                pred_pa_l.append(route(rms_norm(x, nxt.ffn_norm, cfg.rms_eps), nxt.router, cfg)[0])
            with jax.named_scope("moe"):
                h = rms_norm(x, lw.ffn_norm, cfg.rms_eps)
                ids, gates, probs = route(h, lw.router, cfg)
                x = x + expert_fn(l, h, ids, gates, lw.experts)
            ids_l.append(ids)
            gates_l.append(gates)
            probs_l.append(probs)
    with jax.named_scope("head"):
        x = rms_norm(x, weights.final_norm, cfg.rms_eps)
        if weights.lm_head is None:
            logits = jnp.einsum("btd,vd->btv", x.astype(weights.embed.dtype), weights.embed)
        else:
            logits = jnp.einsum("btd,dv->btv", x.astype(weights.lm_head.dtype), weights.lm_head)
    routing = Routing(
        ids=jnp.stack(ids_l, axis=2), gates=jnp.stack(gates_l, axis=2),
        predicted=jnp.stack(pred_l, axis=2), predicted_post_attn=jnp.stack(pred_pa_l, axis=2),
        probs=jnp.stack(probs_l, axis=2) if return_router_probs else None)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=jnp.stack(new_k), v=jnp.stack(new_v), length=cache.length + T)
    return logits.astype(F32), routing, new_cache


def forward(tokens: jax.Array, weights: Weights, cfg: Config, *, return_router_probs: bool = False,
            expert_fn: ExpertFn = dense_experts) -> tuple[jax.Array, Routing]:
    """Causal forward pass of tokens int [B,T] from position 0 → (logits f32 [B,T,V], Routing)."""
    logits, routing, _ = _run(tokens, weights, cfg, jnp.int32(0), None, expert_fn, return_router_probs)
    return logits, routing


def init_cache(cfg: Config, batch: int, max_seq: int | None = None, dtype=F32) -> KVCache:
    """An empty KV cache for `batch` sequences of up to `max_seq` (default cfg.max_seq) positions."""
    S = cfg.max_seq if max_seq is None else max_seq
    shape = (cfg.n_layers, batch, S, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.int32(0))


def prefill(tokens: jax.Array, weights: Weights, cfg: Config, cache: KVCache, *,
            return_router_probs: bool = False, expert_fn: ExpertFn = dense_experts):
    """Run tokens [B,T] at positions cache.length + [0,T), filling the cache → (logits, Routing, cache).

    Positions past the cache's capacity are not checked inside jit (dynamic_update_slice clamps):
    keep cache.length + T <= capacity.
    """
    return _run(tokens, weights, cfg, cache.length, cache, expert_fn, return_router_probs)


def decode_step(token: jax.Array, weights: Weights, cfg: Config, cache: KVCache, *,
                return_router_probs: bool = False, expert_fn: ExpertFn = dense_experts):
    """One decode step for token int [B] → (logits [B,V], Routing with T=1, cache one longer)."""
    logits, routing, cache = _run(token[:, None], weights, cfg, cache.length, cache, expert_fn,
                                  return_router_probs)
    return logits[:, 0], routing, cache
