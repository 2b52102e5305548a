"""jaxmoe.moe_scan: the sparse grouped dispatch equals a float64 brute force; the scanned model equals
model.py's unrolled dense model (both keep a float32 residual stream: float32 tolerance), gradients
included; the variant choice serves the copies it says it serves."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import model as M
from jaxmoe import moe_scan as S

CFG = M.Config(vocab=64, hidden=16, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=8, top_k=3,
               expert_ffn=12, max_seq=32)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _weights(seed=0, std=0.3):
    w = M.init_weights(CFG, seed, dtype=jnp.float64, std=std)
    return w


def test_grouped_tiles_equals_dense_float64():
    rng = np.random.default_rng(1)
    N, D, F, X, k = 37, 16, 12, 8, 3
    h = jnp.asarray(rng.standard_normal((N, D)))
    ids = jnp.asarray(np.stack([rng.permutation(X)[:k] for _ in range(N)]))
    gates = jnp.asarray(rng.random((N, k)))
    gw, uw, dw = (jnp.asarray(rng.standard_normal(s)) for s in ((X, D, F), (X, D, F), (X, F, D)))
    hn, gn, un, dn = (np.asarray(a) for a in (h, gw, uw, dw))
    ref = np.zeros((N, D))
    for n in range(N):
        for r in range(k):
            e = int(ids[n, r])
            g, u = hn[n] @ gn[e], hn[n] @ un[e]
            ref[n] += float(gates[n, r]) * ((g / (1 + np.exp(-g)) * u) @ dn[e])
    for tile in (1, 4, 8, 64):
        out = S.grouped_tiles(h, ids, gates, gw, uw, dw, tile)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)


def test_scanned_forward_equals_unrolled_dense_model():
    w = _weights()
    toks = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab, (2, 11)))
    ref_logits, ref_routing = M.forward(toks, w, CFG)
    ws = S.stack_layers(w)
    hidden, aux = S.forward(toks, ws, CFG, tile=4)
    logits = S.logits_of(hidden, ws)
    np.testing.assert_array_equal(np.asarray(aux["ids"]), np.asarray(ref_routing.ids))
    np.testing.assert_allclose(np.asarray(aux["gates"]), np.asarray(ref_routing.gates), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-4)


def test_gradients_of_sparse_path_equal_dense():
    w = _weights()
    toks = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab, (2, 9)))

    def loss_dense(w):
        lg, _ = M.forward(toks, w, CFG)
        return jnp.mean(jax.nn.logsumexp(lg, -1))

    def loss_sparse(ws):
        hid, _ = S.forward(toks, ws, CFG, tile=4, checkpoint=True)
        return jnp.mean(jax.nn.logsumexp(S.logits_of(hid, ws), -1))

    gd = S.stack_layers(jax.grad(loss_dense)(w))
    gs = jax.grad(loss_sparse)(S.stack_layers(w))
    for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(gs)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)


def test_choice_serves_the_named_copy_and_plan_overrides_rule():
    w = _weights()
    ws = S.stack_layers(w)
    toks = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab, (1, 7)))
    base = ws.layers.experts
    zero = jax.tree_util.tree_map(jnp.zeros_like, base)
    L, E = CFG.n_layers, CFG.n_experts
    # all experts of layer 1 served by the zero copy == a model whose layer-1 experts are zero
    table = np.zeros((L, E), np.int32)
    table[1] = 1
    hid, aux = S.forward(toks, ws, CFG, sets=(base, zero), choice=S.static_choice(table), tile=4)
    ex0 = dataclasses.replace(ws.layers, experts=M.ExpertWeights(*(a.at[1].set(0.0) for a in (base.gate, base.up, base.down))))
    hid_ref, _ = S.forward(toks, dataclasses.replace(ws, layers=ex0), CFG, tile=4)
    np.testing.assert_allclose(np.asarray(hid), np.asarray(hid_ref), rtol=1e-6, atol=1e-6)
    # a plan holding the no-experts model's routing, every selection SKIP: every selection is planned
    # (the routing matches at every layer) and the output is the no-experts model's
    lw = dataclasses.replace(ws.layers, experts=zero)
    hid_noexp, aux_noexp = S.forward(toks, dataclasses.replace(ws, layers=lw), CFG, tile=4)
    ch = S.static_choice(np.zeros((L, E), np.int32))
    ch.plan_ids = aux_noexp["ids"]
    ch.plan_var = jnp.full(aux_noexp["ids"].shape, S.SKIP, jnp.int32)
    hid_skip, aux_s = S.forward(toks, ws, CFG, sets=(base,), choice=ch, tile=4)
    assert float(aux_s["planned"].sum()) == aux_noexp["ids"].size
    np.testing.assert_allclose(float(aux_s["skip_mass"].sum()), float(np.asarray(aux_noexp["gates"]).sum()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hid_skip), np.asarray(hid_noexp), rtol=1e-6, atol=1e-6)
    # the same plan on the real routing: layer 0 is fully planned (same input), later layers drift
    ch.plan_ids = aux["ids"]
    _, aux_d = S.forward(toks, ws, CFG, sets=(base,), choice=ch, tile=4)
    assert float(aux_d["planned"][0]) == toks.size * CFG.top_k


def test_error_sums_measure_copy_difference():
    w = _weights()
    ws = S.stack_layers(w)
    toks = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab, (2, 6)))
    base = ws.layers.experts
    scaled = jax.tree_util.tree_map(lambda a: a, base)
    scaled = M.ExpertWeights(base.gate, base.up, base.down * 1.5)  # y_b = 1.5 y_a → err = 0.25 ||y_a||²
    _, aux = S.forward(toks, ws, CFG, err_sets=(base, scaled), tile=4)
    np.testing.assert_allclose(np.asarray(aux["err_sum"]), 0.25 * np.asarray(aux["ref_sq"]), rtol=1e-5)
    counts = np.stack([np.bincount(np.asarray(aux["ids"])[:, :, l].ravel(), minlength=CFG.n_experts)
                       for l in range(CFG.n_layers)])
    np.testing.assert_array_equal(np.asarray(aux["err_n"]), counts)


def test_decode_with_cache_matches_forward():
    with jax.enable_x64(False):  # model.attention's cache indices are int32
        w = M.init_weights(CFG, 0, std=0.3)
        ws = S.stack_layers(w)
        toks = jnp.asarray(np.random.default_rng(6).integers(0, CFG.vocab, (2, 8)), jnp.int32)
        hid, aux = S.forward(toks, ws, CFG, tile=4)
        full = S.logits_of(hid, ws)
        cache = M.init_cache(CFG, 2, 8)
        lg, _, _, cache = S.decode_tokens(toks[:, :5], ws, CFG, cache)
        np.testing.assert_allclose(np.asarray(lg), np.asarray(full[:, 4]), rtol=1e-4, atol=1e-4)
        for t in range(5, 8):
            lg, ids_t, _, cache = S.decode_tokens(toks[:, t:t + 1], ws, CFG, cache)
            np.testing.assert_allclose(np.asarray(lg), np.asarray(full[:, t]), rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(np.asarray(ids_t[:, 0]), np.asarray(aux["ids"][:, t]))
