"""jaxmoe.quants_jax.dequantize_jnp equals the numpy dequantizer bit for bit (CPU JAX, eager and jit)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.quants import QUANT_TYPES

jax = pytest.importorskip("jax")
from jaxmoe.quants_jax import dequantize_jnp

NAMES = list(QUANT_TYPES)


N_BLOCKS = 256  # one shape for every case: eager JAX compiles each op once per shape


def _cases(name: str) -> dict[str, np.ndarray]:
    cls = QUANT_TYPES[name]
    rng = np.random.default_rng(21)
    x = rng.standard_normal((N_BLOCKS, cls.block_weights)) * np.exp(rng.uniform(-10, 5, (N_BLOCKS, 1)))
    zero = np.zeros((N_BLOCKS, cls.type_size), np.uint8)
    return {
        "quantized_wide": cls.quantize(x.astype(np.float32)),
        "random_bytes": rng.integers(0, 256, (N_BLOCKS, cls.type_size), dtype=np.uint8),  # incl. Inf/NaN scales
        "zero": zero,
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name, jit", [(n, True) for n in NAMES] + [("q2_k", False)])  # eager: slow to compile
def test_dequantize_jnp_bit_exact_vs_numpy(name, jit):
    cls = QUANT_TYPES[name]
    fn = jax.jit(dequantize_jnp, static_argnums=0) if jit else dequantize_jnp
    for case, blocks in _cases(name).items():
        ref = cls.dequantize_blocks(blocks)
        got = np.asarray(fn(name, blocks))
        assert got.dtype == np.float32 and got.shape == (blocks.shape[0], cls.block_weights), case
        finite = np.isfinite(ref)
        np.testing.assert_array_equal(got.view(np.uint32)[finite], ref.view(np.uint32)[finite], err_msg=case)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=case)
        np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)], err_msg=case)


def test_dequantize_jnp_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown quant format"):
        dequantize_jnp("q5_z", np.zeros((1, 144), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(n, 144\)"):
        dequantize_jnp("q4_k", np.zeros((1, 143), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_jnp("q4_k", np.zeros((1, 144), np.int32))


def test_numpy_module_does_not_import_jax():
    """The simulator imports jaxmoe.quants without JAX: the module must not pull it in."""
    import subprocess
    import sys

    code = "import sys, jaxmoe.quants; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
