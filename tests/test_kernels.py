"""Expert FFN: jnp reference against float64 numpy (gguf dequantizer), Pallas kernel in interpret mode, GPU runs."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmoe.kernels import dequant_fma, int_dot, repack
from jaxmoe.kernels import expert_ffn as ef

try:  # the GPU machine's image lacks gguf: there the numpy plane dequantizer (tested against gguf here) stands in
    import gguf
    from gguf import GGMLQuantizationType as T

    QTYPE = {"q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K}
except ImportError:
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package")


def dequant64(raw, fmt):
    """float64 weights of GGUF bytes: the gguf package where installed, else repack's numpy dequantizer."""
    if gguf is not None:
        return gguf.quants.dequantize(raw, QTYPE[fmt]).astype(np.float64)
    return repack.dequantize_planes(repack.pack(raw, fmt), fmt).astype(np.float64)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_case(fmt, n_experts, hidden, ffn, seed):
    rng = np.random.default_rng(seed)
    raw = {"gate": repack.random_gguf(fmt, ffn, hidden, rng, lead=(n_experts,)),
           "up": repack.random_gguf(fmt, ffn, hidden, rng, lead=(n_experts,)),
           "down": repack.random_gguf(fmt, hidden, ffn, rng, lead=(n_experts,))}
    return raw, ef.bank_from_gguf(raw["gate"], raw["up"], raw["down"], fmt)


def numpy_ffn(x, raw, ids, fmt):
    """float64 oracle from the gguf package's dequantizer."""
    out = []
    for e in ids:
        wg, wu, wd = (dequant64(raw[k][e], fmt) for k in ("gate", "up", "down"))
        g, u = x @ wg.T, x @ wu.T
        out.append((g / (1 + np.exp(-g)) * u) @ wd.T)
    return np.stack(out)


@needs_gguf
@pytest.mark.parametrize("fmt", repack.FORMATS)
def test_jnp_dequant_bit_exact(fmt):
    raw, bank = make_case(fmt, 2, 512, 256, seed=5)
    for k in ("gate", "up", "down"):
        np.testing.assert_array_equal(np.asarray(ef.dequantize_jnp(bank[k], fmt)),
                                      gguf.quants.dequantize(raw[k], QTYPE[fmt]))


@pytest.mark.parametrize("fmt", repack.FORMATS + ("bf16",))
def test_reference_and_xla_against_float64(fmt):
    if fmt == "bf16":
        bank = ef.random_bank("bf16", 3, 256, 256, seed=1)
        wts = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in bank.items()}
        x = np.random.default_rng(7).standard_normal((4, 256))
        ids = [2, 0]
        gates, ups = ([x @ wts[k][e].T for e in ids] for k in ("gate", "up"))
        want = np.stack([(g / (1 + np.exp(-g)) * u) @ wts["down"][e].T for g, u, e in zip(gates, ups, ids)])
    else:
        raw, bank = make_case(fmt, 3, 512, 256, seed=7)
        x = np.random.default_rng(7).standard_normal((4, 512))
        ids = [2, 0]
        want = numpy_ffn(x, raw, ids, fmt)
    xj = jnp.asarray(x, jnp.float32)
    assert rel_err(ef.expert_ffn(xj, bank, jnp.array(ids), fmt=fmt), want) < 1e-5
    assert rel_err(ef.expert_ffn(xj, bank, jnp.array(ids), fmt=fmt, implementation="xla"), want) < 2e-2


# v3 "fma": float activations, float32 dequantization and accumulation → float32 rounding only;
# v4 "int": int16 activations (x and h) → ≈ 1e-5 per value.
@pytest.mark.parametrize("variant,tol", [("fma", 1e-5), ("int", 2e-4)])
@pytest.mark.parametrize("fmt,block_m", [("q2_k", 1), ("q3_k", 2), ("q4_k", 2)])
def test_fma_and_int_kernels_interpret_match_float64(variant, tol, fmt, block_m):
    # Down projection of 3 super-blocks (tiles of 2 + 1), 3 tokens (padded to 4 when block_m = 2), repeated id.
    raw, bank = make_case(fmt, 3, 256, 768, seed=21)
    x = jnp.asarray(np.random.default_rng(22).standard_normal((3, 256)), jnp.bfloat16)
    ids = jnp.array([2, 2, 0], jnp.int32)
    cfg = ef.BlockConfig(block_n_up=256, block_n_down=128, block_m=block_m, variant=variant)
    got = ef.expert_ffn(x, bank, ids, fmt=fmt, implementation="pallas", block_config=cfg, interpret=True)
    assert got.shape == (3, 3, 256) and got.dtype == jnp.float32
    assert rel_err(got, numpy_ffn(np.asarray(x, np.float64), raw, [2, 2, 0], fmt)) < tol


