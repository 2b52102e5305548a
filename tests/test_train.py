"""jaxmoe.train: a CPU smoke run end to end (learns, writes a readable Q4_K GGUF, reproducible), and the
pieces against numpy references (AdamW, load-balancing loss, schedule, windows), plus CLI errors."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import gguf_io as G
from jaxmoe import model as M
from jaxmoe import train as TR


def _corpus(path, n_train=20_000, n_eval=3_000, vocab=8192, seed=0, n_calib=0):
    """A synthetic corpus: a fixed 40-token phrase with random noise tokens, eos every 200 tokens
    (train, eval and, when n_calib, calib splits)."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(2, 500, 40)

    def make(n):
        x = np.resize(phrase, n).copy()
        noise = rng.random(n) < 0.1
        x[noise] = rng.integers(2, vocab, int(noise.sum()))
        x[::200] = 0
        return x.astype("<u2")

    path.mkdir(parents=True, exist_ok=True)
    make(n_train).tofile(path / "train.bin")
    make(n_eval).tofile(path / "eval.bin")
    if n_calib:
        make(n_calib).tofile(path / "calib.bin")
    meta = {"tokenizer": {"path": "jaxmoe/tokenizer.json", "vocab_size": vocab, "eos_id": 0}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    data = _corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("run")
    tcfg = dataclasses.replace(TR.SMOKE_TRAIN, max_steps=10, log_every=1)
    log = TR.run(data, out, TR.SMOKE_MODEL, tcfg, quiet=True)
    return data, out, tcfg, log


def test_smoke_run_learns_and_writes_a_q4k_gguf(smoke_run):
    data, out, tcfg, log = smoke_run
    ce = [r["ce"] for r in log["curve"]]
    assert len(ce) == 10 and log["steps_done"] == 10 and not log["stopped_early"]
    assert ce[-1] < ce[0] - 1.0  # initial ≈ ln(8192) = 9.0; the phrase is learnable
    assert abs(ce[0] - math.log(8192)) < 0.5
    m = G.read_gguf(out / "model.gguf")
    assert m.cfg == TR.SMOKE_MODEL
    assert m.expert_format(0, "gate") == m.expert_format(1, "down") == "q4_k"
    assert m.tensors["blk.0.attn_q.weight"].fmt == "q8_0" and m.tensors["token_embd.weight"].fmt == "q8_0"
    assert m.tensors["blk.0.ffn_norm.weight"].fmt == "f32" and m.tensors["blk.0.ffn_gate_inp.weight"].fmt == "f32"
    assert m.tokenizer is not None and len(m.tokenizer["tokens"]) == 8192
    assert m.metadata["jaxmoe.train.steps"] == 10
    # the saved float weights reproduce the logged float perplexity; the GGUF's is close to it
    w = TR.load_float_weights(out / "weights.npz", TR.SMOKE_MODEL)
    corpus = TR.load_corpus(data)
    e = TR.evaluate(w, corpus["eval"], TR.SMOKE_MODEL, tcfg.seq, tcfg.batch, tcfg.final_eval_windows)
    assert e["ppl"] == pytest.approx(log["final_eval_f32"]["ppl"], rel=1e-5)
    assert log["final_eval_gguf"]["ppl"] == pytest.approx(log["final_eval_f32"]["ppl"], rel=0.05)
    # Q4_K round trip of the experts is close to the float weights
    gate_f = np.asarray(w.layers[1].experts.gate)
    assert np.abs(m.weights.layers[1].experts.gate - gate_f).max() < 0.2 * np.abs(gate_f).max()
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["steps_done"] == 10 and saved["gguf"]["bytes"] == (out / "model.gguf").stat().st_size
    assert json.loads((out / "config.json").read_text())["model"] == TR.SMOKE_MODEL.to_dict()
    load = np.asarray(saved["final_eval_f32"]["expert_load"]["counts"])
    assert load.shape == (2, 4) and np.all(load.sum(1) == log["final_eval_f32"]["tokens"] * 2)


def test_same_seed_same_curve(smoke_run, tmp_path):
    data, _, tcfg, log = smoke_run
    again = TR.run(data, tmp_path, TR.SMOKE_MODEL, tcfg, quiet=True)
    assert [r["loss"] for r in again["curve"]] == [r["loss"] for r in log["curve"]]
    other = TR.run(data, tmp_path / "s1", TR.SMOKE_MODEL, dataclasses.replace(tcfg, seed=1, max_steps=2),
                   quiet=True)
    assert other["curve"][0]["loss"] != log["curve"][0]["loss"]


def test_adamw_matches_numpy_reference():
    rng = np.random.default_rng(0)
    tcfg = TR.TrainConfig(weight_decay=0.1, beta1=0.9, beta2=0.95, adam_eps=1e-8)
    cfg = dataclasses.replace(TR.SMOKE_MODEL, n_layers=1, vocab=64, hidden=32, head_dim=8, expert_ffn=16)
    p = M.init_weights(cfg, 0)
    state = TR.init_state(p)
    leaves_p, tree = jax.tree_util.tree_flatten(p)
    m = [np.zeros(a.shape) for a in leaves_p]
    v = [np.zeros(a.shape) for a in leaves_p]
    ref = [np.asarray(a, np.float64) for a in leaves_p]
    update = jax.jit(TR.adamw, static_argnums=3)
    for t in range(1, 4):
        grads = [rng.standard_normal(a.shape) for a in leaves_p]
        lr = 1e-2 / t
        state = update(state, jax.tree_util.tree_unflatten(tree, [jnp.asarray(g, jnp.float32) for g in grads]),
                         jnp.float32(lr), tcfg)
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.95 * v[i] + 0.05 * g * g
            mh, vh = m[i] / (1 - 0.9 ** t), v[i] / (1 - 0.95 ** t)
            wd = 0.1 if ref[i].ndim >= 2 else 0.0
            ref[i] = ref[i] - lr * (mh / (np.sqrt(vh) + 1e-8) + wd * ref[i])
    for got, want in zip(jax.tree_util.tree_leaves(state.params), ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert int(state.step) == 3


def test_load_balance_loss_against_brute_force():
    rng = np.random.default_rng(1)
    B, T, L, E, k = 2, 5, 3, 6, 2
    logits = rng.standard_normal((B, T, L, E))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ids = np.argsort(-probs, -1)[..., :k]
    r = M.Routing(ids=jnp.asarray(ids), gates=jnp.zeros((B, T, L, k)), predicted=jnp.asarray(ids),
                  predicted_post_attn=jnp.asarray(ids), probs=jnp.asarray(probs, jnp.float32))
    want = 0.0
    for l in range(L):
        f = np.array([(ids[:, :, l] == e).sum() for e in range(E)]) / (B * T * k)
        P = probs[:, :, l].reshape(-1, E).mean(0)
        want += E * (f * P).sum() / L
    assert float(TR.load_balance_loss(r, E)) == pytest.approx(want, rel=1e-5)
    # perfectly balanced: each token picks experts (2t, 2t+1) mod E with uniform probs -> exactly 1
    ids_bal = np.stack([np.arange(6) * 2 % E, (np.arange(6) * 2 + 1) % E], -1)[None, :, None, :]
    r_bal = dataclasses.replace(r, ids=jnp.asarray(ids_bal), probs=jnp.full((1, 6, 1, E), 1 / E))
    assert float(TR.load_balance_loss(r_bal, E)) == pytest.approx(1.0, rel=1e-6)


def test_schedule_and_windows():
    tcfg = TR.TrainConfig(lr=1e-3, warmup_steps=10, min_lr_frac=0.1)
    lr = [float(TR.lr_at(jnp.int32(s), jnp.float32(110), tcfg)) for s in (0, 9, 10, 60, 110, 200)]
    assert lr[0] == pytest.approx(1e-4) and lr[1] == pytest.approx(1e-3) and lr[2] == pytest.approx(1e-3)
    assert lr[3] == pytest.approx(1e-4 + 0.9e-3 * 0.5) and lr[4] == pytest.approx(1e-4) and lr[5] == pytest.approx(1e-4)
    w = TR.windows(1000, 100)
    assert w.tolist() == list(range(0, 900, 100))  # last window 800..900 inclusive = 101 tokens
    assert TR.windows(100, 100).size == 0 and TR.windows(101, 100).tolist() == [0]


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        TR.main(["--smoke", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err
    data = _corpus(tmp_path / "c", n_train=2000, n_eval=500)
    np.array([5, 9000, 7], "<u2").tofile(data / "eval.bin")
    with pytest.raises(SystemExit) as ei:
        TR.main(["--smoke", "--data", str(data), "--out", str(tmp_path / "out")])
    assert ei.value.code == 2 and "9000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
