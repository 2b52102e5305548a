"""Shared fixtures: where the read-only shared data lives (a skip when it is absent), a tiny synthesized trace;
hypothesis profiles.

Hypothesis profiles govern the property tests that leave `max_examples` to the profile (the cache
invariants of test_cache_properties.py):
- `ci`: 2,000 examples per test (7 tests: 14,000 examples over the cache invariants; 153 s measured on
  the project's shared 2-core machine, against about 14 s for the 2,000 examples before); .ci/run selects it.
  Derandomized: the same examples on every run, so a landing never depends on which random cases
  one CI run happened to draw (a divergence found by a random draw is kept as an explicit test instead:
  tests/test_engine_compiled.py::test_lfu_priority_that_falls_with_the_age).
- `dev`: 100 random examples per test, for quick local runs (they keep exploring new cases).
HYPOTHESIS_PROFILE picks one by name; unset, it is `ci` when the CI variable is set, else `dev`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_QWEN_CSV = SHARED / "traces" / "bigmoeonedge" / "qwen.route.csv"


@pytest.fixture
def shared_qwen_csv() -> Path:
    """The real Qwen3-30B-A3B route CSV from ../shared (skip when a fresh clone lacks it)."""
    if not SHARED_QWEN_CSV.exists():
        pytest.skip(f"shared data absent: {SHARED_QWEN_CSV} (only in the project's workspace)")
    return SHARED_QWEN_CSV


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory) -> Path:
    """A Qwen3-30B-A3B-shaped synthesized trace of 2 short sequences (8 prefill + 24 decode tokens)."""
    from sim.synth import preset, synthesize
    from sim.trace import save_trace

    path = tmp_path_factory.mktemp("trace") / "tiny.npz"
    save_trace(synthesize(preset("qwen3-30b-a3b", n_seqs=2, prefill_tokens=8, decode_tokens=24, seed=3)), path)
    return path