@pytest.mark.parametrize("fmt", repack.FORMATS)
def test_v3_mma_interpret_matches_float64(fmt):
    # bf16 tensor-core path: M = 3 padded to the 16-token tile; bf16 operands → bf16-level error, like XLA's
    raw, bank = make_case(fmt, 2, 256, 768, seed=23)
    x = jnp.asarray(np.random.default_rng(24).standard_normal((3, 256)), jnp.bfloat16)
    ids = jnp.array([1, 0], jnp.int32)
    cfg = ef.BlockConfig(block_n_up=256, block_n_down=128, block_m=16, variant="mma")
    got = ef.expert_ffn(x, bank, ids, fmt=fmt, implementation="pallas", block_config=cfg, interpret=True)
    want = numpy_ffn(np.asarray(x, np.float64), raw, [1, 0], fmt)
    err = rel_err(got, want)
    assert 1e-5 < err < 1e-2  # bf16 rounding is visible, and bounded
    assert err < 2 * rel_err(ef.expert_ffn(x, bank, ids, fmt=fmt, implementation="xla"), want)


@pytest.mark.parametrize("fmt,variant,block_m", [("q2_k", "fma", 1), ("q4_k", "mma", 16)])
def test_v3_split_gate_up_interpret(fmt, variant, block_m):
    # Gate and up rows in separate programs; launch B applies SiLU(gate)·up while loading.
    raw, bank = make_case(fmt, 2, 256, 512, seed=25)
    x = jnp.asarray(np.random.default_rng(26).standard_normal((2, 256)), jnp.bfloat16)
    ids = jnp.array([1, 0], jnp.int32)
    cfg = ef.BlockConfig(block_n_up=128, block_n_down=128, block_m=block_m, variant=variant, split_up=True)
    got = ef.expert_ffn(x, bank, ids, fmt=fmt, implementation="pallas", block_config=cfg, interpret=True)
    assert rel_err(got, numpy_ffn(np.asarray(x, np.float64), raw, [1, 0], fmt)) < (1e-5 if variant == "fma" else 1e-2)


def test_v4_int_kernel_equals_its_quantized_reference():
    # The kernel computes exactly the FFN of the int16-quantized x and h (up to float32 summation order).
    raw, bank = make_case("q2_k", 2, 512, 256, seed=31)
    x = jnp.asarray(np.random.default_rng(32).standard_normal((2, 512)) * 3, jnp.float32)
    ids = jnp.array([1, 0], jnp.int32)
    got = int_dot.ffn(x, bank, ids, "q2_k", block_n_up=32, block_n_down=64, interpret=True)
    xq = int_dot.dequantize_int16(*int_dot.quantize_int16(x)[:2])
    wg, wu, wd = (np.stack([dequant64(raw[k][e], "q2_k") for e in (1, 0)]) for k in ("gate", "up", "down"))
    xq64 = np.asarray(xq, np.float64)
    g, u = np.einsum("mk,gnk->gmn", xq64, wg), np.einsum("mk,gnk->gmn", xq64, wu)
    hq = int_dot.dequantize_int16(*int_dot.quantize_int16(jnp.asarray(g / (1 + np.exp(-g)) * u, jnp.float32))[:2])
    want = np.einsum("gmk,gnk->gmn", np.asarray(hq, np.float64), wd)
    assert rel_err(got, want) < 1e-5


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-6, 1e4), zero_block=st.booleans())
def test_int16_activation_quantization(seed, scale, zero_block):
    # Every value within half a step (plus float32 rounding: ≈ 32767 ulps of 1) of its code, step = max|block| / 32767; a zero block stays zero.
    x = np.random.default_rng(seed).standard_normal((3, 64)).astype(np.float32) * np.float32(scale)
    if zero_block:
        x[1, 16:32] = 0
    words, step, sums = (np.asarray(a) for a in int_dot.quantize_int16(jnp.asarray(x)))
    assert words.shape == (3, 32) and words.dtype == np.uint32 and step.shape == sums.shape == (3, 4)
    back = np.asarray(int_dot.dequantize_int16(jnp.asarray(words), jnp.asarray(step)), np.float64)
    blocks = np.abs(x.astype(np.float64)).reshape(3, 4, 16).max(axis=-1)
    np.testing.assert_allclose(step, blocks / 32767, rtol=1e-6)
    assert np.all(np.abs(back - x).reshape(3, 4, 16) <= 0.505 * step[..., None] + 1e-30)  # float32 x·(32767/max)
    np.testing.assert_allclose(sums, back.reshape(3, 4, 16).sum(axis=-1), rtol=1e-5, atol=1e-6 * scale)
    if zero_block:
        assert np.all(back[1, 16:32] == 0) and step[1, 1] == 0


