"""Inputs users get wrong (issue 11 §3): each is one stderr line, exit status 2 and no output file;
plus the budget parser, the residency check against the shared engine trace, and the default
comparison `python -m sim.replay TRACE` prints (issue 11 §5)."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from sim import convert, replay, residency
from sim.budget import BYTES, COUNT, DERIVED, FRACTION, native_mean_bytes, parse_budget, parse_budget_sweep
from sim.io import InputError
from sim.profiles import get_model, load_hardware, model_for_trace
from sim.simulate import ReplayConfig, run
from sim.trace import TraceMeta, load_trace, save_trace
from tests.test_engine import random_trace

# A two-layer MoE of 4 experts, top-2, experts of 3 × 256 × 256 weights: layer 0 stores gate/up in
# Q4_K and ffn_down in Q6_K (llama.cpp's Q4_K_M), layer 1 everything in Q4_K.
W = 3 * 256 * 256
Q4K_Q6K = 2 * (W // 3) // 256 * 144 + (W // 3) // 256 * 210
Q4K = W // 256 * 144


def _route_csv(model: str, arch: str, expert_bytes=(Q4K_Q6K, Q4K)) -> str:
    lines = ["# route_trace v1",
             f"# model=/models/{model}.gguf arch={arch} n_layer=2 n_expert=4 n_expert_used=2"]
    lines += [f"# layer={i} expert_bytes={b} dense_bytes=4096" for i, b in enumerate(expert_bytes)]
    lines.append("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes")
    rng = np.random.default_rng(0)
    for step in range(12):
        phase = 0 if step < 2 else 1
        for layer in range(2):
            ids = rng.choice(4, size=2, replace=False)
            for slot, (e, w) in enumerate(zip(ids, (0.75, 0.25))):
                lines.append(f"0,{phase},{step},{layer},{slot},{e},{w},{int(rng.random() < 0.5)},{expert_bytes[layer]}")
    return "\n".join(lines) + "\n"


def _fails(main, argv, capsys, needle: str) -> str:
    """Run a CLI main in-process; it must exit 2 with exactly one stderr line containing `needle`."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "tiny.npz"
    save_trace(random_trace(seed=5, n_steps=40), path)
    return path


# ------------------------------------------------------------------------------- the budget parser
@pytest.mark.parametrize("text, bare, kind, value", [
    ("9GiB", BYTES, BYTES, 9 * 2**30), ("4000MiB", BYTES, BYTES, 4000 * 2**20), ("123456", BYTES, BYTES, 123456),
    ("40%", BYTES, FRACTION, 40.0), ("3300", COUNT, COUNT, 3300.0), ("vram", BYTES, DERIVED, 0.0),
    ("VRAM", COUNT, DERIVED, 0.0),
])
def test_parse_budget_kinds(text, bare, kind, value):
    b = parse_budget(text, bare=bare)
    assert (b.kind, b.value, b.text) == (kind, value, text)


