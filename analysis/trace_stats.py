"""Routing statistics of traces, side by side: how much a recorded trace looks like the real Qwen3-30B-A3B one.

`python -m analysis.trace_stats traces/qwen3.npz ../shared/traces/bigmoeonedge/qwen.route.csv [--top-k 6] [--tokens 128]`

Per trace, over its decode steps (each sequence from a cold start, every layer separately):
- distinct experts per layer per window of W tokens (W = 1, 8, 32, 128; non-overlapping windows inside
  a sequence), as a count and as a share of the layer's experts;
- reuse distance: tokens since the same expert was last selected in the same layer and sequence
  (1 = the previous token); the median, the share reused within 1 and within 8 tokens, and the share
  of selections with no earlier use in the sequence (cold);
- top-8 share: per layer, the share of selections that go to the layer's 8 most selected experts
  (uniform routing: 8/E), averaged over layers;
- per-layer LRU hit curve: the hit rate of a per-layer LRU of c experts (c = k … 96), from the exact
  LRU stack distance of each selection (a selection hits an LRU of c entries iff fewer than c distinct
  experts of its layer were selected since its previous use; the group's own earlier ranks count as
  more recent). Mean over layers, and the lowest and highest layer.
`--top-k K` keeps each group's first K ranks (the real recording ran top-6 of the model's top-8),
`--tokens N` the first N decode steps of each sequence (the real recording has 128).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numba
import numpy as np

from sim.io import InputError, exit_on_input_error
from sim.trace import ABSENT, DECODE, Trace, load_trace

WINDOWS = (1, 8, 32, 128)
CAPACITIES = (8, 16, 32, 48, 64, 96)


def load_any(path: str) -> Trace:
    """An npz trace, or a route CSV (sim.convert)."""
    if path.endswith(".csv"):
        from sim.convert import read_route_csv
        return read_route_csv(path)
    return load_trace(path)


def decode_sequences(trace: Trace, top_k: int | None = None, tokens: int | None = None) -> list[np.ndarray]:
    """Per sequence, int64 ids [T, L, k'] of its decode steps (groups with an ABSENT id are dropped)."""
    out = []
    k = trace.meta.top_k if top_k is None else min(top_k, trace.meta.top_k)
    for s in dict.fromkeys(trace.seq.tolist()):
        rows = np.flatnonzero((trace.seq == s) & (trace.phase == DECODE))
        if tokens is not None:
            rows = rows[:tokens]
        ids = trace.experts[rows, :, :k].astype(np.int64)
        if rows.size and (ids != ABSENT).all():
            out.append(ids)
    return out


def distinct_per_window(seqs: Sequence[np.ndarray], window: int) -> float:
    """Mean distinct experts per (layer, window of `window` tokens), whole windows only."""
    vals = []
    for ids in seqs:
        T, L, _ = ids.shape
        for lo in range(0, T - window + 1, window):
            blk = ids[lo:lo + window]  # [W, L, k]
            srt = np.sort(blk.transpose(1, 0, 2).reshape(L, -1), axis=1)
            vals.append(1 + (np.diff(srt, axis=1) != 0).sum(axis=1))
    return float(np.mean(np.concatenate(vals))) if vals else float("nan")


def reuse_distances(seqs: Sequence[np.ndarray], n_experts: int) -> np.ndarray:
    """Tokens since the previous selection of the same (layer, expert) in the sequence; 0 = first use."""
    out = []
    for ids in seqs:
        T, L, k = ids.shape
        last = np.full((L, n_experts), -1, np.int64)
        d = np.zeros((T, L, k), np.int64)
        lay = np.arange(L)[:, None]
        for t in range(T):
            prev = last[lay, ids[t]]
            d[t] = np.where(prev >= 0, t - prev, 0)
            last[lay, ids[t]] = t
        out.append(d.ravel())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def top_share(seqs: Sequence[np.ndarray], n_experts: int, n: int = 8) -> float:
    """Mean over layers of the share of selections that go to the layer's n most selected experts."""
    ids = np.concatenate([s.reshape(-1, *s.shape[1:]) for s in seqs])  # [T, L, k]
    L = ids.shape[1]
    shares = []
    for l in range(L):
        c = np.sort(np.bincount(ids[:, l].ravel(), minlength=n_experts))[::-1]
        shares.append(c[:n].sum() / c.sum())
    return float(np.mean(shares))


@numba.njit(cache=True)
def _stack_distances(ids, n_experts):  # pragma: no cover - compiled
    """ids [T, k] of one layer → LRU stack distance of each selection (-1 = first use)."""
    T, k = ids.shape
    last = np.full(n_experts, -1, np.int64)
    out = np.empty((T, k), np.int64)
    clock = 0
    for t in range(T):
        for r in range(k):
            e = ids[t, r]
            if last[e] < 0:
                out[t, r] = -1
            else:
                c = 0
                for j in range(n_experts):
                    if last[j] > last[e]:
                        c += 1
                out[t, r] = c
            clock += 1
            last[e] = clock
    return out


def lru_curves(seqs: Sequence[np.ndarray], n_experts: int, caps: Sequence[int] = CAPACITIES) -> np.ndarray:
    """float [L, len(caps)]: per-layer LRU hit rate at each capacity (cold start per sequence)."""
    L = seqs[0].shape[1]
    hits = np.zeros((L, len(caps)))
    total = np.zeros(L)
    for ids in seqs:
        for l in range(L):
            sd = _stack_distances(np.ascontiguousarray(ids[:, l]), n_experts).ravel()
            total[l] += sd.size
            for j, c in enumerate(caps):
                hits[l, j] += np.count_nonzero((sd >= 0) & (sd < c))
    return hits / total[:, None]


def stats(trace: Trace, top_k: int | None = None, tokens: int | None = None) -> dict:
    """The statistics above as a dict (see the module docstring)."""
    seqs = decode_sequences(trace, top_k, tokens)
    if not seqs:
        raise InputError(None, "trace has no complete decode steps")
    E = trace.meta.n_experts
    k = seqs[0].shape[2]
    rd = reuse_distances(seqs, E)
    reused = rd[rd > 0]
    curves = lru_curves(seqs, E)
    mean_curve = curves.mean(axis=0)
    return {
        "model": trace.meta.model, "top_k": k, "n_experts": E, "n_layers": trace.meta.n_layers,
        "sequences": len(seqs), "decode_tokens": int(sum(s.shape[0] for s in seqs)),
        "distinct_per_window": {w: distinct_per_window(seqs, w) for w in WINDOWS},
        "reuse": {"median": float(np.median(reused)) if reused.size else float("nan"),
                  "within_1": float(np.mean(rd == 1)), "within_8": float(np.mean((rd >= 1) & (rd <= 8))),
                  "cold": float(np.mean(rd == 0))},
        "top8_share": top_share(seqs, E, 8), "uniform_top8_share": 8 / E,
        "lru": {"capacities": list(CAPACITIES), "mean": mean_curve.round(4).tolist(),
                "min_layer": curves.min(axis=0).round(4).tolist(), "max_layer": curves.max(axis=0).round(4).tolist()},
    }


def markdown(columns: Sequence[tuple[str, dict]]) -> str:
    """One table, a column per trace."""
    head = "| statistic | " + " | ".join(name for name, _ in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(s) for _, s in columns) + " |")

    row("top-k, sequences × decode tokens", lambda s: f"{s['top_k']}, {s['sequences']} × {s['decode_tokens'] // s['sequences']}")
    for w in WINDOWS:
        row(f"distinct experts / layer / {w}-token window", lambda s, w=w: f"{s['distinct_per_window'][w]:.1f} "
            f"({s['distinct_per_window'][w] / s['n_experts']:.0%})")
    row("reuse distance: median (tokens)", lambda s: f"{s['reuse']['median']:.0f}")
    row("reused by the next token", lambda s: f"{s['reuse']['within_1']:.1%}")
    row("reused within 8 tokens", lambda s: f"{s['reuse']['within_8']:.1%}")
    row("first use in the sequence (cold)", lambda s: f"{s['reuse']['cold']:.1%}")
    row("top-8 share (uniform 6.25 %)", lambda s: f"{s['top8_share']:.1%}")
    for j, c in enumerate(CAPACITIES):
        row(f"per-layer LRU hit rate, {c} experts: mean [min–max layer]",
            lambda s, j=j: f"{s['lru']['mean'][j]:.1%} [{s['lru']['min_layer'][j]:.0%}–{s['lru']['max_layer'][j]:.0%}]")
    return "\n".join(lines)


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.trace_stats", description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+", help="npz traces or route CSVs")
    p.add_argument("--top-k", type=int, default=None, help="keep each group's first K ranks")
    p.add_argument("--tokens", type=int, default=None, help="first N decode steps of each sequence")
    a = p.parse_args(argv)
    cols = []
    for path in a.traces:
        t = load_any(path)
        cols.append((path, stats(t, a.top_k, a.tokens)))
    print(markdown(cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
