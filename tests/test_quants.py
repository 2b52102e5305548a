"""jaxmoe.quants against independent references: gguf's dequantizer, ggml's C quantizer, float64 grids."""
from __future__ import annotations

import ctypes
import os
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxmoe import quants
from jaxmoe.quants import Q8_0, QUANT_TYPES, get_quant, nearest_int, requantize

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize

NAMES = list(QUANT_TYPES)
K_NAMES = ["q2_k", "q3_k", "q4_k", "q6_k"]


def gguf_type(name):
    return gguf.GGMLQuantizationType[name.upper()]


def make_weights(kind: str, n_blocks: int, seed: int) -> np.ndarray:
    """(n_blocks, 256) float32 test weights of a named distribution."""
    rng = np.random.default_rng(seed)
    shape = (n_blocks, 256)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "student_t3":
        x = rng.standard_t(3, shape) * 0.02
    elif kind == "wide":  # per-block magnitudes over 13 decades
        x = rng.standard_normal(shape) * np.exp(rng.uniform(-20, 10, (n_blocks, 1)))
    elif kind == "per_group":  # every 16-weight group at its own scale
        x = rng.standard_normal(shape) * np.exp(rng.uniform(-8, 4, (n_blocks, 16))).repeat(16, 1)
    elif kind == "positive":
        x = np.abs(rng.standard_normal(shape)) + 0.5
    elif kind == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.05)
    elif kind == "half_steps":  # many exact rounding ties
        x = rng.integers(-16, 16, shape) * 0.5
    elif kind == "zero_groups":
        x = rng.standard_normal(shape) * (rng.random((n_blocks, 16)) < 0.5).repeat(16, 1)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# layout facts
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_sizes_and_type_ids_match_gguf(name):
    cls = QUANT_TYPES[name]
    assert (cls.block_weights, cls.type_size) == gguf.GGML_QUANT_SIZES[gguf_type(name)]
    assert cls.ggml_type == int(gguf_type(name))
    assert get_quant(name.upper()) is cls


# ---------------------------------------------------------------------------------------------------
# dequantization: bit-exact against the gguf package
# ---------------------------------------------------------------------------------------------------
def _bytes_case(name: str, case: str) -> np.ndarray:
    cls = QUANT_TYPES[name]
    rng = np.random.default_rng(7)
    if case == "random_bytes":  # includes Inf/NaN half floats
        return rng.integers(0, 256, (500, cls.type_size), dtype=np.uint8)
    if case == "random_bytes_finite_d":  # same, with every half float set to a finite value
        b = rng.integers(0, 256, (500, cls.type_size), dtype=np.uint8)
        half_offsets = {"q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q6_k": [208], "q8_0": [0]}[name]
        for off in half_offsets:
            b[:, off:off + 2] = rng.uniform(-2, 2, 500).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return b
    if case == "zero":
        return np.zeros((4, cls.type_size), dtype=np.uint8)
    if case == "constant":
        return cls.quantize(np.full((3, 1024), 0.37, np.float32)).reshape(-1, cls.type_size)
    if case == "wide_range":
        return cls.quantize(make_weights("wide", 300, 3)).reshape(-1, cls.type_size)
    if case == "quantized_normal":
        return cls.quantize(make_weights("normal", 300, 4)).reshape(-1, cls.type_size)
    raise ValueError(case)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", ["random_bytes", "random_bytes_finite_d", "zero", "constant", "wide_range",
                                  "quantized_normal"])