def test_pallas_quantization_launch_equals_jnp():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((3, 512)) * 5, jnp.bfloat16).at[1, 32:48].set(0)
    for a, b in zip(int_dot.quantize_int16(x), int_dot.quantize_pallas(x, interpret=True)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dp2a_emulation_matches_bytes():
    rng = np.random.default_rng(5)
    q = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
    xv = rng.integers(-32767, 32768, (64, 4))
    lo = ((xv[:, 0] & 0xFFFF) | ((xv[:, 1] & 0xFFFF) << 16)).astype(np.uint32)
    hi = ((xv[:, 2] & 0xFFFF) | ((xv[:, 3] & 0xFFFF) << 16)).astype(np.uint32)
    got = np.asarray(int_dot._dp2a_pair(jnp.asarray(q), jnp.asarray(lo), jnp.asarray(hi), use_asm=False))
    want = sum(((q.astype(np.int64) >> (8 * i)) & 0xFF) * xv[:, i] for i in range(4))
    np.testing.assert_array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(word=st.integers(0, 2**32 - 1), lane=st.integers(0, 3), s=st.integers(0, 3), bits=st.sampled_from([2, 3, 4]))
def test_magic_field_is_exact(word, lane, s, bits):
    # The kernel's int→float trick: (w & (mask << pos)) | 0x4B000000 read as float32 is 2²³ + field·2^pos,
    # for the fields it uses (lanes 0-1 of a word, lanes 2-3 after >> 16; pos ≤ 14 + 2 bits).
    shift = bits if bits == 4 else 2
    if s * shift + bits > 8 + 2 * shift:  # beyond the slices of one byte lane
        return
    src = word & 0xFFFF if lane < 2 else word >> 16
    pos = 8 * (lane % 2) + shift * s
    mask = (1 << bits) - 1
    f = np.asarray(dequant_fma._field(jnp.uint32(src), pos, mask))
    assert float(f) - 2.0**23 == float(((src >> pos) & mask) << pos)
    scale = np.float32(np.random.default_rng(word).uniform(1e-4, 1.0))
    got = np.asarray(dequant_fma._dequant(jnp.float32(f), jnp.float32(scale), use_asm=False))
    assert got == np.float32(np.float64((src >> pos) & mask) * 2.0**pos * np.float64(scale))  # one rounding


def test_default_config_by_token_count():
    assert ef.default_config(1).variant == "int" and ef.default_config(1).block_m == 1
    assert ef.default_config(8).variant == "int" and ef.default_config(8).block_m == 2
    assert ef.default_config(64).variant == "mma" and ef.default_config(64).block_m == 64
    with pytest.raises(ValueError, match="block_m"):
        dequant_fma.ffn(jnp.ones((1, 256)), make_case("q2_k", 1, 256, 256, 0)[1], jnp.array([0]), "q2_k",
                        block_n_up=256, block_n_down=256, block_m=8, mma=True, interpret=True)


def test_bad_arguments():
    _, bank = make_case("q4_k", 1, 256, 256, seed=0)
    x = jnp.ones((1, 256), jnp.float32)
    with pytest.raises(ValueError, match="implementation"):
        ef.expert_ffn(x, bank, jnp.array([0]), fmt="q4_k", implementation="cuda")
    with pytest.raises(ValueError, match="power of 2"):
        ef.expert_ffn(x, bank, jnp.array([0]), fmt="q4_k", implementation="pallas",
                      block_config=ef.BlockConfig(block_n_up=48), interpret=True)
    with pytest.raises(ValueError, match="format"):
        ef.expert_ffn(x, bank, jnp.array([0]), fmt="q6_k")
    with pytest.raises(ValueError, match="variant"):
        ef.expert_ffn(x, bank, jnp.array([0]), fmt="q4_k", implementation="pallas",
                      block_config=ef.BlockConfig(block_n_up=256, block_n_down=256, variant="tiles"), interpret=True)
    with pytest.raises(ValueError, match="split_up"):
        ef.expert_ffn(x, bank, jnp.array([0]), fmt="q4_k", implementation="pallas",
                      block_config=ef.BlockConfig(variant="int", split_up=True), interpret=True)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", repack.FORMATS)
def test_gpu_v3_kernels_match_reference(fmt):
    # Full Qwen3-30B-A3B expert shapes, a 16-expert bank, fresh random inputs per case.
    raw, bank = make_case(fmt, 16, 2048, 768, seed=100)
    rng = np.random.default_rng(200)
    cases = [(1, 8, ef.BlockConfig(), 1e-5),  # default M = 1 kernels (float32 FMAs)
             (16, 8, ef.BlockConfig(block_m=16, variant="mma"), 1e-2)]  # tensor cores, bf16 operands
    if fmt == "q2_k":  # padding paths (M = 3 in 2-token programs, M = 5 in a 16-token tile) and split gate/up
        cases += [(1, 8, ef.BlockConfig(split_up=True), 1e-5),
                  (16, 4, ef.BlockConfig(block_n_up=32, block_m=16, variant="mma", split_up=True), 1e-2),(3, 1, ef.BlockConfig(block_n_up=4, num_warps_up=1, block_n_down=8, num_warps_down=1, block_m=2), 1e-5),
                  (5, 2, ef.BlockConfig(block_m=16, variant="mma"), 1e-2),
                  (3, 8, ef.BlockConfig(block_n_up=32, num_warps_up=8, block_n_down=16, block_m=2, variant="int"), 2e-4)]
    cases.append((1, 8, ef.BlockConfig(variant="int"), 2e-4))  # v4 integer dots, int16 activations
    for m, g, cfg, tol in cases:
        ids = rng.choice(16, g, replace=False)
        x = rng.standard_normal((m, 2048))
        got = jax.block_until_ready(ef.expert_ffn(jnp.asarray(x, jnp.bfloat16), bank, jnp.asarray(ids, jnp.int32),
                                                  fmt=fmt, implementation="pallas", block_config=cfg))
        want = numpy_ffn(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), raw, ids, fmt)  # float64 oracle
        assert rel_err(got, want) < tol, (fmt, m, g, cfg.variant, rel_err(got, want))


