"""Format byte sizes against the gguf package's own table and the architecture doc's figures."""
import pytest

from sim.formats import FORMATS, get_format

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "bf16"])
def test_block_sizes_match_gguf(name):
    fmt = FORMATS[name]
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    assert (fmt.block_weights, fmt.block_bytes) == (block_weights, block_bytes)


@pytest.mark.parametrize(
    "name, expert_bytes",
    [("q4_k", 2_654_208), ("q5_k", 3_244_032), ("q3_k", 2_027_520), ("q2_k", 1_548_288), ("bf16", 9_437_184)],
)
def test_qwen3_expert_bytes(name, expert_bytes):
    assert get_format(name).nbytes(3 * 2048 * 768) == expert_bytes


def test_unknown_format_and_partial_block():
    with pytest.raises(ValueError, match="unknown format"):
        get_format("q1_z")
    with pytest.raises(ValueError, match="multiple"):
        get_format("q4_k").nbytes(100)
