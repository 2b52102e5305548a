"""Tensor-aware low formats (`q2_k_gu`, `q3_k_gu`: ffn_gate/ffn_up demoted, ffn_down kept native).

Independent references: ggml's block sizes written out here (bytes per 256 weights), a model's native
bytes to tell its Q6_K-down layers apart, hand arithmetic of the 2/3 + 1/3 compute mix on a small
constructed hardware profile, and the record of a replay in which every access is a miss.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sim import convert, cost
from sim.engine import UNPRICED, CacheSpec, replay
from sim.io import InputError
from sim.precision import LOW_FORMATS, SLOTS, parse_precision, static_slots
from sim.profiles import ModelProfile, get_model, load_hardware, model_for_trace
from sim.simulate import ReplayConfig, prepare, run
from sim.trace import load_trace
from tests.test_engine import random_trace
from tests.test_inputs import Q4K, Q4K_Q6K, W, _route_csv

# ggml (gguf-py GGML_QUANT_SIZES): bytes of one super-block of 256 weights
BLOCK = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
GU = {"q2_k_gu": "q2_k", "q3_k_gu": "q3_k"}


def _bytes(fmt: str, n_weights: int) -> int:
    assert n_weights % 256 == 0
    return n_weights // 256 * BLOCK[fmt]


# ------------------------------------------------------------------------------------- grammar
def test_parser_accepts_the_tensor_aware_formats_everywhere_a_low_format_goes():
    assert set(GU) <= set(LOW_FORMATS) and SLOTS[:3] == ("native", "q2_k", "q3_k")  # old slots keep their index
    for spec in ["static:mass:30%:q2_k_gu", "static:freq:10%:q3_k_gu", "dynamic:0.6:0.9:q2_k_gu",
                 "dynamic:0.6:0.9:q3_k_gu:serve", "static:mass:20%:q3_k_gu+dynamic:0.6:0.9:q2_k_gu",
                 "static:mass:20%:q2_k+dynamic:0.6:0.9:q2_k_gu+pools:split:0.3", "dynamic:0.5:0.8:q2_k_gu+pools:split:0.4"]:
        assert parse_precision(spec).name == spec
    pol = parse_precision("STATIC:mass:30%:Q2_K_GU+dynamic:0.6:0.9:q3_k_gu")
    assert (pol.static_format, pol.dynamic_format) == ("q2_k_gu", "q3_k_gu")
    assert pol.low_formats() == ("q2_k_gu", "q3_k_gu")


@pytest.mark.parametrize("bad", ["static:mass:30%:q4_k_gu", "static:mass:30%:q2_k_g", "dynamic:0.6:0.9:q2_kgu",
                                 "dynamic:0.6:0.9:gu", "static:mass:30%:q2_k_gu_gu", "dynamic:0.6:0.9:q6_k_gu:serve"])
def test_parser_refuses_other_names_and_lists_the_new_ones(bad):
    with pytest.raises(InputError) as exc:
        parse_precision(bad)
    for name in ("q2_k", "q3_k", "q2_k_gu", "q3_k_gu"):
        assert name in str(exc.value)


def test_static_slots_use_the_tensor_aware_slot():
    trace = random_trace(seed=2, n_steps=40, native="q4_k_m")
    prep = prepare(ReplayConfig(trace=trace))
    pol = parse_precision("static:mass:50%:q3_k_gu")
    slots = static_slots(prep.calib_trace, pol, 3, 16, 0)
    assert set(np.unique(slots).tolist()) == {0, SLOTS.index("q3_k_gu")}
    assert (slots != 0).sum(axis=1).tolist() == [8, 8, 8]  # half of each layer's 16 experts


# --------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "qwen3-235b-a22b", "qwen3-30b-a3b:q5_k_m"])
def test_bytes_against_ggml_block_sizes(name):
    """2 × (hidden·ffn at the low format) + hidden·ffn at the native down format, in both kinds of layers."""
    m = get_model(name)
    per_tensor = m.hidden * m.expert_ffn
    base = "q5_k" if name.endswith("q5_k_m") else "q4_k"
    kinds = set()
    for layer in range(m.n_layers):
        native = m.expert_bytes(layer)
        # which kind of layer this is, told by its native bytes alone (Q4_K_M: Q6_K ffn_down in some layers)
        if native == 3 * _bytes(base, per_tensor):
            down = base
        elif native == 2 * _bytes(base, per_tensor) + _bytes("q6_k", per_tensor):
            down = "q6_k"
        else:
            raise AssertionError(f"layer {layer}: native bytes {native} are neither Q4_K_M kind")
        kinds.add(down)
        for fmt, gate_up in GU.items():
            want = 2 * _bytes(gate_up, per_tensor) + _bytes(down, per_tensor)
            assert m.expert_bytes(layer, fmt) == want, (layer, fmt)
            assert m.expert_bytes(layer, gate_up) < want < native
    assert kinds == {base, "q6_k"}  # the profile has both kinds of layers


def test_qwen3_numbers_written_out():
    """Qwen3-30B-A3B: hidden 2048 × ffn 768 = 1,572,864 weights per tensor = 6,144 super-blocks."""
    m = get_model("qwen3-30b-a3b")
    blocks = 2048 * 768 // 256
    assert m.expert_bytes(0, "q2_k_gu") == blocks * (2 * 84 + 210) == 2_322_432  # layer 0: Q6_K ffn_down
    assert m.expert_bytes(6, "q2_k_gu") == blocks * (2 * 84 + 144) == 1_916_928  # layer 6: Q4_K ffn_down
    assert m.expert_bytes(6, "q3_k_gu") == blocks * (2 * 110 + 144) == 2_236_416


def test_pinned_native_bytes_that_agree_keep_the_recipe():
    """A trace that pins the recipe's own sizes (the shared Qwen3 trace's header does) changes nothing."""
    m = get_model("qwen3-30b-a3b")
    pinned = replace(m, native_bytes_override=tuple(m.expert_bytes(la) for la in range(m.n_layers)))
    for fmt in GU:
        assert [pinned.expert_bytes(la, fmt) for la in range(m.n_layers)] == [m.expert_bytes(la, fmt) for la in range(m.n_layers)]


def test_pinned_bytes_of_another_recipe_use_the_traces_names_or_fail():
    m = get_model("qwen3-30b-a3b")
    per_tensor = 2048 * 768
    # a GGUF whose every ffn_down is Q4_K (e.g. Q4_K_S): the recipe says Q6_K in layer 0, the bytes disagree
    flat = 3 * _bytes("q4_k", per_tensor)
    other = replace(m, native_bytes_override=(flat,) * m.n_layers)
    with pytest.raises(ValueError, match="layer 0.*ffn_down"):
        other.expert_bytes(0, "q2_k_gu")
    assert other.expert_bytes(6, "q2_k_gu") == 2 * _bytes("q2_k", per_tensor) + _bytes("q4_k", per_tensor)  # agrees
    assert other.expert_bytes(0, "q2_k") == 3 * _bytes("q2_k", per_tensor)  # uniform formats need no down format
    # the same GGUF with the format names sim.convert writes: the names reproduce the bytes, so they are used
    named = replace(other, native_names=("q4_k",) * m.n_layers)
    assert named.expert_bytes(0, "q2_k_gu") == 2 * _bytes("q2_k", per_tensor) + _bytes("q4_k", per_tensor)
    # names that do not reproduce the bytes are not trusted either
    wrong = replace(other, native_names=("q4_k+q6_k_down",) * m.n_layers)
    with pytest.raises(ValueError, match="declared 'q4_k\\+q6_k_down'"):
        wrong.expert_bytes(0, "q2_k_gu")


def test_a_converted_route_csv_sizes_its_q6_k_down_layer(tmp_path, capsys):
    """A real-GGUF-style header (layer 0 Q4_K + Q6_K down, layer 1 Q4_K) of a model that is not built in."""
    src, out = tmp_path / "gemma.route.csv", tmp_path / "g.npz"
    src.write_text(_route_csv("gemma-4-26b-a4b-it-Q4_K_M", "gemma4"))
    convert.main([str(src), "-o", str(out)])
    capsys.readouterr()
    model = model_for_trace(load_trace(out).meta)
    assert model.native_bytes_override == (Q4K_Q6K, Q4K)
    t = W // 3
    assert model.expert_bytes(0, "q2_k_gu") == 2 * _bytes("q2_k", t) + _bytes("q6_k", t)
    assert model.expert_bytes(1, "q2_k_gu") == 2 * _bytes("q2_k", t) + _bytes("q4_k", t)
    # every access a miss (budget 0, decode only: both layers are accessed equally often)
    rec = run(ReplayConfig(trace=str(out), capacity_bytes=0, precision="static:mass:100%:q2_k_gu", timeline=False))
    assert rec.hits == 0 and rec.misses == rec.accesses > 0
    per_layer = rec.accesses // 2
    assert rec.demand_bytes == per_layer * (model.expert_bytes(0, "q2_k_gu") + model.expert_bytes(1, "q2_k_gu"))
    assert rec.low_precision_mass == pytest.approx(1.0)


def test_an_unsizable_tensor_aware_format_is_refused_only_when_used():
    """random_trace's flat 1,000-byte experts match no format: q2_k_gu cannot be sized, the rest still runs."""
    trace = random_trace(seed=1, n_steps=30)  # native="flat"
    prep = prepare(ReplayConfig(trace=trace))
    for fmt in GU:
        assert (prep.sizes[:, SLOTS.index(fmt)] == UNPRICED).all()
        assert np.isnan(prep.link_s[:, SLOTS.index(fmt)]).all()
    for spec in ("native", "static:mass:30%:q2_k", "dynamic:0.6:0.9:q3_k"):
        run(ReplayConfig(trace=trace, capacity_bytes=3000, precision=spec))
    with pytest.raises(InputError, match="trace pins 1000 native bytes"):
        run(ReplayConfig(trace=trace, capacity_bytes=3000, precision="dynamic:0.6:0.9:q2_k_gu"))
    pol = parse_precision("static:mass:30%:q3_k_gu")  # the engine's own entry point refuses it too
    slots = static_slots(prep.calib_trace, pol, 3, 16, 0)
    with pytest.raises(ValueError, match="q3_k_gu"):
        replay(prep.groups, CacheSpec("lru", 3000), pol, slots, prep.sizes, prep.link_s)