def test_h200_profile_rebuilds_from_the_kept_measurements(tmp_path):
    # results/ keeps the data the h200 profile rests on (results/README.md): run 8's kernel benchmark and
    # run 2's transfers and dense layer. build_profile turns them into the profile the simulator loads.
    import json
    from pathlib import Path

    from jaxmoe import calibrate
    from sim.profiles import load_hardware

    root = Path(__file__).resolve().parents[1]
    bench_path, raw_path = root / "results" / "run8_v4c" / "bench_kernels.json", root / "results" / "run2_v2" / "calibrate_raw.json"
    if not (bench_path.exists() and raw_path.exists()):
        pytest.skip("device run files absent")
    bench, raw = json.loads(bench_path.read_text()), json.loads(raw_path.read_text())
    profile = calibrate.build_profile(bench, raw["dense"], raw["transfers"], raw["device"], "test")
    out = tmp_path / "h200.json"
    out.write_text(json.dumps(profile))
    hw = load_hardware(str(out))
    assert hw.compute_tokens.tolist() == [1, 2, 4, 8, 16, 64]
    cell = next(c for c in bench["cells"] if (c["fmt"], c["m"], c["g"]) == ("q2_k", 1, 8))
    assert hw.grouped_s["q2_k"][0] == cell["total_s"] == pytest.approx(11.9e-6, abs=0.05e-6)  # run 8's headline
    assert hw.compute_s["q2_k"][0] < hw.grouped_s["q2_k"][0] < hw.grouped_s["bf16"][0]
    assert profile["expert_compute"]["variants"]["q2_k"] == ["int"] * 4 + ["mma"] * 2
    committed = json.loads((root / "sim" / "profiles" / "h200.json").read_text())
    if "run8_v4c" in committed["source"]:  # the committed profile is exactly these measurements
        for key in ("gpu", "vram_bytes", "vram_gbps", "hbm_copy_gbps", "transfer", "expert_compute", "dense_compute"):
            assert profile[key] == committed[key], key
    bad = dict(bench, cells=[])
    with pytest.raises(calibrate.InputError):
        calibrate.build_profile(bad, raw["dense"], raw["transfers"], raw["device"], "test")


def test_fit_linear_recovers_fixed_and_bandwidth():
    from jaxmoe.calibrate import fit_linear

    n = np.array([2**16, 2**20, 2**24, 2**26], np.float64)
    fixed, gbps = fit_linear(n, 1.5e-4 + n / 30e9)
    assert fixed == pytest.approx(1.5e-4, rel=1e-6) and gbps == pytest.approx(30.0, rel=1e-6)
