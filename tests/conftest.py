"""Shared fixtures: where the read-only shared data lives, and a skip when it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_QWEN_CSV = SHARED / "traces" / "bigmoeonedge" / "qwen.route.csv"


@pytest.fixture
def shared_qwen_csv() -> Path:
    """The real Qwen3-30B-A3B route CSV from ../shared (skip when a fresh clone lacks it)."""
    if not SHARED_QWEN_CSV.exists():
        pytest.skip(f"shared data absent: {SHARED_QWEN_CSV} (only in the project's workspace)")
    return SHARED_QWEN_CSV