@pytest.mark.parametrize("name", NAMES)
def test_dequantize_bit_exact_vs_gguf(name, case):
    blocks = _bytes_case(name, case)
    ours = QUANT_TYPES[name].dequantize_blocks(blocks)
    ref = gguf_dequantize(blocks, gguf_type(name))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(ours.view(np.uint32)[finite], ref.view(np.uint32)[finite])  # bit-exact
    assert np.array_equal(np.isnan(ours), np.isnan(ref)) and np.array_equal(ours[~finite & ~np.isnan(ref)],
                                                                            ref[~finite & ~np.isnan(ref)])


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_reshapes_rows_and_accepts_bytes(name):
    cls = QUANT_TYPES[name]
    x = make_weights("normal", 24, 5).reshape(2, 3, 1024)
    q = cls.quantize(x)
    assert q.shape == (2, 3, 1024 // cls.block_weights * cls.type_size) and q.dtype == np.uint8
    y = cls.dequantize(q, x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(cls.dequantize(q.tobytes(), x.shape), y)
    np.testing.assert_array_equal(y.reshape(-1, cls.block_weights),
                                  gguf_dequantize(q.reshape(-1, cls.type_size), gguf_type(name)))


# ---------------------------------------------------------------------------------------------------
# quantization: against ggml's C reference (optional), and self-contained properties
# ---------------------------------------------------------------------------------------------------
GGML_LIB = os.environ.get("GGML_QUANTS_LIB")
GGML_FUNCS = {"q2_k": "quantize_row_q2_K_ref", "q3_k": "quantize_row_q3_K_ref", "q4_k": "quantize_row_q4_K_ref",
              "q6_k": "quantize_row_q6_K_ref", "q8_0": "quantize_row_q8_0_ref"}


def ggml_reference_bytes(name: str, x: np.ndarray) -> np.ndarray:
    """Bytes from ggml's own `quantize_row_*_ref` in the shared library named by GGML_QUANTS_LIB."""
    cls = QUANT_TYPES[name]
    lib = ctypes.CDLL(GGML_LIB)
    fn = getattr(lib, GGML_FUNCS[name])
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.zeros(x.size // cls.block_weights * cls.type_size, dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out.reshape(-1, cls.type_size)


@pytest.mark.skipif(not GGML_LIB, reason="set GGML_QUANTS_LIB to a ggml shared library (libggml-base.so)")
@pytest.mark.parametrize("kind", ["normal", "student_t3", "wide", "per_group", "positive", "sparse",
                                  "half_steps", "zero_groups"])
@pytest.mark.parametrize("name", NAMES)
def test_quantize_matches_ggml_c_reference(name, kind):
    x = make_weights(kind, 500, seed=zlib.crc32(f"{name}/{kind}".encode()))
    ours = QUANT_TYPES[name].quantize(x).reshape(-1, QUANT_TYPES[name].type_size)
    ref = ggml_reference_bytes(name, x)
    match = (ours == ref).all(axis=1)
    assert match.all(), f"{name}/{kind}: {match.mean():.2%} of blocks match; first differing {np.flatnonzero(~match)[:5]}"


# ggml's imatrix path: `quantize_q*_K(src, dst, nrows, n_per_row, quant_weights)`, one weight vector per row.
def ggml_weighted_bytes(name: str, x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    """Bytes from ggml's `quantize_<type>` with `quant_weights` (K,) on rows x (nrows, K)."""
    cls = QUANT_TYPES[name]
    fn = getattr(ctypes.CDLL(GGML_LIB), "quantize_" + name[:-1] + name[-1].upper())  # quantize_q4_K, ...
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    qw = np.ascontiguousarray(quant_weights, dtype=np.float32)
    assert qw.shape == (x.shape[1],)
    out = np.zeros(x.size // cls.block_weights * cls.type_size, dtype=np.uint8)
    assert fn(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], qw.ctypes.data) == out.size
    return out.reshape(-1, cls.type_size)


X_KINDS = ["normal", "student_t3", "wide", "per_group", "positive", "sparse", "half_steps", "zero_groups"]
W_KINDS = ["lognormal", "ones", "one_hot", "sparse", "tiny", "huge", "overflow", "integers"]


def make_quant_weights(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded importance vectors (float32 >= 0) of a named kind; shape (..., K)."""
    rng = np.random.default_rng(seed)
    if kind == "lognormal":  # skewed, like real imatrix columns
        w = np.exp(rng.normal(0, 2, shape))
    elif kind == "ones":
        w = np.ones(shape)
    elif kind == "one_hot":  # a single important column per vector: most groups weigh nothing
        w = np.zeros(shape)
        flat = w.reshape(-1, shape[-1])
        flat[np.arange(flat.shape[0]), rng.integers(0, shape[-1], flat.shape[0])] = 1.0
    elif kind == "sparse":  # dead columns (weight 0) beside live ones
        w = rng.exponential(1.0, shape) * (rng.random(shape) < 0.2)
    elif kind == "tiny":
        w = np.exp(rng.normal(0, 1, shape)) * 1e-30
    elif kind == "huge":
        w = np.exp(rng.normal(0, 1, shape)) * 1e20
    elif kind == "overflow":  # weight sums overflow float32 to Inf (and Inf - Inf to NaN) inside the fits
        w = np.exp(rng.normal(0, 2, shape))
        w = w / w.max() * 3e38
    elif kind == "integers":  # many exact ties between candidate fits
        w = rng.integers(0, 4, shape).astype(np.float64)
    else:
        raise ValueError(kind)
    return w.astype(np.float32)


def weighted_case(wkind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x (E=len(X_KINDS)+3, 25, 1024) — one expert per input kind, plus all-zero, constant and huge
    (block Σx² overflows) experts — and per-expert quant_weights (E, 1024)."""
    xs = [make_weights(k, 100, seed=seed + i).reshape(25, 1024) for i, k in enumerate(X_KINDS)]
    xs.append(np.zeros((25, 1024), np.float32))
    xs.append(np.full((25, 1024), -0.37, np.float32))
    xs.append(make_weights("normal", 100, seed=seed + 99).reshape(25, 1024) * np.float32(1e19))
    x = np.stack(xs)
    return x, make_quant_weights(wkind, (x.shape[0], x.shape[2]), seed)


@pytest.mark.skipif(not GGML_LIB, reason="set GGML_QUANTS_LIB to a ggml shared library (libggml-base.so)")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("wkind", W_KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_weighted_quantize_matches_ggml_c_reference(name, wkind):
    """Our quant_weights path against ggml's quantize_q*_K imatrix path: every block byte-identical.
    GGML_QUANTS_REPEATS=n (default 1) runs n seeds per case."""
    cls = QUANT_TYPES[name]
    for rep in range(int(os.environ.get("GGML_QUANTS_REPEATS", "1"))):
        x, qw = weighted_case(wkind, seed=zlib.crc32(f"{name}/{wkind}/{rep}".encode()))
        ours = cls.quantize(x, qw).reshape(x.shape[0], -1, cls.type_size)
        for e in range(x.shape[0]):
            ref = ggml_weighted_bytes(name, x[e], qw[e])
            match = (ours[e] == ref).all(axis=1)
            assert match.all(), (f"{name}/{wkind} seed {rep} expert {e}: {match.mean():.2%} of blocks match; "
                                 f"first differing {np.flatnonzero(~match)[:5]}")


def test_q8_0_quantize_matches_gguf_quantizer():
    """gguf-py's Q8_0 quantizer is documented bit-exact with ggml's reference: an independent check."""
    x = np.concatenate([make_weights("normal", 40, 8), make_weights("half_steps", 40, 9)]).reshape(-1, 32)
    np.testing.assert_array_equal(Q8_0.quantize(x), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


# Bytes of the quantized value fields and two fillers giving levels 0 and 1 of every weight's grid.
LEVEL_FIELDS = {  # name: (byte slices, level-0 filler, level-1 filler, number of levels, first level's q)
    "q2_k": ([slice(16, 80)], 0x00, 0x55, 4, 0),
    "q3_k": ([slice(0, 32), slice(32, 96)], 0x00, None, 8, -4),
    "q4_k": ([slice(16, 144)], 0x00, 0x11, 16, 0),
    "q6_k": ([slice(0, 128), slice(128, 192)], 0x00, None, 64, -32),
    "q8_0": ([slice(2, 34)], 0x00, 0x01, 256, -128),
}


def level_grid(name: str, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (float64): value of level 0 (lowest q) and the step to the next level, from the bytes."""
    cls = QUANT_TYPES[name]
    slices, fill0, fill1, _, _ = LEVEL_FIELDS[name]
    b0, b1 = q.copy(), q.copy()
    for s in slices:
        b0[:, s] = fill0
        b1[:, s] = fill0
    if name in ("q3_k", "q6_k"):  # low bits 1 in the qs/ql field, high bits 0
        b1[:, slices[1] if name == "q3_k" else slices[0]] = 0x55 if name == "q3_k" else 0x11
    else:
        b1[:, slices[0]] = fill1
    y0 = cls.dequantize_blocks(b0).astype(np.float64)
    y1 = cls.dequantize_blocks(b1).astype(np.float64)
    if name == "q8_0":  # q = 0 and q = 1; level 0 is q = -128
        return y0 - 128 * (y1 - y0), y1 - y0
    return y0, y1 - y0


@pytest.mark.parametrize("kind", ["normal", "student_t3", "per_group"])
@pytest.mark.parametrize("name", NAMES)
def test_each_weight_takes_the_nearest_level_of_its_stored_grid(name, kind):
    """The last step of every ggml quantizer re-rounds each weight to the nearest level of its decoded grid."""
    cls = QUANT_TYPES[name]
    x = make_weights(kind, 200, 11).reshape(-1, cls.block_weights)
    q = cls.quantize(x)
    y = cls.dequantize_blocks(q).astype(np.float64)
    g0, step = level_grid(name, q)
    live = step != 0
    n_levels = LEVEL_FIELDS[name][3]
    t = (x.astype(np.float64)[live] - g0[live]) / step[live]  # position on the grid, in steps
    chosen = np.rint((y[live] - g0[live]) / step[live])
    nearest = np.clip(np.rint(t), 0, n_levels - 1)
    # ggml divides by the float32 step: ties are only resolved to 1e-3 of a step here. Q8_0 rounds against
    # the un-rounded float32 d = amax/127, not the stored fp16 d: widen by how far the two grids part.
    tie_tol = 1e-3
    if name == "q8_0":
        d32 = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float64)
        t32 = (x.astype(np.float64) / np.where(d32 == 0, 1, d32) + 128)[live]
        tie_tol = tie_tol + np.abs(t32 - t)
    near_tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < tie_tol
    bad = (chosen != nearest) & ~near_tie
    # (per_group spans 5 decades of group scales: 4-6-bit sub-block scales round the smallest to zero)
    assert live.mean() > (0.2 if kind == "per_group" else 0.9)
    assert not bad.any(), f"{bad.sum()} weights off their nearest level"


# relative RMSE (RMSE / RMS of x) on N(0, 1) weights, measured 2026 with this implementation, with margin;
# the lower bound catches a quantizer that is "too good" (e.g. a dequantizer that returns its input).
REL_RMSE_BOUNDS = {"q2_k": (0.27, 0.32), "q3_k": (0.13, 0.17), "q4_k": (0.065, 0.078), "q6_k": (0.016, 0.0195),
                   "q8_0": (0.0048, 0.0059)}


@pytest.mark.parametrize("name", NAMES)
def test_error_against_float64_expectation(name):
    """RMSE in a known band, and for fine grids ≈ step/√12 (uniform rounding error), computed in float64."""
    cls = QUANT_TYPES[name]
    x = make_weights("normal", 400, 12).reshape(-1, cls.block_weights)
    q = cls.quantize(x)
    y = cls.dequantize_blocks(q).astype(np.float64)
    err = y - x.astype(np.float64)
    rel = np.sqrt(np.mean(err ** 2) / np.mean(x.astype(np.float64) ** 2))
    lo, hi = REL_RMSE_BOUNDS[name]
    assert lo < rel < hi, rel
    if name in ("q4_k", "q6_k", "q8_0"):  # enough levels for the uniform-error model to hold in range
        g0, step = level_grid(name, q)
        t = (x - g0) / step
        inside = (t > 0.5) & (t < LEVEL_FIELDS[name][3] - 1.5)
        expected = np.sqrt(np.mean(step[inside] ** 2) / 12)
        # ≤ the uniform model (the scale/min searches fit the grid to the data), never far below it
        assert 0.8 < np.sqrt(np.mean(err[inside] ** 2)) / expected < 1.05


# Re-quantizing a dequantized tensor: exact for Q8_0 (the grid max maps to ±127 again), near for the others.
IDEMPOTENCE_MAX_DRIFT = {"q2_k": 0.08, "q3_k": 0.35, "q4_k": 0.01, "q6_k": 0.01, "q8_0": 0.0}


@pytest.mark.parametrize("name", NAMES)
def test_requantizing_dequantized_weights_is_near_idempotent(name):
    cls = QUANT_TYPES[name]
    x = make_weights("normal", 300, 13)
    q = cls.quantize(x)
    y = cls.dequantize(q, x.shape)
    q2 = cls.quantize(y)
    y2 = cls.dequantize(q2, x.shape)
    if name == "q8_0":
        np.testing.assert_array_equal(q2, q)
    drift = np.sqrt(np.mean((y2 - y) ** 2)) / np.sqrt(np.mean((y - x) ** 2))
    assert drift <= IDEMPOTENCE_MAX_DRIFT[name], drift


@pytest.mark.parametrize("name", NAMES)
def test_zero_blocks_quantize_to_zero_bytes(name):
    cls = QUANT_TYPES[name]
    q = cls.quantize(np.zeros((2, 512), np.float32))
    assert not q.any()
    assert not cls.dequantize(q, (2, 512)).any()


@pytest.mark.parametrize("value", [0.37, -0.37, 5.0, -2.5e-2])
@pytest.mark.parametrize("name", NAMES)
def test_constant_blocks_round_trip(name, value):
    cls = QUANT_TYPES[name]
    x = np.full((1, 256), value, np.float32)
    y = cls.dequantize(cls.quantize(x), x.shape)
    assert np.ptp(y) == 0  # one level for all
    # fp16 scale rounding only; Q6_K's d (= group scale / 128) is an fp16 subnormal for |x| < 0.25
    tol = 1e-2 if name == "q6_k" and abs(value) < 0.25 else 1e-3
    assert abs(float(y[0, 0]) - value) <= tol * abs(value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_input_raises(name, bad):
    x = np.ones((1, 256), np.float32)
    x[0, 17] = bad
    with pytest.raises(ValueError, match="non-finite"):
        QUANT_TYPES[name].quantize(x)


def test_shape_and_size_errors():
    with pytest.raises(ValueError, match="multiple of 256"):
        QUANT_TYPES["q4_k"].quantize(np.ones((2, 100), np.float32))
    with pytest.raises(ValueError, match="needs 288"):
        QUANT_TYPES["q4_k"].dequantize(np.zeros(144, np.uint8), (2, 256))
    with pytest.raises(ValueError, match="unknown quant format"):
        get_quant("q5_z")


def test_requantize_is_dequantize_then_quantize_and_keeps_shape():
    x = make_weights("student_t3", 16, 14).reshape(4, 1024)
    q4 = QUANT_TYPES["q4_k"].quantize(x)
    q2 = requantize(q4, "q4_k", "q2_k", x.shape)
    assert q2.shape == (4, 1024 // 256 * 84)
    np.testing.assert_array_equal(q2, QUANT_TYPES["q2_k"].quantize(QUANT_TYPES["q4_k"].dequantize(q4, x.shape)))
    # compounding never beats quantizing the float weights directly by much, and costs little
    e_direct = np.sqrt(np.mean((quants.dequantize(quants.quantize(x, "q2_k"), "q2_k", x.shape) - x) ** 2))
    e_requant = np.sqrt(np.mean((quants.dequantize(q2, "q2_k", x.shape) - x) ** 2))
    assert 0.95 * e_direct < e_requant < 1.2 * e_direct


# ---------------------------------------------------------------------------------------------------
# helpers and random inputs
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, 64, elements=st.floats(-4e6, 4e6, width=32)))
def test_nearest_int_is_round_half_even(v):
    np.testing.assert_array_equal(nearest_int(v), np.rint(v).astype(np.int32))


def test_nearest_int_out_of_range_follows_ggml_bit_trick():
    # 4194303.5 + 1.5*2^23 rounds (ties to even) to 2^24, whose mantissa is 0 → 0 - 2^22 in ggml's C;
    # 1e30f is 0x7149F2CA: mantissa 0x49F2CA - 0x400000 = 651978; NaN's mantissa 0x400000 → 0
    v = np.array([4194303.5, -4194303.5, 1e30, np.nan], np.float32)
    np.testing.assert_array_equal(nearest_int(v), [-4194304, -4194304, 651978, 0])


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, 32, elements=st.floats(-1e9, 1e9, width=32) | st.just(np.float32(np.nan))))
def test_fast_clipped_rounding_equals_clipped_nearest_int(v):
    np.testing.assert_array_equal(quants._nint_f32(v, -4, 3), np.clip(nearest_int(v), -4, 3).astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES),
       x=hnp.arrays(np.float32, 512, elements=st.floats(-1e3, 1e3, width=32)))
def test_random_inputs_round_trip_through_gguf(name, x):
    cls = QUANT_TYPES[name]
    q = cls.quantize(x.reshape(1, -1))
    ours = cls.dequantize(q, (1, 512))
    np.testing.assert_array_equal(ours.reshape(-1, cls.block_weights),
                                  gguf_dequantize(q.reshape(-1, cls.type_size), gguf_type(name)))
    scale = float(np.abs(x).max()) or 1.0
    assert np.abs(ours - x).max() <= scale  # never worse than the block's own range


# ---------------------------------------------------------------------------------------------------
# weighted (imatrix) quantization without the C library
# ---------------------------------------------------------------------------------------------------
# crc32 of the bytes that commit fc69b46 (checked byte-identical with ggml's quantize_row_*_ref on 480,000
# blocks) wrote for these inputs: quant_weights=None must keep ggml's reference path bit for bit.
REFERENCE_PATH_CRC32 = {"q2_k": 0xCECDF8F5, "q3_k": 0x34C4F148, "q4_k": 0x9FD2B439, "q6_k": 0xDBF14C52,
                        "q8_0": 0x193CABCD}


@pytest.mark.parametrize("name", NAMES)
def test_no_quant_weights_keeps_reference_bytes(name):
    x = np.concatenate([make_weights(k, 64, seed=i) for i, k in enumerate(X_KINDS)])
    cls = QUANT_TYPES[name]
    q = cls.quantize(x)
    assert zlib.crc32(q.tobytes()) == REFERENCE_PATH_CRC32[name]
    np.testing.assert_array_equal(cls.quantize(x, quant_weights=None), q)


def weighted_sq_error(name: str, x: np.ndarray, qw: np.ndarray | None, score: np.ndarray) -> float:
    """Σ score_j (y - x)² in float64 for x quantized with quant_weights qw."""
    cls = QUANT_TYPES[name]
    y = cls.dequantize(cls.quantize(x, qw), x.shape).astype(np.float64)
    return float((((y - x.astype(np.float64)) ** 2) * score).sum())


# Weighted squared error Σ qw·(y-x)², quant_weights=qw over None, on N(0,1) rows with lognormal(0, 1.5)
# column weights: measured 0.46-0.52 (Q2_K), 0.64-0.69 (Q3_K), 0.62-0.69 (Q4_K), 0.70-0.74 (Q6_K) over seeds
# 0-2. The bound leaves a margin; a path that ignored the weights would sit at 1.
WEIGHTED_ERROR_RATIO_MAX = {"q2_k": 0.62, "q3_k": 0.8, "q4_k": 0.8, "q6_k": 0.85}


@pytest.mark.parametrize("name", K_NAMES)
def test_quant_weights_reduce_the_weighted_error(name):
    rng = np.random.default_rng(21)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    qw = np.exp(rng.normal(0, 1.5, 1024)).astype(np.float32)
    ratio = weighted_sq_error(name, x, qw, qw) / weighted_sq_error(name, x, None, qw)
    assert 0.3 < ratio < WEIGHTED_ERROR_RATIO_MAX[name], ratio
    # the error moves to the unimportant columns: the plain (unweighted) error does not drop
    plain = weighted_sq_error(name, x, qw, np.ones(1024)) / weighted_sq_error(name, x, None, np.ones(1024))
    assert plain > 0.97, plain


@pytest.mark.parametrize("name", K_NAMES)
def test_important_columns_get_smaller_errors_than_unimportant_ones(name):
    """Columns of weight 100 beside columns of weight 1: their mean squared error is clearly smaller."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    important = rng.random(1024) < 0.25
    qw = np.where(important, 100.0, 1.0).astype(np.float32)
    cls = QUANT_TYPES[name]
    err = (cls.dequantize(cls.quantize(x, qw), x.shape).astype(np.float64) - x) ** 2
    assert err[:, important].mean() < 0.8 * err[:, ~important].mean()


@pytest.mark.parametrize("name", NAMES)
def test_power_of_two_weight_scaling_gives_the_same_bytes(name):
    """Only relative importance matters: ×2^k is exact in float32, so the bytes must not move."""
    x = make_weights("student_t3", 64, 23).reshape(16, 1024)
    qw = make_quant_weights("lognormal", (1024,), 23)
    q = QUANT_TYPES[name].quantize(x, qw)
    for factor in (np.float32(8), np.float32(2.0 ** -20)):
        np.testing.assert_array_equal(QUANT_TYPES[name].quantize(x, qw * factor), q)


@pytest.mark.parametrize("name", NAMES)
def test_all_equal_weights_are_ggmls_imatrix_path_not_the_reference_path(name):
    """Constant weights select ggml's weighted search (documented): other bytes than None for the K-quants,
    and no worse a plain RMSE (measured 0.82 Q2_K, 0.92 Q3_K, 0.98 Q4_K, 0.95 Q6_K of the reference's)."""
    x = make_weights("normal", 256, 24).reshape(64, 1024)
    cls = QUANT_TYPES[name]
    q_ones, q_none = cls.quantize(x, np.ones(1024, np.float32)), cls.quantize(x)
    np.testing.assert_array_equal(cls.quantize(x, np.full(1024, 0.5, np.float32)), q_ones)
    if name == "q8_0":  # ggml's quantize_q8_0 ignores quant_weights
        np.testing.assert_array_equal(q_ones, q_none)
        return
    assert (q_ones != q_none).any(axis=1).mean() > 0.5
    ones = np.ones(x.shape[1])
    err_ones = weighted_sq_error(name, x, np.ones(1024, np.float32), ones)
    assert err_ones < weighted_sq_error(name, x, None, ones)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("wkind", ["lognormal", "one_hot", "sparse", "overflow"])
@pytest.mark.parametrize("name", NAMES)
def test_weighted_bytes_dequantize_like_gguf_and_land_on_the_nearest_level(name, wkind):
    """Weighted bytes are valid blocks (gguf's dequantizer agrees bit for bit) and keep ggml's last step:
    every weight of a group with a nonzero stored scale takes the nearest level of its decoded grid."""
    cls = QUANT_TYPES[name]
    x = make_weights("normal", 64, 25).reshape(16, 1024)
    qw = make_quant_weights(wkind, (1024,), 25)
    q = cls.quantize(x, qw).reshape(-1, cls.type_size)
    y = cls.dequantize_blocks(q)
    ref = gguf_dequantize(q, gguf_type(name))
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    g0, step = level_grid(name, q)
    live = (step != 0) & np.isfinite(step)
    xb = x.reshape(-1, cls.block_weights).astype(np.float64)
    t = (xb[live] - g0[live]) / step[live]
    chosen = np.rint((y.astype(np.float64)[live] - g0[live]) / step[live])
    nearest = np.clip(np.rint(t), 0, LEVEL_FIELDS[name][3] - 1)
    near_tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-3
    if name == "q8_0":  # rounds against the float32 d, not the stored fp16 one (see the unweighted test)
        near_tie |= np.abs(chosen - nearest) <= 1
    assert not ((chosen != nearest) & ~near_tie).any()


def test_quant_weights_per_matrix_equal_quantizing_each_matrix_alone():
    """(E, N, K) with (E, K) weights: expert e's rows use row e, as llama-quantize passes imatrix + e*K."""
    x = make_weights("normal", 48, 26).reshape(3, 4, 1024)
    qw = make_quant_weights("lognormal", (3, 1024), 26)
    for name in K_NAMES:
        cls = QUANT_TYPES[name]
        q = cls.quantize(x, qw)
        for e in range(3):
            np.testing.assert_array_equal(q[e], cls.quantize(x[e], qw[e]))
        shared = cls.quantize(x, np.broadcast_to(qw[0], (3, 1024)))
        np.testing.assert_array_equal(cls.quantize(x, qw[0]), shared)
    # more rows than one chunk, so per-chunk weight slicing is exercised
    big = make_weights("normal", 2 * quants.QUANT_CHUNK_BLOCKS + 8, 27).reshape(-1, 2048)
    wbig = make_quant_weights("lognormal", (2048,), 27)
    q = QUANT_TYPES["q4_k"].quantize(big, wbig)
    np.testing.assert_array_equal(q[-3:], QUANT_TYPES["q4_k"].quantize(big[-3:], wbig))


@pytest.mark.parametrize("bad, match", [
    (np.ones(512, np.float32), "quant_weights has shape"),
    (np.ones((2, 1024), np.float32), "quant_weights has shape"),
    (-np.ones(1024, np.float32), "negative or non-finite"),
    (np.full(1024, np.nan, np.float32), "negative or non-finite"),
    (np.full(1024, np.inf, np.float32), "negative or non-finite"),
])
def test_bad_quant_weights_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        QUANT_TYPES["q4_k"].quantize(np.ones((3, 1024), np.float32), bad)


@pytest.mark.parametrize("name", K_NAMES)
def test_a_block_of_zero_importance_dequantizes_to_zero(name):
    """ggml's weighted fits have nothing to fit when a whole 256-block weighs 0 (dead columns): its
    super-block scale comes out 0 and the block dequantizes to zeros (Q6_K writes an all-zero block).
    Other blocks of the row are unaffected. (The opt-in test checks these bytes against ggml: one_hot,
    sparse.)"""
    x = make_weights("normal", 8, 28).reshape(2, 1024)
    qw = np.ones(1024, np.float32)
    qw[256:512] = 0
    cls = QUANT_TYPES[name]
    q = cls.quantize(x, qw)
    y = cls.dequantize(q, x.shape)
    assert not y[:, 256:512].any()
    live = np.r_[0:256, 512:1024]
    rel_rmse = np.sqrt(np.mean((y[:, live] - x[:, live]) ** 2) / np.mean(x[:, live] ** 2))
    assert rel_rmse < REL_RMSE_BOUNDS[name][1], rel_rmse
    if name == "q6_k":
        assert not q.reshape(2, 4, -1)[:, 1].any()
