"""Built-in model profiles (Mixtral-8x7B, Qwen3-235B-A22B; Q4_K_M and Q5_K_M) against hand arithmetic.

The reference is written out independently of sim.profiles: bytes = weights / 256 × bytes per
super-block (gguf-py GGML_QUANT_SIZES: Q4_K 144, Q5_K 176, Q6_K 210; Q8_0 34 per 32), and the
llama.cpp layer sets of `use_more_bits` listed by hand for 32 and 94 layers.
"""
import pytest

from sim.profiles import get_model, qwen3_30b_a3b

BYTES_PER_256 = {"q4_k": 144, "q5_k": 176, "q6_k": 210, "q8_0": 34 * 8}

# use_more_bits(i, n): i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2 — enumerated by hand
MORE_BITS_32 = set(range(0, 4)) | set(range(28, 32)) | {6, 9, 12, 15, 18, 21, 24, 27}
MORE_BITS_94 = set(range(0, 11)) | set(range(82, 94)) | set(range(13, 82, 3))


def tensor_bytes(weights: int, fmt: str) -> int:
    assert weights % 256 == 0
    return weights // 256 * BYTES_PER_256[fmt]


@pytest.mark.parametrize("variant, base", [("q4_k_m", "q4_k"), ("q5_k_m", "q5_k")])
@pytest.mark.parametrize("name, n_layers, hidden, ffn, more_bits", [
    ("mixtral-8x7b", 32, 4096, 14336, MORE_BITS_32),
    ("qwen3-235b-a22b", 94, 4096, 1536, MORE_BITS_94),
])
def test_expert_bytes_from_first_principles(name, n_layers, hidden, ffn, more_bits, variant, base):
    m = get_model(f"{name}:{variant}")
    assert m.n_layers == n_layers and m.expert_weights == 3 * hidden * ffn
    per_tensor = hidden * ffn
    for layer in range(n_layers):
        down = "q6_k" if layer in more_bits else base
        want = 2 * tensor_bytes(per_tensor, base) + tensor_bytes(per_tensor, down)
        assert m.expert_bytes(layer) == want, layer
        assert m.native_name(layer) == (base if down == base else f"{base}+q6_k_down")
    assert m.total_expert_bytes() == m.n_experts * sum(m.expert_bytes(i) for i in range(n_layers))


def test_mixtral_geometry_and_hand_numbers():
    m = get_model("mixtral-8x7b")  # Q4_K_M
    assert (m.n_layers, m.n_experts, m.top_k, m.hidden, m.expert_ffn) == (32, 8, 2, 4096, 14336)
    # 4096 × 14336 = 58,720,256 weights = 229,376 super-blocks per tensor
    assert m.expert_bytes(0) == 229_376 * (144 + 144 + 210) == 114_229_248
    assert m.expert_bytes(4) == 229_376 * 3 * 144 == 99_090_432
    assert m.expert_bytes(4, "q2_k") == 229_376 * 3 * 84
    # 8 experts: llama.cpp gives attn_k/attn_v Q8_0 and (Q4_K_M) attn_output Q5_K; Q at Q4_K
    q = tensor_bytes(4096 * 4096, "q4_k")
    kv = 2 * tensor_bytes(4096 * 1024, "q8_0")
    o = tensor_bytes(4096 * 4096, "q5_k")
    router, norms = 4 * 4096 * 8, 4 * 2 * 4096  # f32 ffn_gate_inp, attn_norm + ffn_norm (no q/k norms)
    assert set(m.dense_bytes) == {q + kv + o + router + norms}
    assert m.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2  # f16 K and V
    assert m.head_bytes == tensor_bytes(32_000 * 4096, "q6_k") + tensor_bytes(4096, "q4_k")


def test_qwen3_235b_dense_kv_and_head():
    for variant, base in (("q4_k_m", "q4_k"), ("q5_k_m", "q5_k")):
        m = get_model(f"qwen3-235b-a22b:{variant}")
        assert (m.n_layers, m.n_experts, m.top_k, m.hidden, m.expert_ffn) == (94, 128, 8, 4096, 1536)
        for layer in (0, 11, 12, 13, 93):
            v = "q6_k" if layer in MORE_BITS_94 else base
            want = (tensor_bytes(4096 * 64 * 128, base) + tensor_bytes(4096 * 4 * 128, base)
                    + tensor_bytes(4096 * 4 * 128, v) + tensor_bytes(64 * 128 * 4096, base)
                    + 4 * 4096 * 128 + 4 * (2 * 4096 + 2 * 128))
            assert m.dense_bytes[layer] == want, (variant, layer)
        assert m.kv_bytes_per_token == 94 * 2 * 4 * 128 * 2
        assert m.head_bytes == tensor_bytes(151_936 * 4096, "q6_k") + tensor_bytes(4096, base)


def test_q5_k_m_is_larger_than_q4_k_m_and_q4_k_m_unchanged_for_qwen3_30b():
    q4, q5 = get_model("qwen3-30b-a3b"), get_model("qwen3-30b-a3b:q5_k_m")
    assert q4 == qwen3_30b_a3b("q4_k_m")
    # Q5_K_M: gate/up at 176 instead of 144; ffn_down Q6_K in the same layers
    for layer in range(48):
        assert q5.expert_bytes(layer) - q4.expert_bytes(layer) == (
            2 * (176 - 144) + (0 if q4.native_name(layer).endswith("q6_k_down") else 176 - 144)) * 2048 * 768 // 256
    # a Q5_K_M miss demoted to Q2_K moves 84/176 of the uniform bytes (gate+up+down at Q5_K)
    assert q5.native_name(6) == "q5_k" and q5.expert_bytes(6, "q2_k") / q5.expert_bytes(6) == pytest.approx(84 / 176)