@pytest.mark.parametrize("text, bare, needle", [
    ("150%", COUNT, "(0, 100]"), ("0%", COUNT, "(0, 100]"), ("-3", COUNT, "cannot parse"), ("0", COUNT, "> 0"),
    ("lots", COUNT, "cannot parse"), ("nine gigs", BYTES, "byte size"), ("0GiB", BYTES, "> 0 bytes"),
])
def test_parse_budget_rejects(text, bare, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_budget(text, bare=bare, option="--experts")


def test_budget_resolves_against_the_model():
    model, hw = get_model("qwen3-30b-a3b"), load_hardware("rtx3060-12gb")
    total = model.total_expert_bytes()
    assert parse_budget("30%").resolve(model, hw, 4096) == int(30 / 100 * total)
    mean = np.mean([model.expert_bytes(la) for la in range(model.n_layers)])
    assert native_mean_bytes(model) == mean
    assert parse_budget("100", bare=COUNT).resolve(model, hw, 4096) == int(100 * mean)
    derived = parse_budget("vram").resolve(model, hw, 4096)
    assert 0 < derived < total
    # the derived budget shrinks by exactly the KV cache of the extra context
    assert derived - parse_budget("vram").resolve(model, hw, 8192) == model.kv_bytes_per_token * 4096
    assert [b.kind for b in parse_budget_sweep("10%:50%:20%")] == [FRACTION] * 3
    assert [b.kind for b in parse_budget_sweep("1GiB:3GiB:1GiB")] == [BYTES] * 3


# ------------------------------------------------------------------- non-Qwen route CSV conversion
def test_gemma_style_csv_converts_and_replays_natively(tmp_path, capsys):
    src, out = tmp_path / "gemma.route.csv", tmp_path / "g.npz"
    src.write_text(_route_csv("gemma-4-26b-a4b-it-Q4_K_M", "gemma4"))
    convert.main([str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert f"weights per expert {W} inferred" in err and "Q4_K_M" in err
    trace = load_trace(out)
    assert trace.meta.expert_weights == W
    assert trace.meta.expert_format == ("q4_k+q6_k_down", "q4_k")
    assert trace.meta.expert_bytes == (Q4K_Q6K, Q4K)
    recs = replay.main([str(out), "-q", "--precision", "native,static:mass:50%:q2_k", "--no-timeline"])
    assert [r.precision for r in recs] == ["native", "static:mass:50%:q2_k"]
    # the Q2_K size follows from the inferred weights: W / 256 × 84 bytes per demoted expert
    low = next(r for r in recs if r.precision != "native")
    assert low.low_precision_mass > 0

    assert model_for_trace(trace.meta).expert_bytes(0, "q2_k") == W // 256 * 84


def test_gpt_oss_style_csv_says_what_it_could_not_infer(tmp_path, capsys):
    src, out = tmp_path / "oss.route.csv", tmp_path / "o.npz"
    src.write_text(_route_csv("gpt-oss-20b-mxfp4", "gpt-oss", expert_bytes=(100_001, 100_001)))
    convert.main([str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert "weights per expert not inferred" in err and "--expert-weights" in err
    line = _fails(replay.main, [out, "-q"], capsys, "lacks expert_weights")
    assert "expert_bytes" not in line.split("lacks")[1]  # it has them: only the weights are missing
    assert "--expert-weights" in line


def test_expert_weights_must_fill_superblocks(tmp_path, capsys):
    src, out = tmp_path / "gemma.route.csv", tmp_path / "g.npz"
    src.write_text(_route_csv("gemma-4-26b-a4b-it-Q4_K_M", "gemma4"))
    _fails(convert.main, [src, "-o", out, "--expert-weights", "1000"], capsys, "multiple of 256")
    assert not out.exists()
    # a trace written before this check, with such a count, is refused by the replay in one line
    bad = tmp_path / "bad.npz"
    t = random_trace(seed=1, n_steps=20)
    meta = TraceMeta(**{**t.meta.__dict__, "expert_weights": 1000})
    save_trace(type(t).from_arrays(t.experts, t.weights, t.phase, t.seq, meta), bad)
    _fails(replay.main, [bad, "-q"], capsys, "not a multiple of 256")


# ----------------------------------------------------------------------------------- --model
def test_unknown_model_is_an_error(tiny_npz, tiny_trace, capsys):
    _fails(replay.main, [tiny_npz, "--model", "qwen9-moe", "-q"], capsys, "unknown model 'qwen9-moe'")
    _fails(replay.main, [tiny_trace, "--model", "qwen3-30b-a3b:q9_k", "-q"], capsys, "qwen3-30b-a3b:q9_k")


# ------------------------------------------------------------------------------- numeric ranges
@pytest.mark.parametrize("args, needle", [
    (["--ubatch", "0"], "--ubatch 0"), (["--ubatch=-3"], "--ubatch -3"), (["--context=-5"], "--context -5"),
    (["--experts", "150%"], "(0, 100]"), (["--budget", "1000"], "holds no expert"), (["--seed=-1"], "--seed"),
    (["--calib-fraction", "1"], "--calib-fraction"), (["--budget", "1GiB", "--experts", "10%"], "one of"),
])
def test_numeric_ranges(args, needle, tiny_trace, tmp_path, capsys):
    out = tmp_path / "o.json"
    _fails(replay.main, [tiny_trace, "-q", "--no-timeline", "--json", out, *args], capsys, needle)
    assert not out.exists()


def test_huge_context_leaves_no_budget(tiny_trace, tmp_path, capsys):
    """Qwen3-30B-A3B's KV cache at 10^6 tokens exceeds 12 GB: the derived budget is an error, not 0."""
    _fails(replay.main, [tiny_trace, "-q", "--context", "1000000"], capsys, "KV cache of 1000000 tokens")
    # with an explicit budget the context does not matter
    recs = replay.main([str(tiny_trace), "-q", "--no-timeline", "--context", "1000000", "--experts", "20%"])
    assert recs[0].capacity_fraction == pytest.approx(0.2, abs=1e-4)


# ------------------------------------------------------------------------------------ outputs
def test_output_paths_are_checked_before_the_run(tiny_trace, tmp_path, capsys):
    missing = tmp_path / "typo" / "out.json"
    line = _fails(replay.main, [tiny_trace, "--json", missing], capsys, "does not exist")
    assert "--json" in line and not missing.parent.exists()  # no silent mkdir
    # a bad --csv stops the run before anything: not even the valid --json is written
    good = tmp_path / "out.json"
    _fails(replay.main, [tiny_trace, "--json", good, "--csv", tmp_path], capsys, "is a folder")
    assert not good.exists()
    _fails(replay.main, [tiny_trace, "--json", good, "--csv", good], capsys, "same file")


def test_convert_output_folder_must_exist(tmp_path, capsys):
    src = tmp_path / "gemma.route.csv"
    src.write_text(_route_csv("gemma-4-26b-a4b-it-Q4_K_M", "gemma4"))
    _fails(convert.main, [src, "-o", tmp_path / "nope" / "t.npz"], capsys, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_sweep_out_folder_is_checked_first(tiny_trace, tmp_path, capsys):
    from analysis import sweep

    _fails(sweep.main, [tiny_trace, "--name", "x", "--quick", "--out", tmp_path / "nope", "-q"], capsys, "does not exist")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tiny_npz, tmp_path, mask, mode):
    js, cs = tmp_path / "o.json", tmp_path / "o.csv"
    old = os.umask(mask)
    try:
        replay.main([str(tiny_npz), "-q", "--no-timeline", "--policy", "lru", "--json", str(js), "--csv", str(cs)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(js.stat().st_mode) == mode and stat.S_IMODE(cs.stat().st_mode) == mode
    assert len(json.loads(js.read_text())) == 1 and len(cs.read_text().splitlines()) == 2


# ------------------------------------------------------------------------------ belady + dynamic
def test_belady_with_dynamic_is_skipped_with_a_note(tiny_npz, capsys):
    recs = replay.main([str(tiny_npz), "-q", "--no-timeline", "--policy", "lru,belady",
                        "--precision", "native,dynamic:0.6:0.9", "--experts", "30%"])
    got = [(r.policy, r.precision) for r in recs]
    assert got == [("lru", "native"), ("lru", "dynamic:0.6:0.9:q2_k"), ("belady", "native")]
    err = capsys.readouterr().err
    assert "note: skipped belady with dynamic:0.6:0.9" in err
    # the rows that ran are the library's own records of the same configurations
    lib = run(ReplayConfig(trace=str(tiny_npz), policy="belady", capacity_bytes=recs[2].capacity_bytes, timeline=False))
    assert lib == recs[2]


# ---------------------------------------------------------------------------- recorded residency
def test_importer_keeps_the_residency_column(tmp_path, capsys):
    src, out = tmp_path / "gemma.route.csv", tmp_path / "g.npz"
    src.write_text(_route_csv("gemma-4-26b-a4b-it-Q4_K_M", "gemma4"))
    convert.main([str(src), "-o", str(out)])
    trace = load_trace(out)
    import pandas as pd

    rows = pd.read_csv(src, comment="#")
    want = np.full(trace.experts.shape, -1, np.int8)
    want[rows.step, rows.layer, rows.slot] = rows.residency  # one turn: the step is the trace step
    np.testing.assert_array_equal(trace.residency, want)
    np.testing.assert_array_equal(trace.experts[rows.step, rows.layer, rows.slot], rows.expert)


def test_residency_check_reproduces_the_shared_engine(shared_qwen_csv, tmp_path, capsys):
    """README fact: a global LRU of 4000 MiB reproduces the engine's residency on every decode access."""
    out = tmp_path / "q.npz"
    convert.main([str(shared_qwen_csv), "-o", str(out)])
    capsys.readouterr()
    check = residency.main([str(out), "--budget", "4000MiB", "--policy", "lru"])
    printed = capsys.readouterr().out
    assert check.accesses == 128 * 48 * 6 and check.agree == check.accesses and check.first_disagreement is None
    assert check.recorded_hit_rate == pytest.approx(0.803, abs=5e-4)
    assert "(100.00%)" in printed and "first disagreement: none" in printed
    # a wrong budget disagrees, and the first disagreement is a real selection of the trace
    small = residency.compare_residency(load_trace(out), 3000 * 2**20)
    d = small.first_disagreement
    assert small.agreement < 1 and d is not None and d["recorded"] != d["simulated"]
    assert load_trace(out).experts[d["step"], d["layer"], d["slot"]] == d["expert"]


def test_residency_check_needs_a_recorded_residency(tiny_npz, capsys):
    _fails(residency.main, [tiny_npz, "--budget", "1MiB"], capsys, "no recorded residency")
    _fails(residency.main, [tiny_npz, "--budget", "30%"], capsys, "in bytes")


# --------------------------------------------------------------------- what a newcomer sees (§5)
def test_no_options_compares_native_with_the_low_bit_policies(tiny_trace, capsys):
    recs = replay.main([str(tiny_trace), "-q"])
    out = capsys.readouterr().out.strip().splitlines()
    assert [r.precision for r in recs] == ["native", "static:mass:30%:q3_k", "static:mass:30%:q2_k",
                                           "dynamic:0.6:0.9:q2_k"]
    assert {r.policy for r in recs} == {"slru"}
    model, hw = get_model("qwen3-30b-a3b"), load_hardware("rtx3060-12gb")
    assert {r.capacity_bytes for r in recs} == {parse_budget("vram").resolve(model, hw, 4096)}
    assert "Δ tok/s" in out[0] and "Δ MB/token" in out[0]
    assert out[-1].endswith("docs/decision.md")
    native = recs[0]
    for rec, line in zip(recs[1:], out[3:6]):
        cells = line.split()
        assert cells[-2] == f"{rec.tokens_per_s / native.tokens_per_s - 1:+.1%}"
        assert cells[-1] == f"{rec.bytes_per_token / native.bytes_per_token - 1:+.1%}"
