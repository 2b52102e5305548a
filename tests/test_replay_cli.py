"""`python -m sim.replay` end to end: output records, determinism, and one-line errors (exit 2)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.trace import save_trace
from tests.test_engine import random_trace

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"policy", "precision", "capacity_bytes", "accesses", "hits", "hit_rate", "bytes_per_token",
            "tokens_per_s", "stall_fraction", "low_precision_mass", "skipped_mass"}


def replay(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sim.replay", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.npz"
    save_trace(random_trace(seed=4, n_steps=60, predicted=True), path)
    return path


def test_table_json_csv_and_determinism(trace_path, tmp_path):
    out1, out2, csv_out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "a.csv"
    args = [trace_path, "--policy", "slru,lru", "--precision", "native,static:mass:25%:q2_k,dynamic:0.6:0.9",
            "--experts", "25%,50%", "--prefetch", "trace", "-q"]
    r1 = replay(*args, "--json", out1, "--csv", csv_out)
    r2 = replay(*args, "--json", out2)
    assert r1.returncode == 0, r1.stderr
    assert "hit rate" in r1.stdout and "slru" in r1.stdout
    assert out1.read_bytes() == out2.read_bytes()
    records = json.loads(out1.read_text())
    assert len(records) == 2 * 2 * 3
    for rec in records:
        assert REQUIRED <= rec.keys()
        assert rec["hits"] + rec["misses"] + rec["skipped"] == rec["accesses"]
    assert len(csv_out.read_text().splitlines()) == 1 + len(records)


def test_per_layer_table(trace_path):
    r = replay(trace_path, "--per-layer", "-q", "--no-timeline")
    assert r.returncode == 0, r.stderr
    assert "layer hit rate" in r.stdout and "slru native" in r.stdout


def test_sweep_budget(trace_path, tmp_path):
    out = tmp_path / "s.json"
    r = replay(trace_path, "--sweep-budget", "10%:50%:20%", "--json", out, "-q", "--no-timeline")
    assert r.returncode == 0, r.stderr
    recs = json.loads(out.read_text())
    assert [round(x["capacity_fraction"], 2) for x in recs] == [0.1, 0.3, 0.5]
    assert recs[0]["hit_rate"] <= recs[1]["hit_rate"] <= recs[2]["hit_rate"]


def test_help_has_examples():
    r = replay("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--sweep-budget" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{missing}"], "missing.npz"),
        (["{trace}", "--precision", "static:loudness:30%:q2_k"], "signal"),
        (["{trace}", "--precision", "dynamic:0.9:0.6"], "T1"),
        (["{trace}", "--precision", "static:mass:30%:q5_k"], "low format"),
        (["{trace}", "--budget", "nine gigs"], "byte size"),
        (["{trace}", "--experts", "lots"], "--experts"),
        (["{trace}", "--policy", "mru"], "mru"),
        (["{trace}", "--gpu", "voodoo2"], "voodoo2"),
        (["{trace}", "--prefetch", "oracle:1.5"], "accuracy"),
        (["{trace}", "--policy", "belady", "--precision", "dynamic:0.6:0.9"], "belady"),
        (["{trace}", "--calib-fraction", "0", "--precision", "static:freq:10%:q2_k"], "calibration"),
        (["{trace}", "--sweep-budget", "1GiB:2GiB"], "START:STOP:STEP"),
        (["{bad}"], "bad.npz"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(args, needle, trace_path, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    out = tmp_path / "out.json"
    argv = [a.format(trace=trace_path, missing=tmp_path / "missing.npz", bad=bad) for a in args]
    r = replay(*argv, "--json", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists()
