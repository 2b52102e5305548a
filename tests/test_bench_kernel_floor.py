"""The floor benchmark's read-only launches read exactly the kernel's bytes (Pallas interpret mode on CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_kernel_floor as bf

from jaxmoe.kernels import expert_ffn as ef


def _fold_numpy(planes: dict, e: int, rows: slice) -> int:
    """Wrapping uint32 sum of the bit patterns of one row tile's qs, sc, d, dmin (what `_fold` computes)."""
    total = 0
    for name in ("qs", "sc", "d", "dmin"):
        a = np.asarray(planes[name][e, rows])
        a = a.view(np.uint16) if a.dtype == np.float16 else a
        total += int(a.astype(np.uint64).sum())
    return total % 2**32


@pytest.fixture(scope="module")
def case():
    bank = ef.random_bank("q2_k", 10, bf.HIDDEN, bf.FFN, seed=3)
    ids = jnp.array([9, 0, 4, 4, 7, 1, 2, 5], jnp.int32)
    return bank, ids, bf.floor_calls(interpret=True)


def test_read_launches_fold_the_kernel_tiles(case):
    bank, ids, calls = case
    got_a = np.asarray(calls["read_a"](bank, ids))
    got_b = np.asarray(calls["read_b"](bank, ids))
    assert got_a.shape == (8, bf.FFN // bf.ROWS) and got_b.shape == (8, bf.HIDDEN // bf.ROWS)
    for g, j in [(0, 0), (3, 47), (7, 20)]:
        rows = slice(j * bf.ROWS, (j + 1) * bf.ROWS)
        e = int(ids[g])
        assert got_a[g, j] == _fold_numpy(bank["gate"], e, rows) ^ _fold_numpy(bank["up"], e, rows)
    for g, j in [(1, 0), (5, 127)]:
        assert got_b[g, j] == _fold_numpy(bank["down"], int(ids[g]), slice(j * bf.ROWS, (j + 1) * bf.ROWS))
    ab = np.asarray(calls["read_ab"](bank, ids))
    np.testing.assert_array_equal(ab[:, :bf.FFN // bf.ROWS], got_a)
    np.testing.assert_array_equal(ab[:, bf.FFN // bf.ROWS:], got_b)


@pytest.mark.parametrize("name", ["read_a_persistent_p132_s1", "read_a_prefetch_p264"])
def test_persistent_launches_cover_every_tile(case, name):
    # Each (expert, tile) is folded an odd number of times across programs, so the XOR over programs equals read_a's.
    bank, ids, calls = case
    want = np.bitwise_xor.reduce(np.asarray(calls["read_a"](bank, ids)).reshape(-1))
    assert np.bitwise_xor.reduce(np.asarray(calls[name](bank, ids))) == want
