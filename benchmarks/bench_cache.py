"""Cache replay speed: a naive OrderedDict LRU vs the Python LRU class vs the numba fast path.

The stream is synthetic and seeded, shaped like Qwen3-30B-A3B decode routing: 48 layers x 128
experts, top-8 distinct experts per (token step, layer) group, Zipf-skewed per-layer popularity
(a random permutation per layer) and token-to-token reuse (an expert picked at the previous step
in the same layer is favoured; about 40-50 % of selections repeat, as on the real trace). Entry
sizes follow the Q4_K_M layout (3,059,712 B where ffn_down is Q6_K, else 2,654,208 B). All three
replays use the same semantics (byte capacity, group protection, bypass); their hit counts must be
equal, and the ratios printed are measured in this same run.

Examples:
    .venv/bin/python benchmarks/bench_cache.py                      # 2.0 M accesses, 4000 MiB
    .venv/bin/python benchmarks/bench_cache.py --steps 1000 --capacity-mib 2000 --seed 1
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.cache import make_policy
from sim.cache.fast import replay_hits, replay_hits_python

N_LAYERS, N_EXPERTS, TOP_K = 48, 128, 8
Q6_DOWN_BYTES, Q4_DOWN_BYTES = 3_059_712, 2_654_208  # per expert, Q4_K_M with ffn_down Q6_K / Q4_K


def synthetic_stream(steps: int, seed: int, *, zipf_s: float = 0.9, reuse_bonus: float = 1.4):
    """Keys, sizes and group starts of `steps` decode steps (48 groups of 8 per step)."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((N_LAYERS, N_EXPERTS)), axis=1) + 1  # a random popularity order
    log_p = -zipf_s * np.log(ranks)  # Zipf-like
    layer_bytes = np.where(rng.random(N_LAYERS) < 0.4, Q6_DOWN_BYTES, Q4_DOWN_BYTES)
    picks = np.empty((steps, N_LAYERS, TOP_K), np.int64)
    prev = np.zeros((N_LAYERS, N_EXPERTS), bool)
    rows = np.arange(N_LAYERS)[:, None]
    for t in range(steps):
        score = log_p + reuse_bonus * prev + rng.gumbel(size=(N_LAYERS, N_EXPERTS))  # Gumbel top-k
        top = np.argpartition(-score, TOP_K, axis=1)[:, :TOP_K]
        picks[t] = top
        prev[:] = False
        prev[rows, top] = True
    layer = np.broadcast_to(np.arange(N_LAYERS)[None, :, None], picks.shape)
    keys = ((layer << 20) | (picks << 4) | 2).reshape(-1)  # fmt 2 = q4_k
    sizes = np.broadcast_to(layer_bytes[None, :, None], picks.shape).reshape(-1).astype(np.int64)
    starts = np.arange(0, keys.size, TOP_K, dtype=np.int64)
    same = (picks[1:, :, :, None] == picks[:-1, :, None, :]).any(-1).mean() if steps > 1 else 0.0
    return keys, sizes, starts, float(same)


def naive_lru_hits(keys: np.ndarray, sizes: np.ndarray, starts: np.ndarray, capacity: int) -> int:
    """Byte-capacity LRU with group protection and bypass, written plainly on an OrderedDict."""
    return naive_lru_hits_lists(keys.tolist(), sizes.tolist(), starts.tolist() + [keys.size], capacity)


def naive_lru_hits_lists(keys: list, sizes: list, bounds: list, capacity: int) -> int:
    """`naive_lru_hits` on Python lists; `bounds` are the groups' starts plus the end."""
    od: OrderedDict[int, int] = OrderedDict()
    used = hits = 0
    for g in range(len(bounds) - 1):
        lo, hi = bounds[g], bounds[g + 1]
        group = set(keys[lo:hi])
        for i in range(lo, hi):
            k = keys[i]
            if k in od:
                od.move_to_end(k)
                hits += 1
                continue
            s = sizes[i]
            if s > capacity - sum(od[x] for x in group if x in od):
                continue  # bypass: cannot fit beside the protected group
            while used + s > capacity:
                for v in od:
                    if v not in group:
                        break
                used -= od.pop(v)
            od[k] = s
            used += s
    return hits


def timed(fn, repeat: int = 1):
    """(result, best wall seconds over `repeat` runs)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None) -> int:
    """Run the benchmark and print a table of timings and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5300, help="decode steps (x 384 accesses); default 5300 = 2.04 M")
    ap.add_argument("--capacity-mib", type=float, default=4000.0, help="cache capacity in MiB (default 4000)")
    ap.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.capacity_mib < 0:
        ap.error("--steps must be >= 1 and --capacity-mib >= 0")
    capacity = int(args.capacity_mib * 2**20)

    (keys, sizes, starts, repeat_frac), gen_s = timed(lambda: synthetic_stream(args.steps, args.seed))
    n = keys.size
    print(f"stream: {n:,} accesses ({args.steps} steps x {N_LAYERS} layers x top-{TOP_K}), seed {args.seed}, "
          f"{repeat_frac:.1%} of selections repeat the previous step; built in {gen_s:.1f} s")
    print(f"capacity: {args.capacity_mib:g} MiB = {capacity:,} B (~{capacity / Q4_DOWN_BYTES:,.0f} Q4_K experts)")

    replay_hits("lru", keys[:1000], sizes[:1000], starts[:125], capacity)  # warm-up: compile / load cache
    replay_hits("slru", keys[:1000], sizes[:1000], starts[:125], capacity)

    naive, naive_s = timed(lambda: naive_lru_hits(keys, sizes, starts, capacity))
    cls, cls_s = timed(lambda: int(replay_hits_python(make_policy("lru", capacity), keys, sizes, starts).sum()))
    fast, fast_s = timed(lambda: int(replay_hits("lru", keys, sizes, starts, capacity).sum()), repeat=3)
    fast_slru, fast_slru_s = timed(lambda: int(replay_hits("slru", keys, sizes, starts, capacity).sum()), repeat=3)
    if not naive == cls == fast:
        print(f"MISMATCH: naive {naive}, class {cls}, fast {fast}", file=sys.stderr)
        return 1

    print(f"LRU hits: {fast:,} / {n:,} = {fast / n:.4f} (equal in all three replays); "
          f"SLRU (fast, share 0.8): {fast_slru / n:.4f}")
    print(f"{'replay':38s} {'seconds':>8s} {'ns/access':>10s} {'speed-up vs naive':>18s}")
    rows = [
        ("naive OrderedDict LRU (baseline)", naive_s),
        ("sim.cache LRU class (replay_hits_python)", cls_s),
        ("numba fast path replay_hits('lru')", fast_s),
        ("numba fast path replay_hits('slru')", fast_slru_s),
    ]
    for name, s in rows:
        print(f"{name:38s} {s:8.3f} {s / n * 1e9:10.1f} {naive_s / s:17.1f}x")
    print(f"fast path vs Python class: {cls_s / fast_s:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
