"""jaxmoe.imatrix against brute-force loops written from llama.cpp's imatrix semantics, and its use with
jaxmoe.quants: weighting by the imatrix lowers the error of the layer's output on the calibration inputs."""
from __future__ import annotations

import numpy as np
import pytest

from jaxmoe import imatrix
from jaxmoe.quants import QUANT_TYPES


def brute_force(x: np.ndarray, experts: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """One token and slot at a time, as collect_imatrix loops (float64)."""
    k_cols = x.shape[-1]
    sums = np.zeros((n_experts, k_cols))
    counts = np.zeros(n_experts, np.int64)
    for t in range(experts.shape[0]):
        for s in range(experts.shape[1]):
            e = experts[t, s]
            row = x[t, s] if x.ndim == 3 else x[t]
            counts[e] += 1
            for j in range(k_cols):
                sums[e, j] += float(row[j]) * float(row[j])
    return sums, counts


def routing(rng, n_tokens: int, k: int, n_experts: int) -> np.ndarray:
    """Top-k style ids: k distinct experts per token, skewed popularity, some experts never chosen."""
    pop = np.exp(rng.normal(0, 1.5, n_experts))
    pop[-2:] = 0  # two dead experts
    return np.stack([rng.choice(n_experts, k, replace=False, p=pop / pop.sum()) for _ in range(n_tokens)])


def test_dense_sums_squares_per_column_and_counts_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 32)).astype(np.float32)
    im = imatrix.accumulate(x)
    flat = x.reshape(-1, 32).astype(np.float64)
    np.testing.assert_allclose(im.in_sum2[0], [sum(r[j] ** 2 for r in flat) for j in range(32)], rtol=1e-12)
    assert im.counts.tolist() == [21] and im.n_experts is None
    w = im.quant_weights()
    assert w.shape == (32,) and w.dtype == np.float32
    np.testing.assert_array_equal(w, im.in_sum2[0].astype(np.float32) / np.float32(21))


@pytest.mark.parametrize("per_slot", [False, True], ids=["gate_up_input", "down_input"])
def test_experts_match_the_brute_force_loop(per_slot):
    rng = np.random.default_rng(1)
    n_tokens, k, n_experts, k_cols = 40, 3, 9, 16
    ids = routing(rng, n_tokens, k, n_experts)
    shape = (n_tokens, k, k_cols) if per_slot else (n_tokens, k_cols)
    x = (rng.standard_normal(shape) * np.exp(rng.normal(0, 1, k_cols))).astype(np.float32)
    im = imatrix.accumulate(x, ids, n_experts)
    sums, counts = brute_force(x, ids, n_experts)
    np.testing.assert_array_equal(im.counts, counts)
    np.testing.assert_allclose(im.in_sum2, sums, rtol=1e-12)
    assert counts.sum() == n_tokens * k and counts[-2:].tolist() == [0, 0]
    w = im.quant_weights()
    assert w.shape == (n_experts, k_cols)
    live = counts > 0
    np.testing.assert_allclose(w[live], sums[live] / counts[live, None], rtol=1e-6)
    assert (w[~live] == 1).all()  # llama-quantize: an expert without data weighs 1 everywhere


def test_batches_add_up_to_the_whole():
    rng = np.random.default_rng(2)
    ids = routing(rng, 30, 2, 6)
    x = rng.standard_normal((30, 2, 8))
    whole = imatrix.accumulate(x, ids, 6)
    parts = imatrix.accumulate(x[:11], ids[:11], 6) + imatrix.accumulate(x[11:], ids[11:], 6)
    np.testing.assert_array_equal(parts.counts, whole.counts)
    np.testing.assert_allclose(parts.in_sum2, whole.in_sum2, rtol=1e-12)
    with pytest.raises(ValueError, match="cannot add"):
        _ = whole + imatrix.accumulate(x[:, 0])


def test_leading_axes_are_tokens():
    rng = np.random.default_rng(3)
    ids = routing(rng, 24, 2, 5)
    x = rng.standard_normal((24, 8))
    a = imatrix.accumulate(x, ids, 5)
    b = imatrix.accumulate(x.reshape(4, 6, 8), ids.reshape(4, 6, 2), 5)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.in_sum2, b.in_sum2, rtol=1e-12)


@pytest.mark.parametrize("args, match", [
    ((np.full((4, 8), np.nan),), "non-finite"),
    ((np.ones((4, 8)), np.zeros((4, 2), np.int64), None), "n_experts"),
    ((np.ones((4, 8)), np.full((4, 2), 5), 5), r"\[0, 5\)"),
    ((np.ones((4, 8)), np.full((4, 2), -1), 5), r"\[0, 5\)"),
    ((np.ones((4, 8)), np.zeros((4, 2), np.float32), 5), "integer"),
    ((np.ones((5, 8)), np.zeros((4, 2), np.int64), 5), "fit neither"),
])
def test_bad_input_raises(args, match):
    with pytest.raises(ValueError, match=match):
        imatrix.accumulate(*args)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q6_k"])
def test_imatrix_weighting_lowers_the_output_error_on_held_out_inputs(name):
    """The point of an imatrix: with inputs whose column energies differ (as real activations do), the
    output error ||x (W - Wq)ᵀ||² on held-out inputs drops when Wq is quantized with the calibration
    imatrix. Measured ratios over seeds 4-6: 0.32-0.34 Q2_K, 0.50-0.54 Q3_K, 0.48-0.51 Q4_K, 0.55-0.61 Q6_K;
    without the weighting the ratio is 1."""
    rng = np.random.default_rng(4)
    n_out, k_cols = 64, 1024
    col_scale = np.exp(rng.normal(0, 1.0, k_cols))  # per-input-column activation scale
    calib = (rng.standard_normal((512, k_cols)) * col_scale).astype(np.float32)
    held_out = (rng.standard_normal((512, k_cols)) * col_scale).astype(np.float32)
    w = (rng.standard_normal((n_out, k_cols)) * 0.02).astype(np.float32)
    qw = imatrix.accumulate(calib).quant_weights()
    cls = QUANT_TYPES[name]

    def out_err(quant_weights):
        wq = cls.dequantize(cls.quantize(w, quant_weights), w.shape).astype(np.float64)
        return float(np.sum((held_out.astype(np.float64) @ (w - wq).T) ** 2))

    ratio = out_err(qw) / out_err(None)
    assert 0.2 < ratio < {"q2_k": 0.5, "q3_k": 0.7, "q4_k": 0.7, "q6_k": 0.8}[name], ratio