# ------------------------------------------------------------------------------------- compute
@pytest.fixture
def small_hw(tmp_path):
    """Measured at hidden 2048 × ffn 768, tokens 1 and 16; single and 8-expert grouped launches (seconds)."""
    doc = json.loads((Path(__file__).resolve().parents[1] / "sim/profiles/rtx3060-12gb.json").read_text())
    doc["expert_compute"] = {
        "shape": {"hidden": 2048, "ffn": 768}, "tokens": [1, 16], "grouped_experts": 8,
        "seconds": {"q2_k": [9e-6, 24e-6], "q3_k": [10e-6, 25e-6], "q4_k": [12e-6, 27e-6], "q6_k": [15e-6, 45e-6]},
        "grouped_seconds": {"q2_k": [23e-6, 45e-6], "q3_k": [31e-6, 46e-6], "q4_k": [33e-6, 55e-6],
                            "q6_k": [50e-6, 80e-6]},
    }
    path = tmp_path / "small.json"
    path.write_text(json.dumps(doc))
    return load_hardware(str(path))


def _split_by_hand(single: float, grouped: float, g: int = 8) -> tuple[float, float]:
    per_expert = (grouped - single) / (g - 1)
    return single - per_expert, per_expert


def test_compute_is_two_thirds_low_plus_one_third_native_down(small_hw):
    # a small model: layer 0 Q4_K gate/up + Q6_K down, layer 1 all Q4_K; experts of 3 × 512 × 256 weights
    model = ModelProfile(name="small", n_layers=2, n_experts=4, top_k=2, hidden=512, expert_ffn=256,
                         native_formats=(("q4_k", "q4_k", "q6_k"), ("q4_k",) * 3), dense_bytes=(0, 0))
    scale = (3 * 512 * 256) / (3 * 2048 * 768)  # the profile was measured on a 12× bigger expert
    table = cost.ComputeTable(model, small_hw)
    # by hand at 1 token: q2_k launch 7 µs + 2 µs/expert, q3_k 7 + 3, q4_k 9 + 3, q6_k 10 + 5
    assert _split_by_hand(9e-6, 23e-6) == pytest.approx((7e-6, 2e-6))
    assert _split_by_hand(15e-6, 50e-6) == pytest.approx((10e-6, 5e-6))
    cases = {(0, "q2_k_gu"): ((2 * 7 + 10) / 3, (2 * 2 + 5) / 3), (1, "q2_k_gu"): ((2 * 7 + 9) / 3, (2 * 2 + 3) / 3),
             (0, "q3_k_gu"): ((2 * 7 + 10) / 3, (2 * 3 + 5) / 3), (1, "q3_k_gu"): ((2 * 7 + 9) / 3, (2 * 3 + 3) / 3)}
    for (layer, fmt), (launch, per) in cases.items():
        got = table.split(layer, SLOTS.index(fmt), 1)
        assert got == pytest.approx((launch * 1e-6 * scale, per * 1e-6 * scale), rel=1e-12), (layer, fmt)
    # at 4 tokens every table is interpolated linearly between 1 and 16 tokens (a fifth of the way)
    at4 = lambda a, b: a + (b - a) * 3 / 15  # noqa: E731
    lo = _split_by_hand(at4(9e-6, 24e-6), at4(23e-6, 45e-6))
    dn = _split_by_hand(at4(15e-6, 45e-6), at4(50e-6, 80e-6))
    want = ((2 * lo[0] + dn[0]) / 3 * scale, (2 * lo[1] + dn[1]) / 3 * scale)
    assert table.split(0, SLOTS.index("q2_k_gu"), 4) == pytest.approx(want, rel=1e-12)
    # price() (what group_costs calls) returns the same per (layer, slot, token) code
    n_tok = 2
    code = (0 * len(SLOTS) + SLOTS.index("q2_k_gu")) * n_tok + 1
    np.testing.assert_allclose(table.price(np.array([code]), np.array([1, 4]))[0], want, rtol=1e-12)
    # and the same mix through the public term
    assert cost.tensor_aware_split(small_hw, "q2_k", "q6_k", 4, model.expert_weights) == pytest.approx(want, rel=1e-12)


