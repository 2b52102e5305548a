"""Model and hardware profiles, cost terms, precision-policy parsing."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from sim import cost
from sim.io import InputError
from sim.precision import demoted_experts, hobbit_scores, parse_precision
from sim.profiles import derived_expert_budget, get_model, load_hardware, parse_bytes


def test_qwen3_q4_k_m_reproduces_the_shared_trace_header(shared_qwen_csv):
    header = {}
    for line in shared_qwen_csv.read_text().splitlines():
        m = re.match(r"# layer=(\d+) expert_bytes=(\d+) dense_bytes=(\d+)", line)
        if m:
            header[int(m[1])] = (int(m[2]), int(m[3]))
    model = get_model("qwen3-30b-a3b")
    assert len(header) == model.n_layers == 48
    for layer, (expert_bytes, dense_bytes) in header.items():
        assert model.expert_bytes(layer) == expert_bytes
        assert model.dense_bytes[layer] == dense_bytes


def test_variant_sizes_follow_gguf_block_sizes():
    weights = 3 * 2048 * 768
    for variant, bytes_per_256 in [("q2_k", 84), ("q3_k", 110), ("q4_k", 144), ("bf16", 512)]:
        m = get_model(f"qwen3-30b-a3b:{variant}")
        assert m.expert_bytes(0) == weights // 256 * bytes_per_256
    mix = get_model("mixtral-8x7b")
    assert (mix.n_layers, mix.n_experts, mix.top_k) == (32, 8, 2)
    assert mix.expert_bytes(10, "q2_k") == 3 * 4096 * 14336 // 256 * 84


def test_derived_budget_is_about_3300_to_3800_qwen3_experts_on_12gb():
    model = get_model("qwen3-30b-a3b")
    budget = derived_expert_budget(model, load_hardware("rtx3060-12gb"), context_tokens=4096)
    experts = budget / model.native_bytes_per_layer().mean()
    assert 3300 <= experts <= 3900  # architecture doc: ≈ 9–10 GB ≈ 3,300 Q4_K_M experts


@pytest.mark.parametrize("text, value", [("9GiB", 9 * 2**30), ("9.5 GB", 9_500_000_000), ("4000MiB", 4000 * 2**20), ("123", 123)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_bad_bytes_and_hardware(tmp_path):
    with pytest.raises(InputError):
        parse_bytes("lots")
    with pytest.raises(InputError, match="no such hardware profile"):
        load_hardware("voodoo2")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"transfer": {"fixed_s": 0, "gbps": 1}}))
    with pytest.raises(InputError, match="bad.json"):
        load_hardware(str(bad))


def test_cost_terms_against_hand_arithmetic():
    hw = load_hardware("rtx3060-12gb")
    n = 2_654_208
    assert cost.transfer_s(hw, n) == pytest.approx(hw.transfer_fixed_s + n / (hw.transfer_gbps * 1e9))
    # bandwidth-bound kernels: q2_k is cheaper than q4_k, and a bigger expert costs proportionally more
    q2, q4 = (cost.expert_compute_s(hw, f, 1, 3 * 2048 * 768) for f in ("q2_k", "q4_k"))
    assert q2 < q4
    assert cost.expert_compute_s(hw, "q4_k", 1, 6 * 2048 * 768) == pytest.approx(2 * q4)
    # an unmeasured mixed format is priced between its neighbours by bytes per weight
    mixed = cost.expert_compute_s(hw, "q4_k+q6_k_down", 1, 3 * 2048 * 768, nbytes=3_059_712)
    assert q4 < mixed < cost.expert_compute_s(hw, "q6_k", 1, 3 * 2048 * 768)
    h200 = load_hardware("h200")
    for nbytes, seconds in zip(h200.curve_nbytes, h200.curve_s):  # a measured curve is reproduced at its points
        assert cost.transfer_s(h200, nbytes) == pytest.approx(seconds, rel=1e-12)
    beyond = 4 * h200.curve_nbytes[-1]
    assert cost.transfer_s(h200, beyond) == pytest.approx(h200.transfer_fixed_s + beyond / (h200.transfer_gbps * 1e9))


def test_launch_split_recovers_fixed_and_per_expert_parts(tmp_path):
    # single expert 10 µs, 8 experts in one launch 24 µs → per expert 2 µs, launch 8 µs; 8 experts = 8 + 8·2 = 24
    doc = json.loads((Path(__file__).resolve().parents[1] / "sim/profiles/rtx3060-12gb.json").read_text())
    doc["expert_compute"] = {"shape": {"hidden": 2048, "ffn": 768}, "tokens": [1, 16],
                             "seconds": {"q4_k": [10e-6, 20e-6]}, "grouped_seconds": {"q4_k": [24e-6, 34e-6]},
                             "grouped_experts": 8}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    hw = load_hardware(str(path))
    launch, per_expert = cost.expert_launch_split(hw, "q4_k", 1, 3 * 2048 * 768)
    assert launch == pytest.approx(8e-6) and per_expert == pytest.approx(2e-6)
    assert launch + 8 * per_expert == pytest.approx(24e-6)
    # without grouped measurements every expert is its own launch
    plain = load_hardware("rtx3060-12gb")
    assert cost.expert_launch_split(plain, "q4_k", 1, 3 * 2048 * 768) == (0.0, cost.expert_compute_s(plain, "q4_k", 1, 3 * 2048 * 768))


def test_precision_grammar_round_trips():
    for spec in ["native", "static:weight:30%:q2_k", "dynamic:0.6:0.9:q2_k",
                 "static:mass:20%:q3_k+dynamic:0.6:0.9:q2_k+pools:split:0.3"]:
        assert parse_precision(spec).name == spec
    assert parse_precision("static:freq:0.25:q3_k").static_fraction == 0.25
    for bad in ["static:freq:30%", "dynamic:0.9", "pools:split:1.5", "fast", "native+pools:split:0.2"]:
        with pytest.raises(InputError):
            parse_precision(bad)


def test_demotion_ties_and_hobbit_scores():
    scores = np.array([[3.0, 1.0, 1.0, 2.0, 0.0]])
    assert np.flatnonzero(demoted_experts(scores, 0.6)[0]).tolist() == [1, 2, 4]  # 0.0, then the tie 1/2 by id
    assert demoted_experts(scores, 0.0).sum() == 0 and demoted_experts(scores, 1.0).all()
    np.testing.assert_allclose(hobbit_scores([0.4, 0.3, 0.2, 0.1]), [0.0, 0.4, 0.7, 0.9])
