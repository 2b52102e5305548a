"""Repacked planes: exact round trip to GGUF bytes, and the layout's claims checked against the gguf package."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from jaxmoe.kernels import repack  # noqa: E402

QTYPE = {"q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K}


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(repack.FORMATS), lead=st.integers(1, 3), rows=st.integers(1, 5), nb=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip_every_byte_pattern(fmt, lead, rows, nb, seed):
    # Arbitrary bytes (not only valid quantizer output): the repacking must be a bijection on bits.
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(lead, rows, nb * repack.GGUF_BLOCK_BYTES[fmt]), dtype=np.uint8)
    planes = repack.pack(raw, fmt)
    assert np.array_equal(repack.unpack(planes, fmt), raw)
    assert repack.plane_nbytes(planes) == lead * rows * nb * repack.PACKED_BLOCK_BYTES[fmt]


@pytest.mark.parametrize("fmt", repack.FORMATS)
def test_plane_dequant_matches_gguf_random_blocks(fmt):
    rng = np.random.default_rng(1)
    raw = repack.random_gguf(fmt, 7, 768, rng, lead=(2,))
    want = gguf.quants.dequantize(raw, QTYPE[fmt])
    got = repack.dequantize_planes(repack.pack(raw, fmt), fmt)
    assert got.shape == (2, 7, 768)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", repack.FORMATS)
def test_plane_dequant_matches_gguf_quantized_gaussian(fmt):
    quants = pytest.importorskip("jaxmoe.quants")
    w = np.random.default_rng(2).standard_normal((5, 512)).astype(np.float32) * 0.05
    raw = quants.quantize(w, fmt)
    got = repack.dequantize_planes(repack.pack(raw, fmt), fmt)
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, QTYPE[fmt]))
    assert np.abs(got - w).max() < 0.05  # it is a quantization of w, not noise


@pytest.mark.parametrize("fmt,bits", [("q2_k", 2), ("q4_k", 4)])
def test_word_lanes_hold_consecutive_weights(fmt, bits):
    # Blocks whose dequantized weight equals its quant: d = 1, dmin = 0, every sub-block scale 1.
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(1, 1, repack.GGUF_BLOCK_BYTES[fmt]), dtype=np.uint8)
    one, zero = np.array([1], np.float16).view(np.uint8), np.array([0], np.float16).view(np.uint8)
    if fmt == "q2_k":
        raw[..., 0:16] = 1
        raw[..., 80:82], raw[..., 82:84] = one, zero
    else:
        raw[..., 0:2], raw[..., 2:4] = one, zero
        raw[..., 4:16] = repack._pack_scale_min_k4(np.ones(8, np.uint8), np.zeros(8, np.uint8))
    q = gguf.quants.dequantize(raw, QTYPE[fmt]).reshape(256).astype(np.int64)
    words = repack.pack(raw, fmt)["qs"][0, 0, 0]  # [P, 2, 4]
    per_byte = 8 // bits
    for p in range(words.shape[0]):
        for c in range(2):
            for w in range(4):
                for s in range(per_byte):
                    t = per_byte * p + s
                    for i in range(4):
                        lane = (int(words[p, c, w]) >> (8 * i + bits * s)) & ((1 << bits) - 1)
                        assert lane == q[128 * c + 16 * t + 4 * w + i]


def test_q3_high_bits_plane():
    # Q3_K weight = d·(sc−32)·(ql − 4·(1 − hbit)); with d = 1, all scales 33 → weight = ql + 4·hbit − 4.
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, size=(1, 1, 110), dtype=np.uint8)
    raw[..., 96:108] = repack._pack_scales_q3(np.full(16, 33, np.uint8))
    raw[..., 108:110] = np.array([1], np.float16).view(np.uint8)
    wts = gguf.quants.dequantize(raw, T.Q3_K).reshape(256).astype(np.int64)
    planes = repack.pack(raw, "q3_k")
    hm = planes["hm"][0, 0, 0]  # [2, 4] words
    for c in range(2):
        for t in range(8):
            for w in range(4):
                for i in range(4):
                    hbit = (int(hm[c, w]) >> (8 * i + t)) & 1
                    p, s = divmod(t, 4)
                    ql = (int(planes["qs"][0, 0, 0, p, c, w]) >> (8 * i + 2 * s)) & 3
                    assert ql + 4 * hbit - 4 == wts[128 * c + 16 * t + 4 * w + i]
    assert np.all(planes["sc"] == 1)


def test_sizes_within_a_few_percent():
    for fmt in repack.FORMATS:
        ratio = repack.PACKED_BLOCK_BYTES[fmt] / repack.GGUF_BLOCK_BYTES[fmt]
        assert 1.0 <= ratio <= 1.04


def test_bad_input():
    with pytest.raises(ValueError, match="whole number"):
        repack.pack(np.zeros((2, 85), np.uint8), "q2_k")
    with pytest.raises(ValueError, match="supports"):
        repack.pack(np.zeros((2, 84), np.uint8), "q6_k")
    with pytest.raises(ValueError, match="multiple"):
        repack.random_gguf("q2_k", 2, 100, np.random.default_rng(0))