def test_compute_mix_without_grouped_measurements():
    """rtx3060-12gb measures single launches only: each expert is its own launch, priced 2/3 + 1/3."""
    hw = load_hardware("rtx3060-12gb")
    model = get_model("qwen3-30b-a3b")
    w = model.expert_weights
    for tokens in (1, 8, 64):
        q2, q4, q6 = (float(np.interp(tokens, hw.compute_tokens, hw.compute_s[f])) for f in ("q2_k", "q4_k", "q6_k"))
        table = cost.ComputeTable(model, hw)
        assert table.split(0, SLOTS.index("q2_k_gu"), tokens) == pytest.approx((0.0, (2 * q2 + q6) / 3), rel=1e-12)
        assert table.split(6, SLOTS.index("q2_k_gu"), tokens) == pytest.approx((0.0, (2 * q2 + q4) / 3), rel=1e-12)
        assert w == hw.compute_shape_weights  # no weights scaling on this shape


def test_old_slots_are_priced_as_before():
    """The uniform low slots and native keep their pricing (nearest-bytes for the native Q4_K+Q6_K mix)."""
    hw = load_hardware("h200")
    model = get_model("qwen3-30b-a3b")
    table = cost.ComputeTable(model, hw)
    w = model.expert_weights
    assert table.split(0, 0, 1) == cost.expert_launch_split(hw, "q4_k+q6_k_down", 1, w, model.expert_bytes(0))
    assert table.split(6, SLOTS.index("q2_k"), 8) == cost.expert_launch_split(hw, "q2_k", 8, w, model.expert_bytes(6, "q2_k"))
