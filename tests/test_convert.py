"""Importers (`python -m sim.convert`): round trips from known arrays, the real Qwen3 CSV, every error."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.convert import expert_format_from_bytes, topk_from_logits
from sim.trace import ABSENT, load_trace

ROOT = Path(__file__).resolve().parents[1]


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim.convert", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=120)


def known_arrays(seed: int, S: int, L: int, K: int, E: int) -> dict:
    """Two sequences (turns), prefill then decode each; ids distinct per group; float32 weights summing to 1."""
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(S)])
    w = rng.random((S, L, K)) + 0.05
    w = -np.sort(-w, axis=2)
    w = (w / w.sum(axis=2, keepdims=True)).astype(np.float32)
    seq = np.repeat([0, 1], [S // 2, S - S // 2])
    phase = np.zeros(S, int)
    for s in (0, 1):
        idx = np.flatnonzero(seq == s)
        phase[idx[3:]] = 1  # 3 prefill steps per sequence
    absent = np.zeros((S, L), bool)
    absent[seq == 0, L - 1] = phase[seq == 0] == 0  # llama.cpp-like: last layer skipped for prefill...
    absent[np.flatnonzero(seq == 0)[2], L - 1] = False  # ...except the last prefill token
    absent[S - 1, 1] = True
    ids[absent] = ABSENT
    w[absent] = 0
    return {"experts": ids, "weights": w, "phase": phase, "seq": seq, "absent": absent}


# ------------------------------------------------------------------------------------------- CSV
QWEN_BYTES = {0: 3059712, 1: 2654208}


def write_route_csv(path: Path, a: dict, L: int, K: int, E: int, model: str, layer_header: bool = True) -> None:
    """A route CSV in llama.cpp's layout: prefill rows layer-major per turn, decode rows step-major."""
    lines = ["# route_trace v1",
             f"# model=/models/{model}.gguf arch=qwen3moe n_layer={L} n_expert={E} n_expert_used={K}"]
    if layer_header:
        for l in range(L):
            lines.append(f"# layer={l} expert_bytes={QWEN_BYTES[l % 2]} dense_bytes={1000 + l}")
    lines.append("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes")
    S = len(a["seq"])
    pos = np.zeros(S, int)
    for s in range(1, S):
        pos[s] = 0 if a["seq"][s] != a["seq"][s - 1] else pos[s - 1] + 10  # token positions restart per turn

    def row(s, l):
        if a["absent"][s, l]:
            return
        for k in range(K):
            lines.append(f"{a['seq'][s]},{a['phase'][s]},{pos[s]},{l},{k},{a['experts'][s, l, k]},"
                         f"{float(a['weights'][s, l, k])!r},{(s + k) % 2},0")

    for t in (0, 1):
        pre = [s for s in range(S) if a["seq"][s] == t and a["phase"][s] == 0]
        for l in range(L):  # batched prefill: layer-major
            for s in pre:
                row(s, l)
        for s in (s for s in range(S) if a["seq"][s] == t and a["phase"][s] == 1):
            for l in range(L):
                row(s, l)
    path.write_text("\n".join(lines) + "\n")


def assert_matches(t, a: dict) -> None:
    """Trace arrays equal the known arrays exactly."""
    np.testing.assert_array_equal(t.experts, a["experts"].astype(np.int16))
    np.testing.assert_array_equal(t.weights, a["weights"])
    np.testing.assert_array_equal(t.phase, a["phase"])
    np.testing.assert_array_equal(t.seq, a["seq"])
    np.testing.assert_array_equal(~t.present, a["absent"])


