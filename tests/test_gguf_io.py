"""jaxmoe.gguf_io: round trips, llama.cpp's qwen3moe names and dimension order, bytes against the
gguf package, tokenizer metadata against the `tokenizers` package, one-line input errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxmoe import gguf_io as G
from jaxmoe import model as M
from sim.io import InputError

CFG = M.Config(vocab=300, hidden=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, n_experts=4, top_k=2,
               expert_ffn=256, rope_theta=1e6, rms_eps=1e-6, max_seq=128)
TOKENIZER = Path(__file__).resolve().parents[1] / "jaxmoe" / "tokenizer.json"


def _weights(cfg: M.Config, seed: int = 0) -> M.Weights:
    w = M.init_weights(cfg, seed, std=0.05)
    rng = np.random.default_rng(seed)
    layers = [dataclasses.replace(lw, attn_norm=np.asarray(1 + 0.1 * rng.standard_normal(cfg.hidden), np.float32))
              for lw in w.layers]
    return dataclasses.replace(w, layers=layers)


def _leaves(w: M.Weights) -> list[np.ndarray]:
    import jax
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(w)]


@pytest.mark.parametrize("tied", [False, True])
def test_f32_round_trip_is_exact(tmp_path, tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    w = _weights(cfg)
    path = tmp_path / "m.gguf"
    formats = G.write_gguf(path, w, cfg)
    assert set(formats.values()) == {"f32"}
    m = G.read_gguf(path)
    assert m.cfg == cfg
    assert (m.weights.lm_head is None) == tied
    for a, b in zip(_leaves(w), _leaves(m.weights), strict=True):
        np.testing.assert_array_equal(a, b)


def test_names_and_dimension_order_are_llama_cpps(tmp_path):
    """Tensor names come from gguf's QWEN3MOE table; ne (fastest dim first) matches llama.cpp's create_tensor."""
    cfg, w = CFG, _weights(CFG)
    path = tmp_path / "m.gguf"
    G.write_gguf(path, w, cfg)
    reader = gguf.GGUFReader(path)
    ne = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    D, E, F, V, H = cfg.hidden, cfg.n_experts, cfg.expert_ffn, cfg.vocab, cfg.head_dim
    allowed = {gguf.TENSOR_NAMES[k].format(bid=l) + ".weight"
               for k in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE] for l in range(cfg.n_layers)}
    assert set(ne) <= allowed
    assert len(ne) == 3 + 12 * cfg.n_layers
    assert ne["token_embd.weight"] == [D, V] and ne["output.weight"] == [D, V] and ne["output_norm.weight"] == [D]
    assert ne["blk.1.attn_q.weight"] == [D, cfg.n_heads * H]
    assert ne["blk.1.attn_k.weight"] == [D, cfg.n_kv_heads * H] == ne["blk.1.attn_v.weight"]
    assert ne["blk.1.attn_output.weight"] == [cfg.n_heads * H, D]
    assert ne["blk.1.attn_q_norm.weight"] == [H] == ne["blk.1.attn_k_norm.weight"]
    assert ne["blk.1.ffn_gate_inp.weight"] == [D, E]
    assert ne["blk.1.ffn_gate_exps.weight"] == [D, F, E] == ne["blk.1.ffn_up_exps.weight"]
    assert ne["blk.1.ffn_down_exps.weight"] == [F, D, E]
    # the stored values in ggml order: expert e's gate row f is gate[e, :, f]
    t = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(np.asarray(t["blk.1.ffn_gate_exps.weight"].data)[3, 7],
                                  np.asarray(w.layers[1].experts.gate)[3, :, 7])
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_q.weight"].data)[2 * H + 5],  # head 2, dim 5
                                  np.asarray(w.layers[0].wq)[:, 2, 5])
    f = reader.fields
    assert f["general.architecture"].contents() == "qwen3moe"
    for key, want in [("qwen3moe.block_count", 2), ("qwen3moe.expert_count", E), ("qwen3moe.expert_used_count", 2),
                      ("qwen3moe.expert_feed_forward_length", F), ("qwen3moe.attention.head_count", 4),
                      ("qwen3moe.attention.head_count_kv", 2), ("qwen3moe.attention.key_length", H),
                      ("qwen3moe.attention.value_length", H), ("qwen3moe.embedding_length", D),
                      ("qwen3moe.context_length", 128)]:
        assert f[key].contents() == want, key
    assert f["qwen3moe.rope.freq_base"].contents() == 1e6


@pytest.mark.parametrize("expert_format", ["q8_0", "q4_k", {"gate": "q4_k", "up": "q4_k", "down": "q6_k"},
                                           "q2_k", "q3_k"])
def test_quantized_bytes_and_dequantized_weights(tmp_path, expert_format):
    quants = pytest.importorskip("jaxmoe.quants")
    cfg, w = CFG, _weights(CFG, seed=1)
    path = tmp_path / "m.gguf"
    formats = G.write_gguf(path, w, cfg, expert_format=expert_format, dense_format="q8_0",
                           overrides={"token_embd.weight": "f16"})
    m = G.read_gguf(path)
    floats = G.weights_to_tensors(w, cfg)
    assert {n: t.fmt for n, t in m.tensors.items()} == formats
    assert formats["blk.0.ffn_norm.weight"] == "f32" and formats["blk.0.ffn_gate_inp.weight"] == "f32"
    for name, t in m.tensors.items():
        if t.fmt == "f32":
            np.testing.assert_array_equal(t.data, floats[name])
        elif t.fmt == "f16":
            np.testing.assert_array_equal(t.data, floats[name].astype(np.float16))
        else:
            assert t.data.dtype == np.uint8
            np.testing.assert_array_equal(t.data, quants.quantize(floats[name], t.fmt))
            if t.fmt == "q8_0":  # independent reference: gguf's own Q8_0 quantizer
                np.testing.assert_array_equal(t.data, gguf.quants.quantize(floats[name], gguf.GGMLQuantizationType.Q8_0))
    # dequantized weights are gguf.quants.dequantize of the stored bytes, in model layout
    for l in range(cfg.n_layers):
        for kind in G.EXPERT_KINDS:
            t = m.tensors[G.expert_tensor_name(l, kind)]
            ref = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.fmt.upper()])
            np.testing.assert_array_equal(getattr(m.weights.layers[l].experts, kind), ref.transpose(0, 2, 1))
            # one expert's bytes are contiguous and decode alone to that expert
            e_bytes = m.expert_bytes(l, kind, 2)
            one = gguf.quants.dequantize(e_bytes, gguf.GGMLQuantizationType[t.fmt.upper()])
            np.testing.assert_array_equal(one, ref[2])
            want_fmt = expert_format if isinstance(expert_format, str) else expert_format[kind]
            assert m.expert_format(l, kind) == want_fmt
            err = np.abs(one - floats[G.expert_tensor_name(l, kind)][2]).max()
            assert err < 0.5 * np.abs(floats[G.expert_tensor_name(l, kind)][2]).max()


def test_stored_tensors_pass_through_byte_for_byte(tmp_path):
    pytest.importorskip("jaxmoe.quants")
    cfg, w = CFG, _weights(CFG, seed=2)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    G.write_gguf(a, w, cfg, expert_format="q4_k", dense_format="q8_0")
    m = G.read_gguf(a)
    # write the dequantized weights again, passing the stored tensors through: same tensor bytes
    G.write_gguf(b, m.weights, m.cfg, stored=m.tensors)
    m2 = G.read_gguf(b)
    for n, t in m.tensors.items():
        assert m2.tensors[n].fmt == t.fmt
        np.testing.assert_array_equal(m2.tensors[n].data, t.data)


def test_tokenizer_metadata_matches_tokenizers_package(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    n = tk.get_vocab_size()
    cfg = dataclasses.replace(CFG, vocab=n + 8)  # padded vocabulary
    path = tmp_path / "m.gguf"
    G.write_gguf(path, _weights(cfg), cfg, tokenizer_json=TOKENIZER)
    tok = G.read_gguf(path).tokenizer
    assert tok["model"] == "gpt2" and tok["pre"] == "gpt-2"
    assert len(tok["tokens"]) == cfg.vocab
    assert all(tok["tokens"][i] == tk.id_to_token(i) for i in range(n))
    types = np.asarray(tok["token_type"])
    eos = tk.token_to_id("<|endoftext|>")
    assert tok["eos_id"] == eos == tok["bos_id"]
    assert types[eos] == gguf.TokenType.CONTROL and types[n - 1] == gguf.TokenType.NORMAL
    assert np.all(types[n:] == gguf.TokenType.UNUSED)
    merges = json.loads(TOKENIZER.read_text())["model"]["merges"]
    assert tok["merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    # the embedded HF JSON rebuilds the same tokenizer
    tk2 = tokenizers.Tokenizer.from_str(tok["hf_json"])
    text = "def gguf_io(x):\n    return x  # MoE experts at 2 bits"
    assert tk2.encode(text).ids == tk.encode(text).ids


def test_tokenizer_larger_than_vocab_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="vocabulary"):
        G.write_gguf(tmp_path / "m.gguf", _weights(CFG), CFG, tokenizer_json=TOKENIZER)
    assert not (tmp_path / "m.gguf").exists()


def test_bad_files_are_input_errors(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InputError, match="junk.gguf"):
        G.read_gguf(junk)
    other = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(other, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="architecture"):
        G.read_gguf(other)


def test_missing_tensor_is_named(tmp_path):
    cfg, w = CFG, _weights(CFG)
    path = tmp_path / "m.gguf"
    G.write_gguf(path, w, cfg)
    tensors = G.read_gguf(path, dequantize=False).tensors
    floats = {n: t.data for n, t in tensors.items() if n != "blk.1.ffn_up_exps.weight"}
    with pytest.raises(InputError, match="blk.1.ffn_up_exps.weight"):
        G.tensors_to_weights(floats, cfg)
