"""The Qwen3-MoE of `jaxmoe.model` with its layers stacked and scanned: for deep models (48 layers).

`model.py` unrolls its layers in Python, which is fine for 8 layers; at 48 layers × 128 experts
compile time and the dense all-experts einsum (E/k = 16× the needed FLOPs) both bind. Here:

- weights are `model.Weights` whose `layers` is ONE `LayerWeights` with a leading layer axis
  (`stack_layers` / `unstack_layers` convert), and the layers run in `jax.lax.scan` (one compiled
  layer body; `jax.checkpoint` per layer when training, so activations are recomputed in backward);
- the experts run as a sparse, exact grouped dispatch (`grouped_tiles`): the N·k (token, expert)
  assignments are sorted by expert, each expert's run is padded to whole tiles of `tile` rows, and
  one batched matmul runs every tile against its expert's weights (gathered per tile). Static
  shapes, no dropped tokens (the tile count is bounded by ⌊N·k/tile⌋ + X), differentiable, and
  equal to `model.dense_experts` up to float rounding (tests/test_moe_scan.py checks float64).
- which copy of an expert runs (e.g. Q4_K, Q2_K, tensor-aware) is chosen per selection by a
  `Choice`: a static per-(layer, expert) variant table, HOBBIT's dynamic rule on the pass's own
  gates, and optionally a per-(token, layer, expert) plan (the cache simulator's decisions), with
  the rule as fallback for selections the plan does not know (routing drift).

Numerics follow model.py: residual stream, norms, router, softmax in float32; matmuls in the weight dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import model as M

F32 = jnp.float32
SKIP = -1  # a plan's variant value: the selection is skipped (contributes nothing)


def stack_layers(w: M.Weights) -> M.Weights:
    """Weights with `layers` = one LayerWeights whose arrays carry a leading layer axis."""
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *w.layers)
    return dataclasses.replace(w, layers=stacked)


def unstack_layers(w: M.Weights, n_layers: int) -> M.Weights:
    """Inverse of `stack_layers`: a list of per-layer LayerWeights (numpy arrays stay numpy)."""
    layers = [jax.tree_util.tree_map(lambda a, i=i: a[i], w.layers) for i in range(n_layers)]
    return dataclasses.replace(w, layers=layers)


# ----------------------------------------------------------------------------- sparse experts

def grouped_tiles(h: jax.Array, ids: jax.Array, gates: jax.Array, gate_w: jax.Array, up_w: jax.Array,
                  down_w: jax.Array, tile: int, return_rows: bool = False):
    """Σ_r gates[n, r] · expert_{ids[n, r]}(h[n]) for h [N, D], ids/gates [N, k], weights [X, D, F]/[X, F, D].

    Rows of one expert are padded to whole tiles; each tile's expert weights are gathered and one
    batched matmul runs all tiles. With `return_rows`, also returns the per-row outputs (before the gate)
    y [P, D], each row's expert [P] and a valid mask [P] (for per-expert error measurements).
    """
    N, D = h.shape
    k = ids.shape[-1]
    A = N * k
    X = gate_w.shape[0]
    odt = jnp.result_type(h.dtype, F32)  # float32 in the model; float64 when h is (tests)
    x = ids.reshape(A).astype(jnp.int32)
    w = gates.reshape(A).astype(odt)
    order = jnp.argsort(x, stable=True)
    xs, ws, ts = x[order], w[order], (order // k).astype(jnp.int32)
    counts = jnp.bincount(x, length=X)
    first_row = jnp.cumsum(counts) - counts
    tiles_of = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles_of)
    tile_start = tile_end - tiles_of
    n_tiles = A // tile + X
    P = n_tiles * tile
    prow = tile_start[xs] * tile + jnp.arange(A, dtype=jnp.int32) - first_row[xs]
    row_tok = jnp.full((P,), N, jnp.int32).at[prow].set(ts)
    row_w = jnp.zeros((P,), odt).at[prow].set(ws)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), X - 1)
    h_pad = jnp.concatenate([h, jnp.zeros((1, D), h.dtype)])
    rows = h_pad[row_tok].reshape(n_tiles, tile, D).astype(gate_w.dtype)
    g = jnp.einsum("tnd,tdf->tnf", rows, gate_w[tile_expert])
    u = jnp.einsum("tnd,tdf->tnf", rows, up_w[tile_expert])
    act = jax.nn.silu(g) * u
    y = jnp.einsum("tnf,tfd->tnd", act, down_w[tile_expert]).astype(odt).reshape(P, D)
    out = jnp.zeros((N + 1, D), odt).at[row_tok].add(y * row_w[:, None])[:N]
    if return_rows:
        return out, y, jnp.repeat(tile_expert, tile), row_tok < N, rows.reshape(P, D), act.reshape(P, -1)
    return out


def tile_for(n_assign: int, n_experts: int, cap: int = 256) -> int:
    """Rows per tile: about the mean rows per expert, a power of two in [8, cap]."""
    mean = max(1, n_assign // max(1, n_experts))
    return int(min(cap, max(8, 1 << (mean - 1).bit_length())))


# ----------------------------------------------------------------------------- variant choice

@jax.tree_util.register_dataclass
@dataclass
class Choice:
    """Which expert copy serves each selection (V copies stacked on the expert axis: id v·E + e).

    table int [L, E]: the variant of expert e of layer l (0 = first copy) — static policies.
    t1, t2 float32 pairs (`quality.threshold_pair`); dyn_variant int []: HOBBIT's rule — a selection with
    T1 < score ≤ T2 is served by dyn_variant, score > T2 is skipped (t1 = t2 = 1: no dynamic rule).
    plan_ids int [B, T, L, k] / plan_var int [B, T, L, k] (optional): decided variant (or SKIP) of the
    plan's (token, layer, expert); a selection whose expert is not in its plan falls back to the rule.
    """

    table: jax.Array
    t1: jax.Array
    t2: jax.Array
    dyn_variant: jax.Array
    plan_ids: jax.Array | None = None
    plan_var: jax.Array | None = None


def static_choice(table: np.ndarray) -> Choice:
    """A Choice from a static [L, E] variant table, no dynamic rule, no plan."""
    one = np.array([1.0, 0.0], np.float32)
    return Choice(table=jnp.asarray(table, jnp.int32), t1=jnp.asarray(one), t2=jnp.asarray(one),
                  dyn_variant=jnp.int32(0))


def _exclusive_scores(gates: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HOBBIT's scores (hi, lo) of gates [..., k]: `jaxmoe.quality.exclusive_scores`."""
    from jaxmoe.quality import exclusive_scores

    return exclusive_scores(gates)