def test_csv_round_trip(tmp_path):
    S, L, K, E = 14, 4, 3, 16
    a = known_arrays(0, S, L, K, E)
    src, out = tmp_path / "run.route.csv", tmp_path / "run.npz"
    write_route_csv(src, a, L, K, E, "Qwen3-30B-A3B-Q4_K_M")
    r = run_convert(src, "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and f"{S} steps (6 prefill, 8 decode) in 2 sequences" in r.stdout
    t = load_trace(out)
    assert_matches(t, a)
    m = t.meta
    assert (m.model, m.n_layers, m.n_experts, m.top_k) == ("Qwen3-30B-A3B-Q4_K_M", L, E, K)
    assert m.expert_weights == 3 * 2048 * 768
    assert m.expert_bytes == tuple(QWEN_BYTES[l % 2] for l in range(L))
    assert m.dense_bytes == tuple(1000 + l for l in range(L))
    assert m.expert_format == tuple("q4_k+q6_k_down" if l % 2 == 0 else "q4_k" for l in range(L))
    assert m.provenance.startswith("run.route.csv: model=/models/Qwen3-30B-A3B-Q4_K_M.gguf")


def test_csv_unknown_model_and_renormalize(tmp_path):
    S, L, K, E = 10, 3, 2, 8
    a = known_arrays(1, S, L, K, E)
    scaled = dict(a, weights=(a["weights"] * 3).astype(np.float32))
    src = tmp_path / "other.csv"
    write_route_csv(src, scaled, L, K, E, "Mixtral-8x7B", layer_header=False)
    r = run_convert(src, "-o", tmp_path / "x.npz")
    assert r.returncode == 2 and "weights sum to" in r.stderr and not (tmp_path / "x.npz").exists()
    r = run_convert(src, "-o", tmp_path / "x.npz", "--renormalize")
    assert r.returncode == 0, r.stderr
    t = load_trace(tmp_path / "x.npz")
    w64 = scaled["weights"].astype(np.float64)
    s = w64.sum(axis=2, keepdims=True)
    ref = np.divide(w64, s, out=np.zeros_like(w64), where=s > 0).astype(np.float32)
    np.testing.assert_allclose(t.weights, ref, rtol=1e-7, atol=0)
    np.testing.assert_array_equal(t.experts, a["experts"].astype(np.int16))
    assert t.meta.model == "Mixtral-8x7B" and t.meta.expert_bytes is None and t.meta.expert_format is None
    assert t.meta.expert_weights is None


def test_expert_format_from_bytes():
    w = 3 * 2048 * 768  # bytes below: the architecture document's table
    assert expert_format_from_bytes(2_654_208, w) == "q4_k"
    assert expert_format_from_bytes(3_059_712, w) == "q4_k+q6_k_down"
    assert expert_format_from_bytes(2_027_520, w) == "q3_k"
    assert expert_format_from_bytes(1_548_288, w) == "q2_k"
    assert expert_format_from_bytes(1_234_567, w) is None


def test_shared_qwen_csv(tmp_path, shared_qwen_csv):
    out = tmp_path / "qwen.npz"
    r = run_convert(shared_qwen_csv, "-o", out)
    assert r.returncode == 0, r.stderr
    t = load_trace(out)
    # independent reading with pandas
    df = pd.read_csv(shared_qwen_csv, comment="#")
    hdr = [ln for ln in shared_qwen_csv.read_text().splitlines() if ln.startswith("#")]
    layer_hdr = {int(m[1]): (int(m[2]), int(m[3])) for m in
                 (re.match(r"# layer=(\d+) expert_bytes=(\d+) dense_bytes=(\d+)", h) for h in hdr) if m}
    assert (t.n_steps, t.meta.n_layers, t.meta.top_k, t.meta.n_experts) == (156, 48, 6, 128)
    assert int((t.phase == 1).sum()) == 128 and int((t.phase == 0).sum()) == 28
    steps = list(dict.fromkeys(zip(df.turn, df.step)))  # order of first appearance
    assert steps == [(0, s) for s in range(156)]
    index = {k: i for i, k in enumerate(steps)}
    si = np.array([index[k] for k in zip(df.turn, df.step)])
    # every CSV row lands at (step, layer, slot) with its expert id and weight
    np.testing.assert_array_equal(t.experts[si, df.layer, df.slot], df.expert)
    np.testing.assert_array_equal(t.weights[si, df.layer, df.slot], df.weight.to_numpy().astype(np.float32))
    phase_of_step = df.groupby(si).phase.first()
    np.testing.assert_array_equal(t.phase, phase_of_step.sort_index().to_numpy())
    # absent groups are exactly the (step, layer) pairs without rows; each present group has 6 rows
    rows_per_group = df.groupby([si, df.layer]).size()
    assert (rows_per_group == 6).all()
    have = set(rows_per_group.index)
    absent = {(s, l) for s in range(156) for l in range(48) if (s, l) not in have}
    assert absent == {(s, 47) for s in range(27)}
    assert set(map(tuple, np.argwhere(~t.present).tolist())) == absent
    assert (t.experts[~t.present] == -1).all() and (t.weights[~t.present] == 0).all()
    assert t.meta.expert_bytes == tuple(layer_hdr[l][0] for l in range(48))
    assert t.meta.dense_bytes == tuple(layer_hdr[l][1] for l in range(48))
    assert t.meta.expert_format == tuple({3059712: "q4_k+q6_k_down", 2654208: "q4_k"}[layer_hdr[l][0]]
                                         for l in range(48))
    assert t.meta.expert_weights == 4_718_592
    assert t.meta.provenance == ("qwen.route.csv: model=/data/local/tmp/shardllm/Qwen3-30B-A3B-Q4_K_M.gguf "
                                 "arch=qwen3moe n_layer=48 n_expert=128 n_expert_used=6")
    assert "44,766 accesses" in r.stdout and len(df) == 44_766


# ----------------------------------------------------------------------------------------- JSONL
def write_jsonl(path: Path, a: dict, meta: dict | None, predicted: np.ndarray | None, seed: int) -> None:
    """One record per present (token, layer), layers shuffled within a step; phase as word or int."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"meta": meta})] if meta is not None else []
    S, L, _ = a["experts"].shape
    pos = np.arange(S) * 7
    for s in range(S):
        for l in rng.permutation(L):
            if a["absent"][s, l]:
                continue
            rec = {"seq": int(a["seq"][s]), "token": int(pos[s]), "layer": int(l),
                   "phase": ["prefill", "decode"][a["phase"][s]] if (s + l) % 2 else int(a["phase"][s]),
                   "experts": a["experts"][s, l].tolist(), "weights": [float(x) for x in a["weights"][s, l]]}
            if predicted is not None:
                rec["predicted"] = predicted[s, l].tolist()
            lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")


def test_jsonl_round_trip_with_meta_and_predictions(tmp_path):
    S, L, K, E = 12, 4, 3, 20
    a = known_arrays(2, S, L, K, E)
    pred = np.random.default_rng(3).integers(-1, E, (S, L, K))
    pred[a["absent"]] = ABSENT
    meta = {"model": "toy", "n_layers": L, "n_experts": E, "top_k": K, "extra": {"prompt": "hi"}}
    src = tmp_path / "r.jsonl"
    write_jsonl(src, a, meta, pred, seed=4)
    r = run_convert(src, "-o", tmp_path / "r.npz")
    assert r.returncode == 0, r.stderr
    t = load_trace(tmp_path / "r.npz")
    assert_matches(t, a)
    np.testing.assert_array_equal(t.predicted, pred)
    assert (t.meta.model, t.meta.n_experts, t.meta.extra, t.meta.provenance) == ("toy", E, {"prompt": "hi"}, "r.jsonl")


def test_jsonl_without_meta_line(tmp_path):
    S, L, K, E = 8, 3, 2, 6
    a = known_arrays(5, S, L, K, E)
    src = tmp_path / "plain.jsonl"
    write_jsonl(src, a, None, None, seed=6)
    r = run_convert(src, "-o", tmp_path / "p.npz")
    assert r.returncode == 2 and "--n-experts" in r.stderr
    r = run_convert(src, "-o", tmp_path / "p.npz", "--n-experts", E, "--model", "mine")
    assert r.returncode == 0, r.stderr
    t = load_trace(tmp_path / "p.npz")
    assert_matches(t, a)
    assert t.predicted is None and t.meta.model == "mine" and t.meta.n_layers == L


# ---------------------------------------------------------------------------------------- logits
def torch_reference(logits: np.ndarray, k: int, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """transformers' Qwen3-MoE router, in float64: softmax, topk, optional renormalisation."""
    torch = pytest.importorskip("torch")
    p = torch.softmax(torch.from_numpy(logits.astype(np.float64)), dim=-1)
    w, i = torch.topk(p, k, dim=-1)
    if norm:
        w = w / w.sum(dim=-1, keepdim=True)
    return i.numpy(), w.numpy()


@pytest.mark.parametrize("norm", [True, False])
def test_topk_from_logits_matches_torch(norm):
    logits = np.random.default_rng(7).normal(size=(3, 50, 32)) * 3
    ids, w = topk_from_logits(logits, 5, norm)
    ri, rw = torch_reference(logits, 5, norm)
    np.testing.assert_array_equal(ids, ri)
    np.testing.assert_allclose(w, rw, rtol=1e-12)


def test_logits_round_trip_per_layer_keys(tmp_path):
    L, T, E, K = 3, 20, 16, 4
    logits = np.random.default_rng(8).normal(size=(L, T, E)).astype(np.float32)
    seq = np.repeat([5, 9], [12, 8])
    phase = np.array(["prefill"] * 6 + ["decode"] * 6 + ["prefill"] * 3 + ["decode"] * 5)
    src = tmp_path / "dump.npz"
    np.savez(src, **{f"layer_{l}": logits[l] for l in range(L)}, seq=seq, phase=phase)
    r = run_convert(src, "-o", tmp_path / "t.npz", "--top-k", K, "--model", "tiny")
    assert r.returncode == 0, r.stderr
    t = load_trace(tmp_path / "t.npz")
    ri, rw = torch_reference(logits, K, True)
    np.testing.assert_array_equal(t.experts, ri.transpose(1, 0, 2))
    np.testing.assert_array_equal(t.weights, rw.transpose(1, 0, 2).astype(np.float32))
    np.testing.assert_array_equal(t.seq, seq)
    np.testing.assert_array_equal(t.phase, (phase == "decode").astype(int))
    assert (t.meta.model, t.meta.n_layers, t.meta.n_experts, t.meta.top_k) == ("tiny", L, E, K)
    assert t.meta.extra["norm_topk"] is True


def test_logits_router_logits_key_no_norm(tmp_path):
    L, T, E, K = 2, 9, 8, 2
    logits = np.random.default_rng(9).normal(size=(L, T, E))
    src = tmp_path / "rl.npz"
    np.savez(src, router_logits=logits, top_k=np.array(K), model=np.array("qwen2-moe-toy"))
    r = run_convert(src, "-o", tmp_path / "t.npz", "--no-norm-topk")
    assert r.returncode == 0, r.stderr
    t = load_trace(tmp_path / "t.npz")
    ri, rw = torch_reference(logits, K, False)
    np.testing.assert_array_equal(t.experts, ri.transpose(1, 0, 2))
    np.testing.assert_array_equal(t.weights, rw.transpose(1, 0, 2).astype(np.float32))
    assert (t.phase == 0).all() and (t.seq == 0).all()  # defaults: one sequence, prefill
    assert t.meta.model == "qwen2-moe-toy" and t.meta.extra["norm_topk"] is False
    assert (t.weights.sum(axis=2) < 1).all()


def test_logits_from_transformers_qwen3_moe(tmp_path):
    """Router logits as transformers returns them select the experts its own router selected."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((out[1].detach(), out[2].detach())))
             for m in model.modules() if isinstance(m, mq.Qwen3MoeTopKRouter)]
    ids = torch.randint(0, 64, (2, 7))  # batch 2 → tokens flattened batch-major
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    for h in hooks:
        h.remove()
    logits = [x.float().numpy() for x in out.router_logits]
    assert len(logits) == 3 and logits[0].shape == (14, 16)
    src = tmp_path / "hf.npz"
    np.savez(src, **{f"layer_{l}": x for l, x in enumerate(logits)}, seq=np.repeat([0, 1], 7))
    r = run_convert(src, "-o", tmp_path / "hf_trace.npz", "--top-k", 4)
    assert r.returncode == 0, r.stderr
    t = load_trace(tmp_path / "hf_trace.npz")
    hf_ids = np.stack([s[1].numpy() for s in seen], axis=1)  # [tokens, layers, k]
    hf_w = np.stack([s[0].float().numpy() for s in seen], axis=1)
    np.testing.assert_array_equal(t.experts, hf_ids)
    np.testing.assert_allclose(t.weights, hf_w, rtol=1e-5)


# ---------------------------------------------------------------------------------------- errors
GOOD_CSV = """# route_trace v1
# model=/m/toy.gguf arch=qwen3moe n_layer=2 n_expert=8 n_expert_used=2
turn,phase,step,layer,slot,expert,weight
0,0,0,0,0,3,0.6
0,0,0,0,1,5,0.4
0,0,0,1,0,1,0.7
0,0,0,1,1,2,0.3
0,1,1,0,0,4,0.5
0,1,1,0,1,6,0.5
0,1,1,1,0,7,0.9
0,1,1,1,1,0,0.1
"""
HDR = "\n".join(GOOD_CSV.splitlines()[:3]) + "\n"


def jl(*recs, meta=None) -> str:
    lines = ([json.dumps({"meta": meta})] if meta else []) + [r if isinstance(r, str) else json.dumps(r) for r in recs]
    return "\n".join(lines) + "\n"


def rec(seq=0, token=0, layer=0, phase="prefill", experts=(1, 2), weights=(0.5, 0.5), **kw) -> dict:
    return {"seq": seq, "token": token, "layer": layer, "phase": phase, "experts": list(experts),
            "weights": list(weights), **kw}


M = {"model": "toy", "n_experts": 8, "n_layers": 2}


def logits_npz(**arrays):
    def write(p: Path):
        np.savez(p, **arrays)
    return write


_lg = np.zeros((2, 3, 8), np.float32)
ERROR_CASES = [
    # (name, source name, content (str or writer), extra args, expected text)
    ("csv ok control", "a.csv", GOOD_CSV, [], None),
    ("csv no column header", "a.csv", "# model=x n_layer=2 n_expert=8 n_expert_used=2\n", [], "no CSV column header"),
    ("csv header lacks n_expert_used", "a.csv", GOOD_CSV.replace(" n_expert_used=2", ""), [], "header lacks n_expert_used="),
    ("csv columns lack weight", "a.csv", GOOD_CSV.replace(",weight", ""), [], "column header lacks weight"),
    ("csv wrong field count", "a.csv", GOOD_CSV + "0,1,2,0,0\n", [], "line 12: 5 fields"),
    ("csv non-integer", "a.csv", GOOD_CSV.replace("0,0,0,0,1,5,0.4", "0,0,0,0,1,five,0.4"), [], "line 5: expert 'five' is not an integer"),
    ("csv bad weight", "a.csv", GOOD_CSV.replace("0,0,0,0,1,5,0.4", "0,0,0,0,1,5,heavy"), [], "line 5: weight 'heavy'"),
    ("csv phase 2", "a.csv", GOOD_CSV.replace("0,1,1,0,0,4,0.5", "0,2,1,0,0,4,0.5"), [], "line 8: phase 2"),
    ("csv phase differs in a step", "a.csv", GOOD_CSV.replace("0,1,1,0,0,4,0.5", "0,0,1,0,0,4,0.5"), [], "phase differs"),
    ("csv layer out of range", "a.csv", GOOD_CSV.replace("0,1,1,1,1,0,0.1", "0,1,1,2,1,0,0.1"), [], "line 11: layer 2 outside [0, 2)"),
    ("csv slot out of range", "a.csv", GOOD_CSV.replace("0,1,1,1,1,0,0.1", "0,1,1,1,2,0,0.1"), [], "line 11: slot 2 outside [0, 2)"),
    ("csv expert out of range", "a.csv", GOOD_CSV.replace("0,1,1,1,1,0,0.1", "0,1,1,1,1,8,0.1"), [], "line 11: expert id 8 outside [0, 8)"),
    ("csv duplicate row", "a.csv", GOOD_CSV + "0,1,1,1,1,5,0.1\n", [], "line 12: duplicate row for turn 0 step 1 layer 1 slot 1"),
    ("csv partial group", "a.csv", GOOD_CSV.replace("0,1,1,1,1,0,0.1\n", ""), [], "rows for only 1 of 2 slots"),
    ("csv sum not 1", "a.csv", GOOD_CSV.replace("0,1,1,1,1,0,0.1", "0,1,1,1,1,0,0.2"), [], "step 1 layer 1: weights sum to 1.1"),
    ("csv repeated id", "a.csv", GOOD_CSV.replace("0,1,1,1,1,0,0.1", "0,1,1,1,1,7,0.1"), [], "step 1 layer 1: expert id repeated"),
    ("csv negative weight", "a.csv", GOOD_CSV.replace("0,1,1,1,0,7,0.9\n0,1,1,1,1,0,0.1", "0,1,1,1,0,7,1.1\n0,1,1,1,1,0,-0.1"), [], "negative weight"),
    ("csv no rows", "a.csv", HDR, [], "empty trace: no data rows"),
    ("csv turn not contiguous", "a.csv", HDR + "0,0,0,0,0,3,0.6\n0,0,0,0,1,5,0.4\n1,0,0,0,0,3,0.6\n1,0,0,0,1,5,0.4\n"
     "0,1,5,0,0,3,0.6\n0,1,5,0,1,5,0.4\n", [], "sequence 0's steps are not contiguous (runs start at steps 0 and 2)"),
    ("csv partial layer header", "a.csv", GOOD_CSV.replace("turn,", "# layer=0 expert_bytes=5 dense_bytes=6\nturn,"), [], "lacks layer 1"),
    ("csv --top-k does not apply", "a.csv", GOOD_CSV, ["--top-k", "2"], "--top-k does not apply to csv"),
    ("jsonl ok control", "b.jsonl", jl(rec(), rec(layer=1), meta=M), [], None),
    ("jsonl invalid JSON", "b.jsonl", jl(rec(), "{\"seq\": 0,", meta=M), [], "line 3: not valid JSON"),
    ("jsonl not an object", "b.jsonl", jl("[1, 2]", meta=M), [], "line 2: expected a JSON object"),
    ("jsonl meta not first", "b.jsonl", jl(rec(), {"meta": M}), ["--n-experts", "8"], "must be alone on the first line"),
    ("jsonl lacks weights", "b.jsonl", jl({"seq": 0, "token": 0, "layer": 0, "phase": 0, "experts": [1, 2]}, meta=M), [], "line 2: record lacks weights"),
    ("jsonl no n_experts", "b.jsonl", jl(rec()), [], "n_experts unknown"),
    ("jsonl bad phase", "b.jsonl", jl(rec(phase="warmup"), meta=M), [], "line 2: phase 'warmup'"),
    ("jsonl token not int", "b.jsonl", jl(rec(token=1.5), meta=M), [], "line 2: token must be an integer"),
    ("jsonl lengths differ", "b.jsonl", jl(rec(weights=[1.0]), meta=M), [], "lengths 2/1/-"),
    ("jsonl k changes", "b.jsonl", jl(rec(), rec(layer=1, experts=[1, 2, 3], weights=[.2, .3, .5]), meta=M), [], "line 3: experts/weights/predicted have lengths 3/3/-"),
    ("jsonl meta top_k mismatch", "b.jsonl", jl(rec(), meta=dict(M, top_k=3)), [], "meta.top_k=3"),
    ("jsonl meta unknown field", "b.jsonl", jl(rec(), meta=dict(M, colour=1)), [], "unknown meta field 'colour'"),
    ("jsonl layer out of range", "b.jsonl", jl(rec(layer=2), meta=M), [], "line 2: layer 2 outside [0, 2)"),
    ("jsonl duplicate record", "b.jsonl", jl(rec(), rec(), meta=M), [], "line 3: duplicate record for seq 0 token 0 layer 0"),
    ("jsonl phase differs", "b.jsonl", jl(rec(), rec(layer=1, phase="decode"), meta=M), [], "line 3: seq 0 token 0: phase differs"),
    ("jsonl id out of range", "b.jsonl", jl(rec(experts=[1, 8]), meta=M), [], "line 2: expert id 8 outside [0, 8)"),
    ("jsonl absent mixed", "b.jsonl", jl(rec(experts=[-1, 3]), meta=M), [], "ABSENT ids (-1) mixed"),
    ("jsonl absent with weights", "b.jsonl", jl(rec(), rec(token=1, experts=[-1, -1]), meta=M), [], "absent group has nonzero weights"),
    ("jsonl repeated id", "b.jsonl", jl(rec(experts=[4, 4]), meta=M), [], "expert id repeated"),
    ("jsonl NaN weight", "b.jsonl", jl(rec(weights=[float("nan"), 0.5]), meta=M), [], "weight is nan"),
    ("jsonl inf weight", "b.jsonl", jl(rec(weights=[float("inf"), 0.5]), meta=M), [], "weight is inf"),
    ("jsonl negative weight", "b.jsonl", jl(rec(weights=[1.5, -0.5]), meta=M), [], "negative weight"),
    ("jsonl sum not 1", "b.jsonl", jl(rec(weights=[0.5, 0.4]), meta=M), [], "weights sum to 0.9"),
    ("jsonl all absent", "b.jsonl", jl(rec(experts=[-1, -1], weights=[0, 0]), meta=M), [], "no present group"),
    ("jsonl no records", "b.jsonl", jl(meta=M), [], "empty trace: no records"),
    ("jsonl seq not contiguous", "b.jsonl", jl(rec(), rec(seq=1), rec(seq=0, token=1), meta=M), [], "sequence 0's steps are not contiguous"),
    ("jsonl predicted out of range", "b.jsonl", jl(rec(predicted=[0, 9]), meta=M), [], "line 2: predicted id 9 outside"),
    ("jsonl model has no n_layers but layer gap ok", "b.jsonl", jl(rec(layer=1), meta={"model": "x", "n_experts": 8}), [], None),
    ("logits ok control", "c.npz", logits_npz(router_logits=_lg), ["--top-k", "2"], None),
    ("logits not npz", "c.npz", "hello", ["--top-k", "2"], "not an npz of router logits"),
    ("logits none", "c.npz", logits_npz(seq=np.zeros(3)), ["--top-k", "2"], "no router logits"),
    ("logits unknown key", "c.npz", logits_npz(router_logits=_lg, tokens=np.zeros(3)), ["--top-k", "2"], "unknown key(s) tokens"),
    ("logits layer gap", "c.npz", logits_npz(layer_0=_lg[0], layer_2=_lg[1]), ["--top-k", "2"], "layer_1 is missing"),
    ("logits layer shapes", "c.npz", logits_npz(layer_0=_lg[0], layer_1=_lg[1, :2]), ["--top-k", "2"], "of one shape"),
    ("logits both forms", "c.npz", logits_npz(layer_0=_lg[0], router_logits=_lg), ["--top-k", "2"], "keep one"),
    ("logits 2-D router_logits", "c.npz", logits_npz(router_logits=_lg[0]), ["--top-k", "2"], "must be [layers, tokens, n_experts]"),
    ("logits integer dtype", "c.npz", logits_npz(router_logits=_lg.astype(int)), ["--top-k", "2"], "must be floating-point"),
    ("logits NaN", "c.npz", logits_npz(router_logits=np.where(np.arange(8) == 5, np.nan, _lg)), ["--top-k", "2"], "layer 0 token 0 expert 5: logit is nan"),
    ("logits no tokens", "c.npz", logits_npz(router_logits=_lg[:, :0]), ["--top-k", "2"], "no tokens"),
    ("logits no top_k", "c.npz", logits_npz(router_logits=_lg), [], "top_k unknown"),
    ("logits top_k too big", "c.npz", logits_npz(router_logits=_lg), ["--top-k", "9"], "top_k=9 outside [1, n_experts=8]"),
    ("logits seq shape", "c.npz", logits_npz(router_logits=_lg, seq=np.zeros(4, int)), ["--top-k", "2"], "seq must be an integer array [tokens=3]"),
    ("logits phase value", "c.npz", logits_npz(router_logits=_lg, phase=np.array([0, 1, 3])), ["--top-k", "2"], "step 2: phase 3"),
    ("logits phase word", "c.npz", logits_npz(router_logits=_lg, phase=np.array(["prefill", "x", "decode"])), ["--top-k", "2"], "token 1: phase 'x'"),
    ("logits seq not contiguous", "c.npz", logits_npz(router_logits=_lg, seq=np.array([0, 1, 0])), ["--top-k", "2"], "sequence 0's steps are not contiguous"),
    ("logits --renormalize does not apply", "c.npz", logits_npz(router_logits=_lg), ["--top-k", "2", "--renormalize"], "--renormalize does not apply to logits"),
    ("unknown extension", "d.txt", GOOD_CSV, [], "cannot tell the source format from extension '.txt'"),
    ("--from overrides extension", "d.txt", GOOD_CSV, ["--from", "csv"], None),
    ("missing source", None, None, [], "no such file"),
]


@pytest.mark.parametrize("name,fname,content,args,expected", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_convert_cli_errors(tmp_path, name, fname, content, args, expected):
    src = tmp_path / (fname or "absent.csv")
    if callable(content):
        content(src)
    elif content is not None:
        src.write_text(content)
    out = tmp_path / "out" / "trace.npz"
    out.parent.mkdir()  # the converter never creates a missing output folder (test_convert_output_folder_must_exist)
    r = run_convert(src, "-o", out, *args)
    if expected is None:  # a control case: the same source, well-formed, converts
        assert r.returncode == 0, r.stderr
        assert out.exists() and r.stdout.startswith(f"wrote {out}: ")
        load_trace(out)
        return
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {src}: ") and expected in lines[0], lines[0]
    assert not out.exists() and r.stdout == ""
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_convert_refuses_to_overwrite_source(tmp_path):
    src = tmp_path / "logits.npz"
    np.savez(src, router_logits=_lg)
    before = src.read_bytes()
    r = run_convert(src, "-o", src, "--top-k", "2")
    assert r.returncode == 2 and "output path is the source file" in r.stderr
    assert src.read_bytes() == before


def test_help_has_examples():
    r = run_convert("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--n-experts" in r.stdout
