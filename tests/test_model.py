"""jaxmoe.model: parity with Hugging Face Qwen3MoeForCausalLM, decode == prefill, routing invariants,
and the expert hook against a per-token numpy brute force."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import model as M

jax.config.update("jax_default_matmul_precision", "highest")

# jitted entry points (eager op-by-op dispatch is ~1000x slower on CPU); Config is hashable → static
FWD = jax.jit(M.forward, static_argnames=("cfg", "return_router_probs", "expert_fn"))
PREFILL = jax.jit(M.prefill, static_argnames=("cfg",))
DECODE = jax.jit(M.decode_step, static_argnames=("cfg",))

TINY = M.Config(vocab=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=8, top_k=3,
                expert_ffn=32, rope_theta=10000.0, max_seq=32)


def _weights(cfg: M.Config, seed: int = 0) -> M.Weights:
    """Random weights with non-trivial norms (so that a wrong norm placement shows)."""
    w = M.init_weights(cfg, seed, std=0.15)
    rng = np.random.default_rng(seed)

    def jitter(a):
        return jnp.asarray(1.0 + 0.3 * rng.standard_normal(a.shape), jnp.float32)

    layers = [dataclasses.replace(lw, attn_norm=jitter(lw.attn_norm), ffn_norm=jitter(lw.ffn_norm),
                                  q_norm=jitter(lw.q_norm), k_norm=jitter(lw.k_norm)) for lw in w.layers]
    return dataclasses.replace(w, layers=layers, final_norm=jitter(w.final_norm))


def _tokens(cfg: M.Config, B: int, T: int, seed: int = 1) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab, (B, T)), jnp.int32)


# ----------------------------------------------------------------------------- Hugging Face parity

def _hf_model(cfg: M.Config, w: M.Weights):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[parity]')")
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[parity]')")
    hc = transformers.Qwen3MoeConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.expert_ffn,
        norm_topk_prob=cfg.norm_topk_prob, rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_seq,
        rope_theta=cfg.rope_theta,  # transformers 4 reads rope_theta, 5 builds rope_parameters from it
        tie_word_embeddings=cfg.tie_embeddings, decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=64)
    hc._attn_implementation = "eager"
    m = transformers.Qwen3MoeForCausalLM(hc).eval()

    def t(a):
        return torch.tensor(np.asarray(a, np.float32))

    D = cfg.hidden
    sd = {"model.embed_tokens.weight": t(w.embed), "model.norm.weight": t(w.final_norm)}
    sd["lm_head.weight"] = t(w.embed) if w.lm_head is None else t(np.asarray(w.lm_head).T)
    for i, lw in enumerate(w.layers):
        p = f"model.layers.{i}."
        ex = lw.experts
        sd |= {
            p + "input_layernorm.weight": t(lw.attn_norm),
            p + "post_attention_layernorm.weight": t(lw.ffn_norm),
            p + "self_attn.q_proj.weight": t(np.asarray(lw.wq).reshape(D, -1).T),  # [D,N,H] -> [N*H, D]
            p + "self_attn.k_proj.weight": t(np.asarray(lw.wk).reshape(D, -1).T),
            p + "self_attn.v_proj.weight": t(np.asarray(lw.wv).reshape(D, -1).T),
            p + "self_attn.o_proj.weight": t(np.asarray(lw.wo).reshape(-1, D).T),  # [N,H,D] -> [D, N*H]
            p + "self_attn.q_norm.weight": t(lw.q_norm),
            p + "self_attn.k_norm.weight": t(lw.k_norm),
            p + "mlp.gate.weight": t(np.asarray(lw.router).T),  # [D,E] -> [E,D]
        }
        gate_t, up_t = np.asarray(ex.gate).transpose(0, 2, 1), np.asarray(ex.up).transpose(0, 2, 1)  # [E,F,D]
        down_t = np.asarray(ex.down).transpose(0, 2, 1)  # [E,F,D] -> [E,D,F]
        if p + "mlp.experts.gate_up_proj" in m.state_dict():
            # transformers 5 stacks the experts and fuses gate and up: [E, 2F, D], gate rows first (.chunk(2))
            sd[p + "mlp.experts.gate_up_proj"] = t(np.concatenate([gate_t, up_t], axis=1))
            sd[p + "mlp.experts.down_proj"] = t(down_t)
        else:  # transformers 4: one nn.Linear per expert
            for e in range(cfg.n_experts):
                sd[p + f"mlp.experts.{e}.gate_proj.weight"] = t(gate_t[e])
                sd[p + f"mlp.experts.{e}.up_proj.weight"] = t(up_t[e])
                sd[p + f"mlp.experts.{e}.down_proj.weight"] = t(down_t[e])
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return m, torch


@pytest.mark.parametrize("cfg", [
    TINY,
    dataclasses.replace(TINY, norm_topk_prob=False, tie_embeddings=True, n_kv_heads=1, top_k=2),
    dataclasses.replace(TINY, n_kv_heads=4, n_experts=16, top_k=4, head_dim=8, rope_theta=1e6),
], ids=["gqa2", "mqa-tied-unnorm", "mha-16e"])
def test_logits_and_routing_match_hugging_face(cfg):
    w = _weights(cfg)
    m, torch = _hf_model(cfg, w)
    tokens = _tokens(cfg, 2, 24)
    logits, routing = FWD(tokens, w, cfg=cfg, return_router_probs=True)
    with torch.no_grad():
        out = m(torch.tensor(np.asarray(tokens), dtype=torch.long), output_router_logits=True,
                output_hidden_states=True)
    ref = out.logits.numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    # stated tolerance: float32 both sides, different summation orders -> 1e-4 of the logit scale
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-4 * scale
    assert float(np.abs(ref).std()) > 0.1  # logits are not degenerate
    B, T = tokens.shape
    n_compared = n_total = 0
    for l in range(cfg.n_layers):
        probs = torch.softmax(out.router_logits[l].float(), -1).numpy().reshape(B, T, cfg.n_experts)
        np.testing.assert_allclose(np.asarray(routing.probs[:, :, l]), probs, atol=2e-5)
        order = np.argsort(-probs, axis=-1, kind="stable")
        srt = np.take_along_axis(probs, order, -1)
        clear = (srt[..., cfg.top_k - 1] - srt[..., cfg.top_k]) > 1e-4  # no near-tie at the top-k cut
        ids = np.asarray(routing.ids[:, :, l])
        sel = clear & np.all(np.diff(srt[..., : cfg.top_k], axis=-1) < -1e-4, axis=-1)  # rank order is clear
        np.testing.assert_array_equal(ids[sel], order[..., : cfg.top_k][sel])
        n_compared += int(sel.sum())
        n_total += sel.size
        # predicted[l]: layer l's router on the residual stream entering layer l (HF hidden_states[l])
        if l > 0:
            hs = out.hidden_states[l].numpy().astype(np.float64)
            hn = hs / np.sqrt((hs ** 2).mean(-1, keepdims=True) + cfg.rms_eps) * np.asarray(w.layers[l].ffn_norm)
            lg = hn @ np.asarray(w.layers[l].router, np.float64)
            pord = np.argsort(-lg, axis=-1, kind="stable")[..., : cfg.top_k]
            ps = np.sort(lg, -1)[..., ::-1]
            pclear = np.all(np.diff(ps[..., : cfg.top_k + 1], axis=-1) < -1e-4, axis=-1)
            np.testing.assert_array_equal(np.asarray(routing.predicted[:, :, l])[pclear], pord[pclear])
    assert n_compared >= 0.9 * n_total


# ----------------------------------------------------------------------------- decode == prefill

def test_decode_steps_equal_prefill_logits():
    cfg = TINY
    w = _weights(cfg, seed=3)
    tokens = _tokens(cfg, 3, 20, seed=4)
    full_logits, full_routing = FWD(tokens, w, cfg=cfg)
    n0 = 7
    cache = M.init_cache(cfg, batch=3)
    logits0, routing0, cache = PREFILL(tokens[:, :n0], w, cfg=cfg, cache=cache)
    np.testing.assert_allclose(logits0, full_logits[:, :n0], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(routing0.ids, full_routing.ids[:, :n0])
    for t in range(n0, tokens.shape[1]):
        logits_t, routing_t, cache = DECODE(tokens[:, t], w, cfg=cfg, cache=cache)
        np.testing.assert_allclose(logits_t, full_logits[:, t], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(routing_t.ids[:, 0], full_routing.ids[:, t])
        np.testing.assert_array_equal(routing_t.predicted[:, 0], full_routing.predicted[:, t])
        np.testing.assert_allclose(routing_t.gates[:, 0], full_routing.gates[:, t], atol=1e-6)
    assert int(cache.length) == tokens.shape[1]


def test_prefill_in_two_chunks_equals_one():
    cfg = TINY
    w = _weights(cfg, seed=5)
    tokens = _tokens(cfg, 2, 16, seed=6)
    full, _ = FWD(tokens, w, cfg=cfg)
    cache = M.init_cache(cfg, batch=2)
    a, _, cache = PREFILL(tokens[:, :9], w, cfg=cfg, cache=cache)
    b, _, cache = PREFILL(tokens[:, 9:], w, cfg=cfg, cache=cache)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- routing invariants

@pytest.mark.parametrize("norm", [True, False])
def test_routing_invariants(norm):
    cfg = dataclasses.replace(TINY, norm_topk_prob=norm)
    w = _weights(cfg, seed=7)
    _, r = FWD(_tokens(cfg, 2, 12, seed=8), w, cfg=cfg, return_router_probs=True)
    ids, gates, probs = np.asarray(r.ids), np.asarray(r.gates), np.asarray(r.probs)
    B, T, L, k = ids.shape
    assert (B, T, L, k) == (2, 12, cfg.n_layers, cfg.top_k) and probs.shape == (B, T, L, cfg.n_experts)
    assert ids.min() >= 0 and ids.max() < cfg.n_experts
    assert all(len(set(row)) == k for row in ids.reshape(-1, k))  # distinct within a selection
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    sel = np.take_along_axis(probs, ids, -1)
    assert np.all(np.diff(sel, axis=-1) <= 0)  # rank order: highest first
    # the k chosen are the k largest of the full softmax
    assert np.all(sel[..., -1] >= np.sort(probs, -1)[..., -k])
    expect = sel / sel.sum(-1, keepdims=True) if norm else sel
    np.testing.assert_allclose(gates, expect, rtol=1e-5, atol=1e-7)
    if norm:
        np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-5)
    pred, pred_pa = np.asarray(r.predicted), np.asarray(r.predicted_post_attn)
    assert np.all(pred[:, :, 0] == M.ABSENT) and np.all(pred_pa[:, :, 0] == M.ABSENT)
    assert pred[:, :, 1:].min() >= 0 and pred_pa[:, :, 1:].max() < cfg.n_experts


# ----------------------------------------------------------------------------- expert hook

def _brute_force_moe(h, ids, gates, variants, choice, skip):
    """Per token, per rank: down(silu(gate h) * up h) * gate with numpy float64 loops."""
    B, T, k = ids.shape
    out = np.zeros(h.shape, np.float64)
    for b in range(B):
        for t in range(T):
            for r in range(k):
                if skip[b, t, r]:
                    continue
                ex = variants[choice[b, t, r]]
                e = ids[b, t, r]
                x = h[b, t].astype(np.float64)
                g = x @ ex["gate"][e]
                u = x @ ex["up"][e]
                out[b, t] += gates[b, t, r] * ((g / (1 + np.exp(-g)) * u) @ ex["down"][e])
    return out


def test_variant_expert_fn_matches_brute_force():
    cfg = TINY
    w0, w1, w2 = (_weights(cfg, seed=s) for s in (10, 11, 12))
    layer = 1
    rng = np.random.default_rng(13)
    B, T, k, E = 2, 5, cfg.top_k, cfg.n_experts
    h = jnp.asarray(rng.standard_normal((B, T, cfg.hidden)), jnp.float32)
    ids, gates, _ = jax.jit(M.route, static_argnums=2)(h, w0.layers[layer].router, cfg)
    alternates = M.stack_alternates([w1, w2])
    rank_variant = rng.integers(0, 3, (B, T, cfg.n_layers, k))
    skip = rng.random((B, T, cfg.n_layers, k)) < 0.3
    fn = M.variant_expert_fn(alternates, rank_variant=jnp.asarray(rank_variant), skip=jnp.asarray(skip))
    got = jax.jit(fn, static_argnums=0)(layer, h, ids, gates, w0.layers[layer].experts)
    variants = [{f: np.asarray(getattr(m.layers[layer].experts, f), np.float64) for f in ("gate", "up", "down")}
                for m in (w0, w1, w2)]
    ref = _brute_force_moe(np.asarray(h), np.asarray(ids), np.asarray(gates, np.float64), variants,
                           rank_variant[:, :, layer], skip[:, :, layer])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)
    # per (layer, expert) choice: expert_variant[l][e]
    expert_variant = rng.integers(0, 3, (cfg.n_layers, E))
    fn = M.variant_expert_fn(alternates, expert_variant=jnp.asarray(expert_variant))
    got = jax.jit(fn, static_argnums=0)(layer, h, ids, gates, w0.layers[layer].experts)
    ref = _brute_force_moe(np.asarray(h), np.asarray(ids), np.asarray(gates, np.float64), variants,
                           expert_variant[layer][np.asarray(ids)], np.zeros((B, T, k), bool))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_variant_expert_fn_defaults_equal_dense_forward():
    cfg = TINY
    w = _weights(cfg, seed=14)
    tokens = _tokens(cfg, 2, 10, seed=15)
    ref, _ = FWD(tokens, w, cfg=cfg)
    got, _ = FWD(tokens, w, cfg=cfg, expert_fn=M.variant_expert_fn())
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # skipping every selection == a model whose experts output zero
    skip = jnp.ones((2, 10, cfg.n_layers, cfg.top_k), bool)
    got, _ = FWD(tokens, w, cfg=cfg, expert_fn=M.variant_expert_fn(skip=skip))
    zero = dataclasses.replace(w, layers=[dataclasses.replace(
        lw, experts=dataclasses.replace(lw.experts, down=jnp.zeros_like(lw.experts.down))) for lw in w.layers])
    np.testing.assert_allclose(got, FWD(tokens, zero, cfg=cfg)[0], atol=1e-5, rtol=1e-5)


def test_bf16_matrices_stay_close_to_f32():
    cfg = TINY
    w = _weights(cfg, seed=16)
    tokens = _tokens(cfg, 2, 12, seed=17)
    ref, _ = FWD(tokens, w, cfg=cfg)
    got, _ = FWD(tokens, M.cast_matrices(w, jnp.bfloat16), cfg=cfg)
    assert got.dtype == jnp.float32
    assert float(jnp.abs(got - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_param_count_matches_weights():
    for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=True)):
        w = M.init_weights(cfg, 0)
        n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(w))
        assert M.param_count(cfg)["total"] == n


def test_config_rejects_bad_geometry():
    with pytest.raises(ValueError, match="multiple"):
        M.Config(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        M.Config(n_experts=4, top_k=5)
    assert M.Config.from_dict(TINY.to_dict()) == TINY