def choose(ids: jax.Array, gates: jax.Array, table_l: jax.Array, choice: Choice,
           plan_ids_l: jax.Array | None, plan_var_l: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(variant int, skip bool, planned bool) of each selection ids/gates [..., k] of one layer."""
    from jaxmoe.quality import _exceeds

    hi, lo = _exclusive_scores(gates)
    over1, over2 = _exceeds(hi, lo, choice.t1), _exceeds(hi, lo, choice.t2)
    var = jnp.where(over1 & ~over2, choice.dyn_variant, table_l[ids])
    skip = over2
    planned = jnp.zeros(ids.shape, bool)
    if plan_ids_l is not None:
        match = ids[..., :, None] == plan_ids_l[..., None, :]  # [..., k, k']
        planned = match.any(-1)
        pv = jnp.sum(jnp.where(match, plan_var_l[..., None, :], 0), axis=-1)
        var = jnp.where(planned, jnp.maximum(pv, 0), var)
        skip = jnp.where(planned, pv == SKIP, skip)
    return var, skip, planned


# ----------------------------------------------------------------------------- forward

def _layer_attn(x, lw, cfg, pos, kv=None):
    a, kv_new = M.attention(M.rms_norm(x, lw.attn_norm, cfg.rms_eps), lw, cfg, pos, kv)
    return x + a, kv_new


def forward(tokens: jax.Array, weights: M.Weights, cfg: M.Config, *, sets: tuple[M.ExpertWeights, ...] | None = None,
            choice: Choice | None = None, tile: int | None = None, checkpoint: bool = False,
            err_sets: tuple[M.ExpertWeights, M.ExpertWeights] | None = None, want_probs_stats: bool = False,
            imatrix: bool = False):
    """Causal forward of tokens [B, T] through stacked weights → (final-normed hidden [B,T,D] f32, aux dict).

    sets: V expert copies, each ExpertWeights with arrays [L, E, ...] (default: the weights' own experts);
    choice: which copy serves each selection (default: copy 0). aux holds routing ids/gates [B,T,L,k],
    `planned` (share of selections found in the plan), low/skipped gate mass sums, and with err_sets
    (a, b) per-(layer, expert) sums of ||y_b − y_a||², ||y_a||² and counts over the routed rows, and with
    `imatrix` also per-(layer, expert) Σ x² of each input column of ffn_gate/ffn_up (`im_in` [L,E,D]) and of
    ffn_down (`im_act` [L,E,F]) over the rows routed to the expert (llama.cpp's imatrix, as sums).
    want_probs_stats: per-layer mean router probability [L, E] and selection share (training's aux loss).
    """
    B, T = tokens.shape
    E, k = cfg.n_experts, cfg.top_k
    N = B * T
    if sets is None:
        sets = (weights.layers.experts,)
    V = len(sets)
    if tile is None:
        tile = tile_for(N * k, E)
    pos = jnp.arange(T, dtype=jnp.int32)
    x = weights.embed[tokens].astype(F32)
    L = weights.layers.attn_norm.shape[0]
    if choice is None:
        choice = static_choice(np.zeros((L, E), np.int32))
    has_plan = choice.plan_ids is not None
    xs = {"lw": weights.layers, "sets": sets, "table": choice.table}
    if has_plan:
        xs["plan_ids"] = jnp.moveaxis(choice.plan_ids, 2, 0)
        xs["plan_var"] = jnp.moveaxis(choice.plan_var, 2, 0)
    if err_sets is not None:
        xs["err"] = err_sets

    def body(x, s):
        lw = s["lw"]
        x, _ = _layer_attn(x, lw, cfg, pos)
        h = M.rms_norm(x, lw.ffn_norm, cfg.rms_eps)
        ids, gates, probs = M.route(h, lw.router, cfg)
        var, skip, planned = choose(ids, gates, s["table"], choice, s.get("plan_ids"), s.get("plan_var"))
        w_eff = jnp.where(skip, 0.0, gates)
        if V == 1:
            ex = s["sets"][0]
            gw, uw, dw = ex.gate, ex.up, ex.down
        else:
            gw = jnp.concatenate([ex.gate for ex in s["sets"]])
            uw = jnp.concatenate([ex.up for ex in s["sets"]])
            dw = jnp.concatenate([ex.down for ex in s["sets"]])
        flat_ids = (ids + E * var).reshape(N, k)
        y = grouped_tiles(h.reshape(N, -1), flat_ids, w_eff.reshape(N, k), gw, uw, dw, tile)
        x = x + y.reshape(x.shape)
        g64 = gates.astype(F32)
        out = {"ids": ids, "gates": gates, "planned": jnp.sum(planned.astype(F32)),
               "low_mass": jnp.sum(jnp.where((var > 0) & ~skip, g64, 0.0)),
               "skip_mass": jnp.sum(jnp.where(skip, g64, 0.0))}
        if want_probs_stats:
            out["p_mean"] = jnp.mean(probs, axis=(0, 1))
            out["f"] = jnp.mean(jnp.sum(jax.nn.one_hot(ids, E, dtype=F32), axis=-2), axis=(0, 1)) / k
        if err_sets is not None:
            a, b = s["err"]
            hf, idf, gf = h.reshape(N, -1), ids.reshape(N, k), jnp.ones((N, k), F32)
            _, ya, rexp, valid, rin, act = grouped_tiles(hf, idf, gf, a.gate, a.up, a.down, tile, return_rows=True)
            _, yb, _, _, _, _ = grouped_tiles(hf, idf, gf, b.gate, b.up, b.down, tile, return_rows=True)
            vf = valid.astype(F32)
            if imatrix:
                out["im_in"] = jax.ops.segment_sum(rin.astype(F32) ** 2 * vf[:, None], rexp, num_segments=E)
                out["im_act"] = jax.ops.segment_sum(act.astype(F32) ** 2 * vf[:, None], rexp, num_segments=E)
            out["err_sum"] = jax.ops.segment_sum(jnp.sum((yb - ya) ** 2, -1) * vf, rexp, num_segments=E)
            out["ref_sq"] = jax.ops.segment_sum(jnp.sum(ya ** 2, -1) * vf, rexp, num_segments=E)
            out["err_n"] = jax.ops.segment_sum(vf, rexp, num_segments=E)
        return x, out

    step = jax.checkpoint(body) if checkpoint else body
    x, ys = jax.lax.scan(step, x, xs)
    x = M.rms_norm(x, weights.final_norm, cfg.rms_eps)
    aux = {kk: (jnp.moveaxis(v, 0, 2) if kk in ("ids", "gates") else v) for kk, v in ys.items()}
    return x, aux


def head(weights: M.Weights) -> jax.Array:
    """The LM head [D, V] (the tied embedding transposed when lm_head is None)."""
    return weights.embed.T if weights.lm_head is None else weights.lm_head


def logits_of(hidden: jax.Array, weights: M.Weights) -> jax.Array:
    """Logits f32 [..., V] of final-normed hidden states."""
    hw = head(weights)
    return jnp.einsum("...d,dv->...v", hidden.astype(hw.dtype), hw).astype(F32)


# ----------------------------------------------------------------------------- decode with a KV cache

def decode_tokens(tokens: jax.Array, weights: M.Weights, cfg: M.Config, cache: M.KVCache, tile: int | None = None):
    """Run tokens [B, T] at positions cache.length + [0, T) → (logits of the last position [B, V],
    ids [B,T,L,k], gates [B,T,L,k], cache). Experts: the weights' own (grouped, exact)."""
    B, T = tokens.shape
    E, k = cfg.n_experts, cfg.top_k
    N = B * T
    tile = tile or tile_for(N * k, E, cap=64)
    pos = cache.length + jnp.arange(T, dtype=jnp.int32)
    x = weights.embed[tokens].astype(F32)

    def body(x, s):
        lw, kc, vc = s
        x, (kn, vn) = _layer_attn(x, lw, cfg, pos, (kc, vc))
        h = M.rms_norm(x, lw.ffn_norm, cfg.rms_eps)
        ids, gates, _ = M.route(h, lw.router, cfg)
        ex = lw.experts
        y = grouped_tiles(h.reshape(N, -1), ids.reshape(N, k), gates.reshape(N, k), ex.gate, ex.up, ex.down, tile)
        return x + y.reshape(x.shape), (ids, gates, kn, vn)

    x, (ids, gates, kn, vn) = jax.lax.scan(body, x, (weights.layers, cache.k, cache.v))
    x = M.rms_norm(x[:, -1], weights.final_norm, cfg.rms_eps)
    new = M.KVCache(k=kn, v=vn, length=cache.length + T)
    return logits_of(x, weights), jnp.moveaxis(ids, 0, 2), jnp.moveaxis(gates, 0, 2), new
