"""jaxmoe.quality against independent references: float64 perplexity/KL/top-1/Δp from the model's own dense
forward, the simulator's demoted sets (sim.engine.static_slots), brute-force gate-mass sums, the model's
`variant_expert_fn` for HOBBIT's rule, exactness of the no-op configurations, seeded bootstrap, the CLI."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import gguf_io as G
from jaxmoe import model as M
from jaxmoe import quality as Q
from sim.io import InputError
from sim.precision import SIGNALS, hobbit_scores, parse_precision, static_slots

TINY = M.Config(vocab=97, hidden=256, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, n_experts=8, top_k=3,
                expert_ffn=256, rope_theta=10000.0, max_seq=64)
N_CTX, N_CHUNKS = 32, 4
FWD = jax.jit(M.forward, static_argnames=("cfg", "return_router_probs", "expert_fn"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    w = M.init_weights(TINY, 0, std=0.08)
    G.write_gguf(d / "m.gguf", w, TINY, expert_format="q4_k", name="tiny-test")
    np.savez(d / "w.npz", **G.weights_to_tensors(w, TINY))
    G.write_gguf(d / "direct-q2_k.gguf", w, TINY, expert_format="q2_k", name="tiny-test-direct")
    rng = np.random.default_rng(1)
    # a learnable-ish stream: a repeated phrase with noise, so distributions are not flat
    phrase = rng.integers(1, TINY.vocab, 23)
    def stream(n, seed):
        r = np.random.default_rng(seed)
        x = np.resize(phrase, n).copy()
        noise = r.random(n) < 0.3
        x[noise] = r.integers(1, TINY.vocab, int(noise.sum()))
        return x.astype(np.int64)
    eval_tokens, calib_tokens = stream(600, 2), stream(400, 3)
    eval_tokens.astype("<u2").tofile(d / "eval.bin")
    calib_tokens.astype("<u2").tofile(d / "calib.bin")
    g = G.read_gguf(d / "m.gguf")
    chunks = Q.make_chunks(eval_tokens, N_CTX, N_CHUNKS)
    ev = Q.Evaluator(g.weights, TINY, chunks, batch=2)
    ref = ev.run(keep_logp=True, keep_routing=True)
    ev.ref_logp = ref.logp
    base = Q.model_experts(g.weights)
    q2 = Q.requantized_experts(g, "q2_k")
    return {"dir": d, "float": w, "gguf": g, "eval": eval_tokens, "calib": calib_tokens, "chunks": chunks,
            "ev": ev, "ref": ref, "base": base, "q2": q2}


def _dense_logp(weights, chunks):
    """float64 log-probs at the scored positions from the model's own dense forward and head."""
    logits, _ = FWD(jnp.asarray(chunks), weights, TINY)
    first = chunks.shape[1] // 2
    lg = np.asarray(logits, np.float64)[:, first:-1]
    lg = lg - lg.max(-1, keepdims=True)
    return lg - np.log(np.exp(lg).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- chunks and expert copies

def test_chunks_follow_llama_cpps_grid():
    assert Q.chunk_starts(10_000, 512, 19).tolist() == [512 * i for i in range(19)]  # all 19 available
    assert Q.chunk_starts(10_000, 512, 4).tolist() == [0, 4 * 512, 8 * 512, 12 * 512]  # every 4th of 19
    with pytest.raises(ValueError, match="hold 19 chunks"):
        Q.chunk_starts(10_000, 512, 20)


def test_expert_copies_keep_the_model_layout(setup):
    """Q4_K → Q8_0 re-quantization lands within Q8_0 error of the Q4_K experts (a wrong transpose would not)."""
    q8 = Q.requantized_experts(setup["gguf"], "q8_0")
    for l, (b, c) in enumerate(zip(setup["base"], q8)):
        for name in ("gate", "up", "down"):
            x, y = getattr(b, name), getattr(c, name)
            assert x.shape == y.shape
            assert np.abs(x - y).max() <= 0.01 * np.abs(x).max()
    f2 = Q.float_quantized_experts(setup["float"], TINY, "q2_k")
    err_float = np.abs(f2[0].gate - np.asarray(setup["float"].layers[0].experts.gate)).mean()
    err_q4 = np.abs(setup["q2"][0].gate - np.asarray(setup["float"].layers[0].experts.gate)).mean()
    assert 0 < err_float < err_q4 * 1.2 and err_float < 0.5 * np.abs(setup["base"][0].gate).mean()


def test_mix_and_stack_pick_the_right_experts(setup):
    base, q2 = setup["base"], setup["q2"]
    dm = np.zeros((TINY.n_layers, TINY.n_experts), bool)
    dm[0, [1, 5]] = True
    mixed = Q.mix_experts(base, q2, dm)
    for e in range(TINY.n_experts):
        src = q2 if e in (1, 5) else base
        np.testing.assert_array_equal(mixed[0].down[e], src[0].down[e])
        np.testing.assert_array_equal(mixed[1].up[e], base[1].up[e])
    st = Q.stack_experts(base, q2)
    np.testing.assert_array_equal(st[1].gate[TINY.n_experts + 3], q2[1].gate[3])


# ----------------------------------------------------------------------------- exactness of no-op configurations

def _assert_equals_reference(res, ref):
    assert np.all(res.sums["kl"] == 0) and np.all(res.sums["kl_rev"] == 0) and np.all(res.sums["dp"] == 0)
    assert np.all(res.sums["top1"] == res.n_per_chunk)
    np.testing.assert_array_equal(res.sums["nll"], ref.sums["nll"])
    m = Q.metrics(res, Q.bootstrap_indices(N_CHUNKS, 50, 0))
    assert m["kld"] == 0 and m["top1"] == 1 and m["ppl_ratio"] == 1 and m["ppl_ratio_ci"] == [1.0, 1.0]


def test_static_zero_percent_equals_baseline_exactly(setup):
    ev = setup["ev"]
    calib = Q.calibration_trace(setup["gguf"].weights, TINY, Q.make_chunks(setup["calib"], N_CTX, 4), 2)
    for sig in SIGNALS:
        assert not Q.demoted_set(calib, sig, 0.0, 0).any()
    dm = np.zeros((TINY.n_layers, TINY.n_experts), bool)
    res = ev.run(Q.mix_experts(setup["base"], setup["q2"], dm), demoted=dm)
    _assert_equals_reference(res, setup["ref"])
    assert res.low_mass == 0 and res.skipped_mass == 0


def test_dynamic_with_t1_t2_one_equals_baseline_exactly(setup):
    res = setup["ev"].run(Q.stack_experts(setup["base"], setup["q2"]), t1=1.0, t2=1.0)
    _assert_equals_reference(res, setup["ref"])
    assert res.low_mass == 0 and res.skipped_mass == 0


# ----------------------------------------------------------------------------- metrics against float64

def test_perplexity_kl_top1_dp_against_float64_reference(setup):
    g, chunks, ev = setup["gguf"], setup["chunks"], setup["ev"]
    first = N_CTX // 2
    tgt = chunks[:, first + 1:]
    lp_ref = _dense_logp(g.weights, chunks)
    nll_ref = -np.take_along_axis(lp_ref, tgt[..., None], -1)[..., 0]
    assert nll_ref.shape == (N_CHUNKS, N_CTX - 1 - first)  # llama.cpp: n_ctx - 1 - n_ctx/2 per chunk
    boot = Q.bootstrap_indices(N_CHUNKS, 100, 0)
    m_ref = Q.metrics(setup["ref"], boot)
    assert m_ref["ppl"] == pytest.approx(np.exp(nll_ref.mean()), rel=1e-5)
    assert m_ref["n_tokens"] == nll_ref.size
    # all experts at Q2_K: KL, top-1, Δp against the dense float64 computation
    dm = np.ones((TINY.n_layers, TINY.n_experts), bool)
    low = Q.mix_experts(setup["base"], setup["q2"], dm)
    res = ev.run(low, demoted=dm)
    lp = _dense_logp(Q.with_experts(g.weights, low), chunks)
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(-1)
    m = Q.metrics(res, boot)
    assert m["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert m["ppl_ratio"] == pytest.approx(np.exp(nll.mean() - nll_ref.mean()), rel=1e-5)
    assert m["kld"] == pytest.approx(kl.mean(), rel=1e-3, abs=1e-7) and m["kld"] > 1e-4
    assert m["top1"] == pytest.approx((lp.argmax(-1) == lp_ref.argmax(-1)).mean(), abs=1.5 / nll.size)
    dp = np.exp(-nll) - np.exp(-nll_ref)
    assert m["dp"] == pytest.approx(dp.mean(), abs=1e-6)
    assert np.all(res.sums["kl"] >= 0) and res.low_mass == 1.0


def test_kl_terms_nonnegative_and_equal_to_float64_kl():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 500)) * 3
    far = logits + rng.standard_normal((64, 500))
    near = logits + 1e-6 * rng.standard_normal((64, 500))
    spiky = logits.copy()
    spiky[:, 0] += 60.0  # a token the reference gives ~0 and the other ~1: e^{-d} overflow branch
    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    kl_fn = jax.jit(Q._kl_terms)
    for other in (far, near, spiky):
        a, b = logsm(logits), logsm(other)
        got = np.asarray(kl_fn(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
        ref = (np.exp(a) * (a - b)).sum(-1)
        assert np.all(got >= 0)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=2e-6)
    a = jnp.asarray(logsm(logits), jnp.float32)
    assert np.all(np.asarray(kl_fn(a, a)) == 0)
    # the plain float32 formula goes negative on near-identical distributions; ours cannot
    plain = np.asarray(jnp.sum(jnp.exp(a) * (a - jnp.asarray(logsm(near), jnp.float32)), -1))
    assert plain.min() < 0


# ----------------------------------------------------------------------------- static: the simulator's experts

def test_demoted_sets_are_the_simulators(setup):
    calib_chunks = Q.make_chunks(setup["calib"], N_CTX, 4)
    calib = Q.calibration_trace(setup["gguf"].weights, TINY, calib_chunks, 2)
    assert calib.n_steps == 4 * N_CTX and calib.meta.n_experts == TINY.n_experts
    # the calibration routing is the model's: compare with the dense forward where no near-tie
    _, routing = FWD(jnp.asarray(calib_chunks), setup["gguf"].weights, TINY, return_router_probs=True)
    p = np.sort(np.asarray(routing.probs), -1)[..., ::-1]
    ok = (p[..., TINY.top_k - 1] - p[..., TINY.top_k]).reshape(-1, TINY.n_layers) > 1e-4
    ids = np.asarray(routing.ids).reshape(-1, TINY.n_layers, TINY.top_k)
    np.testing.assert_array_equal(calib.experts[ok], ids[ok])
    for sig in SIGNALS:
        for frac in (0.0, 0.1, 0.3, 0.5, 1.0):
            policy = parse_precision(f"static:{sig}:{frac * 100:g}%:q2_k")
            sim = static_slots(calib, policy, TINY.n_layers, TINY.n_experts, seed=7) != 0
            np.testing.assert_array_equal(Q.demoted_set(calib, sig, frac, 7), sim)


def test_static_row_mass_matches_brute_force(setup):
    dm = np.zeros((TINY.n_layers, TINY.n_experts), bool)
    dm[0, [0, 3, 6]] = True
    dm[1, [2]] = True
    res = setup["ev"].run(Q.mix_experts(setup["base"], setup["q2"], dm), demoted=dm, keep_routing=True)
    total = low = 0.0
    C, T, L, k = res.ids.shape
    for c in range(C):
        for t in range(T):
            for l in range(L):
                for r in range(k):
                    w = float(res.gates[c, t, l, r])
                    total += w
                    low += w if dm[l, res.ids[c, t, l, r]] else 0.0
    assert res.low_mass == pytest.approx(low / total, rel=1e-12) and res.skipped_mass == 0
    assert 0 < res.low_mass < 1


# ----------------------------------------------------------------------------- dynamic: HOBBIT's rule

def test_hobbit_masks_match_the_float64_rule():
    rng = np.random.default_rng(0)
    k = 4
    g = rng.dirichlet(np.ones(k), size=20000).astype(np.float32)
    g = -np.sort(-g, axis=1)
    # adversarial: the first two gates sum, in exact arithmetic, to just below/above a threshold
    t = 0.6
    a = rng.uniform(0.3, 0.59, 20000).astype(np.float32)
    b = (np.float32(t) - a).astype(np.float32)
    adv = []
    for delta in (-2, -1, 0, 1, 2):
        bb = np.nextafter(b, np.float32(np.inf * np.sign(delta))) if delta else b
        if abs(delta) == 2:
            bb = np.nextafter(bb, np.float32(np.inf * np.sign(delta)))
        rest = np.clip(1 - a - bb, 0, None)
        adv.append(np.stack([np.maximum(a, bb), np.minimum(a, bb), rest * 0.6, rest * 0.4], 1))
    g = np.concatenate([g] + adv).astype(np.float32)
    fn = jax.jit(Q.hobbit_masks)
    naive_wrong = 0
    for t1, t2 in [(0.6, 0.9), (0.4, 0.6), (0.0, 1.0), (1.0, 1.0), (0.8, 0.8)]:
        low, skip = (np.asarray(x) for x in fn(jnp.asarray(g), jnp.asarray(Q.threshold_pair(t1)),
                                                 jnp.asarray(Q.threshold_pair(t2))))
        s = hobbit_scores(g)  # the simulator's float64 scores
        np.testing.assert_array_equal(skip, s > t2)
        np.testing.assert_array_equal(low, (s > t1) & (s <= t2))
        s32 = np.cumsum(g, axis=1, dtype=np.float32) - g
        naive_wrong += int(((s32 > np.float32(t1)) != (s > t1)).sum())
    assert naive_wrong > 0  # the adversarial cases do trip a plain float32 cumsum


def test_dynamic_pass_is_hobbits_rule_through_the_models_hook(setup):
    """Re-run the dynamic configuration with the model's own variant_expert_fn (dense), feeding it the
    decisions the float64 rule makes on the pass's routing: same routing, same distributions."""
    g, chunks = setup["gguf"], setup["chunks"]
    t1, t2 = 0.5, 0.8
    res = setup["ev"].run(Q.stack_experts(setup["base"], setup["q2"]), t1=t1, t2=t2, keep_routing=True)
    assert res.low_mass > 0.05 and res.skipped_mass > 0.01
    s = hobbit_scores(res.gates)
    skip = s > t2
    low = (s > t1) & ~skip
    alternates = [M.ExpertWeights(*(jnp.asarray(x)[None] for x in (q.gate, q.up, q.down))) for q in setup["q2"]]
    fn = M.variant_expert_fn(alternates, rank_variant=jnp.asarray(low.astype(np.int32)), skip=jnp.asarray(skip))
    logits, routing = FWD(jnp.asarray(chunks), g.weights, TINY, expert_fn=fn, return_router_probs=True)
    p = np.sort(np.asarray(routing.probs), -1)[..., ::-1]
    ok = (p[..., TINY.top_k - 1] - p[..., TINY.top_k]) > 1e-4
    assert ok.mean() > 0.95
    np.testing.assert_array_equal(np.asarray(routing.ids)[ok], res.ids[ok])
    first = N_CTX // 2
    lp = jax.nn.log_softmax(logits[:, first:-1], axis=-1)
    nll = -np.take_along_axis(np.asarray(lp), chunks[:, first + 1:, None], -1)[..., 0]
    np.testing.assert_allclose(res.sums["nll"], nll.sum(1), rtol=1e-4)
    # and its mass accounting is a brute-force sum over the pass's selections
    w = res.gates.astype(np.float64).ravel()
    sc = np.concatenate([[sum(row[:r]) for r in range(len(row))] for row in res.gates.reshape(-1, TINY.top_k)
                         .astype(np.float64)])
    assert res.skipped_mass == pytest.approx(w[sc > t2].sum() / w.sum(), rel=1e-9)
    assert res.low_mass == pytest.approx(w[(sc > t1) & (sc <= t2)].sum() / w.sum(), rel=1e-9)


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_is_deterministic_for_a_seed(setup):
    dm = np.ones((TINY.n_layers, TINY.n_experts), bool)
    res = setup["ev"].run(Q.mix_experts(setup["base"], setup["q2"], dm), demoted=dm)
    a = Q.metrics(res, Q.bootstrap_indices(N_CHUNKS, 300, 11))
    b = Q.metrics(res, Q.bootstrap_indices(N_CHUNKS, 300, 11))
    c = Q.metrics(res, Q.bootstrap_indices(N_CHUNKS, 300, 12))
    assert a == b and a["kld_ci"] != c["kld_ci"]
    for key in ("ppl", "kld", "top1", "dp", "ppl_ratio"):
        lo, hi = a[f"{key}_ci"]
        assert lo <= hi
    # the resampled statistic is the per-chunk one: with one chunk index repeated the CI collapses
    one = Q.metrics(res, np.zeros((10, N_CHUNKS), int))
    per_chunk0 = res.sums["kl"][0] / res.n_per_chunk
    assert one["kld_ci"] == pytest.approx([per_chunk0, per_chunk0])


# ----------------------------------------------------------------------------- CLI

def _cli(setup, tmp_path, *extra):
    d = setup["dir"]
    out = tmp_path / "q.json"
    args = ["--model", str(d / "m.gguf"), "--tokens", str(d / "eval.bin"), "--calib", str(d / "calib.bin"),
            "--quick", "--ctx", "32", "--json", str(out), *extra]
    return Q.main(args), out


def test_cli_quick_run_writes_tidy_rows(setup, tmp_path, capsys):
    rc, out = _cli(setup, tmp_path, "--float", str(setup["dir"] / "w.npz"))
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert doc["command"].startswith("python -m jaxmoe.quality --model")
    assert all(list(r) == list(Q.ROW_KEYS) for r in rows)
    by = {}
    for r in rows:
        by.setdefault(r["policy"], []).append(r)
    assert len(by["native"]) == 3 and len(by["dynamic"]) == 3
    static = [r for r in by["static"] if r["source"] == "q4_k" and r["reference"] == "q4_k"]
    compound = [r for r in by["static"] if r["source"] == "float" and r["reference"] == "q4_k"]
    vs_float_pairs = [r for r in by["static"] if r["reference"] == "float"]
    assert len(static) == 3 * 4 * 2 and len(compound) == 2 and len(vs_float_pairs) == 2 * 2
    for r in vs_float_pairs:  # perplexity needs no reference: the same configuration scored against Q4_K
        twin = next(q for q in by["static"] if q["reference"] == "q4_k" and q["source"] == r["source"]
                    and q["precision"] == r["precision"])
        assert r["ppl"] == twin["ppl"] and r["low_mass"] == twin["low_mass"] and r["kld"] != twin["kld"]
    for r in static:
        assert r["precision"] == f"static:{r['signal']}:{r['fraction'] * 100:g}%:{r['format']}"
        if r["fraction"] == 0:
            assert r["kld"] == 0 and r["top1"] == 1 and r["low_mass"] == 0
        if r["fraction"] == 1:
            assert r["low_mass"] == pytest.approx(1.0) and r["kld"] > 0
    ref = by["native"][0]
    assert ref["reference"] == "q4_k" and ref["kld"] == 0 and ref["ppl_ratio"] == 1
    vs_float = next(r for r in by["native"] if r["reference"] == "float")
    assert vs_float["format"] == "q4_k" and vs_float["kld"] > 0
    # the dynamic no-op and X=0 rows reproduce the reference's perplexity exactly
    noop = next(r for r in by["dynamic"] if r["t1"] == 1 and r["t2"] == 1)
    assert noop["ppl"] == ref["ppl"] and noop["kld"] == 0 and noop["skipped_mass"] == 0
    assert doc["setup"]["n_ctx"] == 32 and doc["setup"]["scored_per_chunk"] == 15
    assert set(doc["setup"]["demoted"]) == {f"{s}:{x:g}%" for s in SIGNALS for x in (0, 50, 100)}
    calib = Q.calibration_trace(setup["gguf"].weights, TINY, Q.make_chunks(setup["calib"], 32, 4), 2)
    for sig in SIGNALS:  # the experts the run demoted are the ones the simulator demotes
        sim = static_slots(calib, parse_precision(f"static:{sig}:50%:q2_k"), TINY.n_layers, TINY.n_experts, 0)
        assert doc["setup"]["demoted"][f"{sig}:50%"] == [np.flatnonzero(layer).tolist() for layer in sim]
    err = capsys.readouterr().err
    assert "[1/" in err and "wrote" in err
    # same command, same seed → same rows
    rc, out2 = _cli(setup, tmp_path, "--float", str(setup["dir"] / "w.npz"))
    assert json.loads(out2.read_text())["rows"] == rows
    # a GGUF quantized straight from float (jaxmoe.train --direct-formats) gives the same compounding rows
    rc, out3 = _cli(setup, tmp_path, "--direct", str(setup["dir"] / "direct-q2_k.gguf"))
    doc3 = json.loads(out3.read_text())
    direct_rows = [r for r in doc3["rows"] if r["source"] == "float"]
    assert direct_rows == [r for r in compound if r["format"] == "q2_k"]
    assert doc3["setup"]["compound_sources"] == {"q2_k": "direct GGUF"}


def test_cli_errors_are_one_line_exit_2(setup, tmp_path, capsys):
    d = setup["dir"]
    cases = [
        (["--model", str(d / "none.gguf")], "no such model file"),
        (["--model", str(d / "m.gguf"), "--formats", "q5_k"], "low format"),
        (["--model", str(d / "m.gguf"), "--chunks", "99"], "chunks of 32"),
        (["--model", str(d / "m.gguf"), "--float", str(d / "eval.bin")], "cannot read float weights"),
        (["--model", str(d / "m.gguf"), "--direct", str(d / "m.gguf")], "experts must all be in one of"),
    ]
    for args, msg in cases:
        out = tmp_path / "x.json"
        full = args + ["--tokens", str(d / "eval.bin"), "--calib", str(d / "calib.bin"), "--quick", "--ctx", "32",
                       "--json", str(out)]
        with pytest.raises(SystemExit) as exc:
            Q.main(full)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
        assert not out.exists()


def test_direct_experts_from_an_npz_of_stored_bytes_equal_the_gguf(setup, tmp_path):
    """The committed form of the float → Q2_K experts (an npz of the GGUF's expert tensor bytes) reads
    back to exactly the experts of the direct GGUF."""
    direct = G.read_gguf(setup["dir"] / "direct-q2_k.gguf")
    npz = tmp_path / "experts.npz"
    np.savez(npz, **{n: np.asarray(t.data) for n, t in direct.tensors.items() if "exps" in n})
    fmt_a, a = Q.direct_experts(npz, TINY, setup["gguf"])
    fmt_b, b = Q.direct_experts(setup["dir"] / "direct-q2_k.gguf", TINY)
    assert fmt_a == fmt_b == "q2_k"
    for x, y in zip(a, b):
        for kind in ("gate", "up", "down"):
            np.testing.assert_array_equal(getattr(x, kind), getattr(y, kind))
    with pytest.raises(InputError, match="baseline"):
        Q.direct_experts(npz, TINY)
