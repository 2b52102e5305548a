"""Real-engine check: a global byte LRU of 4000 MiB replays the engine's own `residency` column.

The shared trace (../shared/traces/bigmoeonedge, Qwen3-30B-A3B Q4_K_M on a phone, llama.cpp-based
engine with `--cache-mb 4000`, a global LRU) records, per routed expert, whether it was already
resident. What reproduces it exactly, found by replaying the file:
  * ALL rows in file order (the 28 prefill steps warm the cache; prefill rows are stored layer by
    layer for the batch, which is the order the engine touched them). Decode rows alone from an
    empty cache do NOT match (hundreds of differences): the README's wording is loose there.
  * entry size = the per-layer `expert_bytes` of the `#` header (3,059,712 or 2,654,208 B): the
    `expert_bytes` column is the bytes READ for that row, 0 on a hit;
  * each (phase, step, layer) group of 6 routed experts protected while it is served (a group's
    earlier miss cannot evict a later member: without this rule 5 decode rows differ).
Decode hits then equal `residency` row for row (hit rate 0.8029), and prefill hits equal the rows
whose `expert_bytes` column is 0 (the engine read nothing for them), a second independent check.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from sim.cache import make_key, make_policy
from sim.cache.fast import replay_hits, replay_hits_python

CAPACITY_BYTES = 4000 * 2**20


def _load(path):
    layer_bytes = {}
    with open(path) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            m = re.match(r"# layer=(\d+) expert_bytes=(\d+)", line)
            if m:
                layer_bytes[int(m[1])] = int(m[2])
    df = pd.read_csv(path, comment="#")
    assert len(layer_bytes) == 48
    keys = np.array([make_key(int(l), int(e), 2) for l, e in zip(df.layer, df.expert)], np.int64)
    sizes = df.layer.map(layer_bytes).to_numpy(np.int64)
    group = (df.phase.astype(str) + ":" + df.step.astype(str) + ":" + df.layer.astype(str)).to_numpy()
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return df, keys, sizes, starts


@pytest.mark.parametrize("engine", ["python", "fast"])
def test_global_lru_4000_mib_reproduces_residency(shared_qwen_csv, engine):
    df, keys, sizes, starts = _load(shared_qwen_csv)
    if engine == "python":
        hits = replay_hits_python(make_policy("lru", CAPACITY_BYTES), keys, sizes, starts)
    else:
        hits = replay_hits("lru", keys, sizes, starts, CAPACITY_BYTES)
    decode = (df.phase == 1).to_numpy()
    assert decode.sum() == 36864  # 128 decode steps x 48 layers x 6 experts
    np.testing.assert_array_equal(hits[decode], df.residency.to_numpy()[decode] == 1)
    assert hits[decode].mean() == pytest.approx(0.8029, abs=5e-5)
    np.testing.assert_array_equal(hits[~decode], df.expert_bytes.to_numpy()[~decode] == 0)


def test_group_protection_is_what_makes_it_exact(shared_qwen_csv):
    """Without group protection (one group for the whole file start) the replay drifts: the rule matters."""
    df, keys, sizes, _ = _load(shared_qwen_csv)
    hits = replay_hits("lru", keys, sizes, np.zeros(0, np.int64), CAPACITY_BYTES)
    decode = (df.phase == 1).to_numpy()
    engine_hit = df.residency.to_numpy()[decode] == 1
    differ = hits[decode] != engine_hit
    assert differ.sum() == 5  # the module docstring's count
    assert engine_hit[differ].all()  # each one a hit the engine kept and the unprotected replay evicted
