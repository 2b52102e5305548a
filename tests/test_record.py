"""jaxmoe.record: the sparse expert dispatch against the dense one, KV-cache decode routing against a full
forward recomputation, `predicted` against the next router's own top-k, prompt choice, and the CLI
(valid deterministic trace with the right meta; one-line errors)."""
from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import gguf_io as G
from jaxmoe import model as M
from jaxmoe import record as R
from sim.profiles import model_for_trace
from sim.trace import DECODE, PREFILL, load_trace

# hidden and expert_ffn 256: the smallest K-quant rows
TINY = M.Config(vocab=97, hidden=256, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=32, n_experts=8, top_k=3,
                expert_ffn=256, rope_theta=10000.0, max_seq=64)
FWD = jax.jit(M.forward, static_argnames=("cfg", "return_router_probs", "expert_fn"))


def _weights(cfg=TINY, seed=0):
    return M.init_weights(cfg, seed, std=0.08)


def _token_file(path, vocab, n_docs=12, seed=0):
    rng = np.random.default_rng(seed)
    toks = []
    for _ in range(n_docs):
        toks += list(rng.integers(1, vocab, int(rng.integers(10, 60)))) + [0]
    np.asarray(toks, "<u2").tofile(path)
    return path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    G.write_gguf(d / "m.gguf", _weights(), TINY, expert_format="q4_k", name="tiny-test")
    return d / "m.gguf", _token_file(d / "eval.bin", TINY.vocab)


def _margin_ok(probs, k):
    """bool [...]: the k-th and (k+1)-th router probabilities differ enough for float rounding not to swap them."""
    s = np.sort(probs, axis=-1)[..., ::-1]
    return (s[..., k - 1] - s[..., k]) > 1e-4


# ----------------------------------------------------------------------------- sparse experts

@pytest.mark.parametrize("B,T", [(2, 5), (3, 16)])
def test_grouped_experts_equals_dense(B, T):
    cfg = TINY
    ex = _weights().layers[0].experts
    rng = np.random.default_rng(B * T)
    h = jnp.asarray(rng.standard_normal((B, T, cfg.hidden)), jnp.float32)
    ids = np.stack([np.stack([rng.permutation(cfg.n_experts)[:cfg.top_k] for _ in range(T)]) for _ in range(B)])
    ids[0, 0] = ids[0, 1]  # repeated routing: several tokens in one tile
    gates = rng.random((B, T, cfg.top_k)).astype(np.float32)
    gates[0, 2, 1] = 0.0  # a dropped selection
    got = R.grouped_experts(h, jnp.asarray(ids, jnp.int32), jnp.asarray(gates), ex)
    ref = M.dense_experts(0, h, jnp.asarray(ids, jnp.int32), jnp.asarray(gates), ex)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-6)
    for tile in (8, 16):  # every tile size gives the same sums
        other = R.grouped_experts(h, jnp.asarray(ids, jnp.int32), jnp.asarray(gates), ex, tile=tile)
        np.testing.assert_allclose(np.asarray(other), np.asarray(ref), rtol=2e-5, atol=2e-6)


def test_grouped_experts_on_a_stack_picks_per_selection_copies():
    """ids in [0, 2E) index an [own; other] stack: compare with a per-token numpy brute force."""
    cfg = TINY
    own, other = _weights(seed=0).layers[0].experts, _weights(seed=1).layers[0].experts
    stack = M.ExpertWeights(*(jnp.concatenate([a, b]) for a, b in ((own.gate, other.gate), (own.up, other.up),
                                                                     (own.down, other.down))))
    rng = np.random.default_rng(3)
    B, T, E, k = 2, 6, cfg.n_experts, cfg.top_k
    h = rng.standard_normal((B, T, cfg.hidden)).astype(np.float32)
    ids = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(T)]) for _ in range(B)])
    use_other = rng.random((B, T, k)) < 0.5
    gates = rng.random((B, T, k)).astype(np.float32)
    got = np.asarray(R.grouped_experts(jnp.asarray(h), jnp.asarray(ids + E * use_other, jnp.int32),
                                       jnp.asarray(gates), stack))
    ref = np.zeros((B, T, cfg.hidden))
    for b in range(B):
        for t in range(T):
            for r in range(k):
                w = other if use_other[b, t, r] else own
                e = ids[b, t, r]
                x = h[b, t].astype(np.float64)
                g, u = x @ np.asarray(w.gate[e], np.float64), x @ np.asarray(w.up[e], np.float64)
                ref[b, t] += gates[b, t, r] * ((g / (1 + np.exp(-g)) * u) @ np.asarray(w.down[e], np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_hidden_head_returns_the_final_normed_state():
    w = _weights()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab, (2, 7)), jnp.int32)
    logits, _ = FWD(tokens, w, TINY)
    wh, head = R.hidden_head(w)
    hidden, _ = FWD(tokens, wh, TINY)
    np.testing.assert_allclose(np.asarray(R.head_logits(hidden, head)), np.asarray(logits), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- recording

@pytest.fixture(scope="module")
def recorded():
    w = _weights()
    prompts = np.random.default_rng(5).integers(1, TINY.vocab, (3, 10)).astype(np.int32)
    rec = R.record_routing(w, TINY, prompts, n_decode=12)
    return w, prompts, rec


def test_decode_routing_equals_full_forward(recorded):
    w, prompts, rec = recorded
    P, D = prompts.shape[1], rec["decoded"].shape[1]
    full = np.concatenate([prompts, rec["decoded"]], axis=1)  # the tokens at positions 0 .. P+D-1
    logits, routing = FWD(jnp.asarray(full), w, TINY, return_router_probs=True)
    ok = _margin_ok(np.asarray(routing.probs), TINY.top_k)  # [B,T,L]
    assert ok.mean() > 0.95
    ids, gates = np.asarray(routing.ids), np.asarray(routing.gates)
    assert rec["ids"].shape == ids.shape == (3, P + D, TINY.n_layers, TINY.top_k)
    np.testing.assert_array_equal(rec["ids"][ok], ids[ok])
    np.testing.assert_allclose(rec["gates"][ok], gates[ok], atol=1e-4)
    # greedy: each decoded token is the argmax of the logits one position earlier
    lg = np.asarray(logits)
    top2 = np.sort(lg, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-3
    pred_tok = lg.argmax(-1)  # [B, T]
    for j in range(D):
        sel = clear[:, P - 1 + j]
        np.testing.assert_array_equal(rec["decoded"][sel, j], pred_tok[sel, P - 1 + j])
    # phase layout sanity: routing has no ABSENT groups
    assert (rec["ids"] >= 0).all()


def test_predicted_are_the_next_routers_picks(recorded):
    """predicted[l] = top-k of softmax(RMSNorm(x_{l-1}; ffn_norm_l) @ router_l), checked with numpy on the
    residual stream leaving layer l-1 (a truncated model whose 'head' is the identity and whose final norm is
    layer l's ffn_norm returns exactly that router input)."""
    w, prompts, rec = recorded
    full = np.concatenate([prompts, rec["decoded"]], axis=1)
    assert (rec["predicted"][:, :, 0] == M.ABSENT).all()
    checked = 0
    for l in range(1, TINY.n_layers):
        lw = w.layers[l]
        trunc = dataclasses.replace(w, layers=w.layers[:l], final_norm=lw.ffn_norm,
                                    lm_head=jnp.eye(TINY.hidden, dtype=jnp.float32))
        cfg_l = dataclasses.replace(TINY, n_layers=l)
        h, _ = FWD(jnp.asarray(full), trunc, cfg_l)
        logits = np.asarray(h, np.float64) @ np.asarray(lw.router, np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[..., :TINY.top_k]
        ok = _margin_ok(p, TINY.top_k)
        np.testing.assert_array_equal(rec["predicted"][:, :, l][ok], top[ok])
        checked += int(ok.sum())
    assert checked > 0.9 * full.size * (TINY.n_layers - 1)


def test_choose_prompts_takes_evenly_spaced_long_documents():
    # documents of lengths 3, 8, 9, 2, 10, 8 (each followed by eos 0)
    lengths = [3, 8, 9, 2, 10, 8]
    toks = []
    for i, n in enumerate(lengths):
        toks += [100 + i] * n + [0]
    toks = np.asarray(toks)
    _, lens = R.document_starts(toks)
    np.testing.assert_array_equal(lens, lengths)
    prompts, docs = R.choose_prompts(toks, 2, 8)
    # eligible (≥ 8 tokens): docs 1, 2, 4, 5 → picks indices 0 and 2 of them → docs 1 and 4
    np.testing.assert_array_equal(docs, [1, 4])
    np.testing.assert_array_equal(prompts, [[101] * 8, [104] * 8])
    with pytest.raises(R.InputError, match="only 4 documents"):
        R.choose_prompts(toks, 5, 8)


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_a_valid_deterministic_trace(tiny_files, tmp_path):
    model, tokens = tiny_files
    args = ["--model", str(model), "--tokens", str(tokens), "--seqs", "3", "--prompt-tokens", "8", "--decode", "6"]
    assert R.main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    first = (tmp_path / "a.npz").read_bytes()
    assert R.main(args + ["--out", str(tmp_path / "a.npz")]) == 0  # same command → same bytes
    assert (tmp_path / "a.npz").read_bytes() == first
    t = load_trace(tmp_path / "a.npz")
    m = t.meta
    assert t.n_steps == 3 * (8 + 6)
    assert (m.n_layers, m.n_experts, m.top_k) == (3, 8, 3)
    np.testing.assert_array_equal(t.phase, np.tile([PREFILL] * 8 + [DECODE] * 6, 3))
    np.testing.assert_array_equal(t.seq, np.repeat([0, 1, 2], 14))
    assert "not the 30B-A3B" in m.model and "tiny-test" in m.model and "NOT Qwen3-30B-A3B" in m.provenance
    # the simulator builds the model profile from the trace itself (not the built-in Qwen3-30B-A3B)
    prof = model_for_trace(m)
    assert (prof.n_layers, prof.n_experts, prof.top_k) == (3, 8, 3) and prof.name == m.model
    assert prof.kv_bytes_per_token == 3 * 2 * 1 * 32 * 2
    g0 = G.read_gguf(model, dequantize=False)
    assert prof.head_bytes == g0.tensors["output.weight"].nbytes + 97 * 256 * 4 // 97 + 256 * 4  # f32 tensors
    assert m.expert_weights == 3 * 256 * 256
    assert m.expert_bytes == (3 * 256 * 256 // 256 * 144,) * 3  # Q4_K: 144 bytes per 256 weights
    assert m.expert_format == ("q4_k",) * 3
    assert m.extra["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert m.extra["corpus_split"] == "eval" and m.extra["decode_tokens"] == 6
    assert m.extra["command"].startswith("python -m jaxmoe.record --model")
    assert t.predicted is not None and (t.predicted[:, 0] == -1).all() and (t.predicted[:, 1:] >= 0).all()
    # the trace's routing is the model's: re-record in-process and compare
    g = G.read_gguf(model)
    prompts, _ = R.choose_prompts(np.fromfile(tokens, "<u2").astype(np.int64), 3, 8)
    rec = R.record_routing(g.weights, g.cfg, prompts, 6)
    np.testing.assert_array_equal(t.experts, rec["ids"].reshape(-1, 3, 3))


def test_cli_errors_are_one_line_exit_2(tiny_files, tmp_path, capsys):
    model, tokens = tiny_files
    cases = [
        (["--model", str(tmp_path / "none.gguf"), "--tokens", str(tokens)], "no such model file"),
        (["--model", str(model), "--tokens", str(tokens), "--seqs", "50", "--prompt-tokens", "8", "--decode", "4"],
         "documents have"),
        (["--model", str(model), "--tokens", str(tokens), "--prompt-tokens", "40", "--decode", "40", "--seqs", "1"],
         "exceed the model's context"),
    ]
    for args, msg in cases:
        out = tmp_path / "x.npz"
        with pytest.raises(SystemExit) as exc:
            R.main(args + ["--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err
        assert not out.exists()
