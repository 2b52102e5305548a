"""`python -m jaxmoe.offload`: a real offloaded MoE decode on the GPU, driven by the simulator's own decisions.

What it runs. Qwen3-30B-A3B's decode shape (48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128
experts of FFN 768 per layer, the trace's top-k) with untrained weights: dense layers in bf16 (attention
with a KV cache that grows with the context, q/k RMSNorm, RoPE, f32 router), experts as valid GGUF
blocks. A few distinct experts per format (`--distinct`) are made once and replicated to every
(layer, expert) id: Q4_K gate/up with Q4_K or Q6_K ffn_down per layer as the trace's model profile
says (llama.cpp's Q4_K_M mix), and Q3_K / Q2_K low copies. The host copies sit in pinned host memory.

Whose decisions. Routing is forced from the trace, and what each expert access does (hit, load at its
native or a low format, skip) is the simulator's logical replay (`sim.engine`, the same cache and
precision code `sim.simulate` runs): `simulator_plan` is the ONE function that talks to the simulator.
The executor only executes that plan: every LOADED access is a real host→device copy, every served
access a real expert FFN, so its hit counts equal the simulator's by construction (tests check it).

Physical memory. The logical byte budget is enforced by the simulator's cache. Physically every
(layer, expert, format) owns a fixed slot in a per-format pool array in VRAM (about 40 GB for the full
Qwen3 shape: an H100 holds it), so a copy never has to evict anything physically and no slot is ever
overwritten while a kernel reads it; a kernel's cost does not depend on which slot it reads. Pools
are filled once on the device from the distinct experts (so every slot always holds valid weights).

Per layer (decode, one token): dispatch the dense part; wait for its router output on the host (an
engine must read the top-k before it can look up its cache); dispatch the resident experts' FFNs
(one launch per format); issue the copies of the missing experts; wait for them; dispatch the
missing experts' FFNs. Resident experts compute while the missing ones stream in.
Expert FFNs are the project's Pallas kernels keyed by format (v4 integer-dot kernels, the default up
to 8 tokens); Q6_K ffn_down has no kernel, so in those layers gate/up run on the Q4_K integer-dot
launch and down on the plain-jnp Q6_K dequantizer + a bf16 dot.

Copy paths (`--copy-path`):
  raw  cudaMemcpyAsync (CuPy) from pinned host memory straight into the pool arrays' device memory
       (CuPy views of the JAX buffers through DLPack), on a copy stream, waited for before the
       missing experts' launch (what a native engine pays).
  jax  per kernel path with misses in the layer: one `jax.device_put` of those experts' pinned_host
       arrays, then one jitted, donated scatter into that path's pool (JAX's cheapest host→device path).

Output: one JSON (results/offload/*.json) with, per (trace, cache policy, precision policy, budget,
copy path): decode tokens/s of each repeat with a 95 % t-interval, hit rate, bytes copied, and a per-
layer breakdown of host-observed time (router wait = dense + unhidden expert compute, host lookup,
copy issue, copy stall, launch dispatch). `--calibrate` first measures the executor's micro costs
(jaxmoe.offload_calib) and writes the hardware profiles the simulator needs to predict it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.intervals import t_interval  # noqa: F401  (re-exported: offload_calib, tests)
from sim.io import InputError, atomic_path, exit_on_input_error, json_default

LOW_FORMATS = ("q2_k", "q3_k")  # the low formats the executor has kernels for (sim.precision.UNIFORM_LOW_FORMATS)
SLOT_NAMES = ("native",) + LOW_FORMATS  # sim.precision.SLOTS[:3]; the simulator's later slots are not executable
HIT, LOADED, SKIPPED = 0, 1, 2  # sim.engine's access results
Q6_BLOCK = 210


# ---------------------------------------------------------------------------------------------
# The plan: the simulator's decisions for every counted decode access
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to execute: the counted decode groups of a trace and each access's decision."""

    layer: np.ndarray  # int32 [G]
    pos: np.ndarray  # int32 [G] the token's position in its sequence (KV-cache length before it)
    token_end: np.ndarray  # bool [G] last layer of its token: the output head runs after it
    start: np.ndarray  # int64 [G+1]
    expert: np.ndarray  # int32 [N]
    result: np.ndarray  # int8 [N] HIT / LOADED / SKIPPED
    slot: np.ndarray  # int8 [N] 0 native, 1 q2_k, 2 q3_k (-1 skipped)
    weight: np.ndarray  # float32 [N] gate weight (forced routing)
    sizes: np.ndarray  # int64 [L, len(sim.precision.SLOTS)] logical (GGUF) bytes of one expert per layer and slot
    native_names: tuple  # per layer, e.g. "q4_k" or "q4_k+q6_k_down"
    n_experts: int
    top_k: int
    tokens: int
    sim: dict = field(default_factory=dict)  # the simulator's record (hits, misses, bytes, …)

    @property
    def n_groups(self) -> int:
        return int(self.layer.size)


_PREPARED: dict = {}


def check_executable(precision: str):
    """The parsed precision policy (sim.precision's parser), or InputError when the executor cannot run it.

    The executor has kernels for whole experts in q2_k / q3_k only: a tensor-aware low format
    (`q2_k_gu`: gate/up at Q2_K with ffn_down native, sim.precision.TENSOR_AWARE_FORMATS) would need a
    mixed-format launch it does not have, so it is refused here, before any work, in one line."""
    from sim.precision import parse_precision

    pol = parse_precision(precision)
    bad = [f for f in pol.low_formats() if f not in LOW_FORMATS]
    if bad:
        raise InputError(None, f"precision {precision!r}: the GPU executor has no kernel for mixed-format experts "
                               f"({', '.join(bad)}: gate/up low, ffn_down native); it runs {' and '.join(LOW_FORMATS)} "
                               "(price tensor-aware formats with python -m sim.replay)")
    return pol


def simulator_plan(trace, *, policy: str, precision: str, capacity_bytes: int, calib_fraction: float = 0.25,
                   seed: int = 0, gpu: str = "rtx3060-12gb") -> Plan:
    """THE adapter to the simulator: its logical replay of one configuration, as a Plan.

    Mirrors `sim.simulate.run_prepared` (same caches, same precision policy, same calibration window)
    but keeps the per-access outcome. The hardware profile only prices prefetch (none here), so the
    decisions do not depend on `gpu`.
    """
    from sim.engine import CacheSpec, replay
    from sim.precision import static_slots
    from sim.simulate import ReplayConfig, prepare, summarize
    from sim.trace import DECODE

    pol = check_executable(precision)
    cfg = ReplayConfig(trace=trace, capacity_bytes=int(capacity_bytes), policy=policy, precision=precision, gpu=gpu,
                       calib_fraction=calib_fraction, seed=seed, timeline=False)
    key = (id(trace), calib_fraction, seed, gpu)
    if key not in _PREPARED or _PREPARED[key][0] is not trace:
        _PREPARED[key] = (trace, prepare(cfg))  # groups and tables shared by a trace's configurations
    prep = _PREPARED[key][1]
    g, model = prep.groups, prep.model
    hi_slots = static_slots(prep.calib_trace, pol, model.n_layers, model.n_experts, seed)
    spec = CacheSpec(policy, int(capacity_bytes), cfg.partition, model.n_layers, dict(cfg.policy_params))
    out = replay(g, spec, pol, hi_slots, prep.sizes, prep.link_s)
    rec = summarize(prep, cfg, pol.name, int(capacity_bytes), out).as_dict()
    counted = np.flatnonzero(~g.calib & (g.phase == DECODE))
    # position of each group's token in its sequence
    first_step = {}
    for s, q in zip(prep.trace.seq.tolist(), range(prep.trace.n_steps)):
        first_step.setdefault(s, q)
    pos = np.array([int(g.step[i]) - first_step[int(g.seq[i])] for i in counted], dtype=np.int32)
    idx = np.concatenate([np.arange(g.start[i], g.start[i + 1]) for i in counted]) if counted.size else np.zeros(0, int)
    counts = np.diff(g.start)[counted]
    start = np.zeros(counted.size + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    return Plan(
        layer=g.layer[counted].astype(np.int32), pos=pos, token_end=g.token_end[counted].copy(), start=start,
        expert=g.expert[idx].astype(np.int32), result=out.result[idx].astype(np.int8),
        slot=out.slot[idx].astype(np.int8), weight=g.mass[idx].astype(np.float32), sizes=prep.sizes.copy(),
        native_names=tuple(model.native_name(la) for la in range(model.n_layers)), n_experts=model.n_experts,
        top_k=int(prep.trace.meta.top_k), tokens=int(rec["tokens"]), sim=rec,
    )


def plan_counts(plan: Plan) -> dict:
    """Hits, misses, skips and accesses of a plan (what the executor will do)."""
    return dict(accesses=int(plan.result.size), hits=int((plan.result == HIT).sum()),
                misses=int((plan.result == LOADED).sum()), skipped=int((plan.result == SKIPPED).sum()))


# ---------------------------------------------------------------------------------------------
# Model shape and weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Decode shape of the executed model (defaults: Qwen3-30B-A3B)."""

    n_layers: int = 48
    n_experts: int = 128
    hidden: int = 2048
    ffn: int = 768
    n_heads: int = 32
    n_kv: int = 4
    head_dim: int = 128
    vocab: int = 151_936


def path_of(native_name: str, slot: int) -> str:
    """Kernel path of a format slot in a layer: 'q4_k', 'q4_k+q6_k_down', 'q3_k' or 'q2_k'."""
    if slot > 0:
        return SLOT_NAMES[slot]
    if native_name not in ("q4_k", "q4_k+q6_k_down"):
        raise InputError(None, f"native format {native_name!r} is not executable (q4_k or q4_k+q6_k_down)")
    return native_name


def _expert_planes(fmt: str, shape: Shape, rng: np.random.Generator) -> dict:
    """One valid random expert: {'gate','up','down': planes (or Q6_K bytes for a q6_k down)}."""
    from jaxmoe import quants
    from jaxmoe.kernels import repack

    out = {}
    gu_fmt = "q4_k" if fmt.startswith("q4_k") else fmt
    for name, (n, k) in (("gate", (shape.ffn, shape.hidden)), ("up", (shape.ffn, shape.hidden)),
                         ("down", (shape.hidden, shape.ffn))):
        if name == "down" and fmt == "q4_k+q6_k_down":
            w = (0.02 * rng.standard_normal((n, k))).astype(np.float32)
            out[name] = {"q6": np.asarray(quants.quantize(w, "q6_k"), np.uint8)}
        else:
            raw = repack.random_gguf(gu_fmt, n, k, rng)
            out[name] = {p: np.ascontiguousarray(v) for p, v in repack.pack(raw, gu_fmt).items()}
    return out


# ---------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------


class Executor:
    """Pools, host copies, compiled layer functions and the decode loop over a Plan."""

    def __init__(self, shape: Shape, native_names: tuple, top_k: int, *, copy_path: str = "raw", distinct: int = 2,
                 ctx_cap: int = 256, kernel: str = "pallas", seed: int = 0, paths: tuple | None = None):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.shape, self.native_names, self.top_k = shape, tuple(native_names), int(top_k)
        self.copy_path, self.distinct, self.ctx_cap, self.kernel = copy_path, int(distinct), int(ctx_cap), kernel
        self.device = jax.devices()[0]
        self.on_gpu = self.device.platform == "gpu"
        self.interpret = not self.on_gpu
        rng = np.random.default_rng(seed)
        L, E = shape.n_layers, shape.n_experts
        natives = sorted({path_of(n, 0) for n in self.native_names})
        self.paths = tuple(paths) if paths is not None else tuple(natives) + LOW_FORMATS
        # layers that use each path (native paths: their layers only; low formats: all layers)
        self.layer_rank = {}
        for p in self.paths:
            layers = [la for la in range(L) if p in LOW_FORMATS or path_of(self.native_names[la], 0) == p]
            rank = np.full(L, -1, dtype=np.int64)
            rank[layers] = np.arange(len(layers))
            self.layer_rank[p] = rank
        # distinct experts per path, host copies and device pools
        self.host = {p: [_expert_planes(p, shape, rng) for _ in range(self.distinct)] for p in self.paths}
        self.pools = {}
        for p in self.paths:
            n_slots = int((self.layer_rank[p] >= 0).sum()) * E
            self.pools[p] = self._make_pool(p, n_slots)
        self.copy_bytes = {p: sum(a.nbytes for t in self.host[p][0].values() for a in t.values()) for p in self.paths}
        self._make_dense(rng)
        self.set_copy_path(copy_path)
        self._expert_fns: dict = {}
        self._update_fns: dict = {}

    # -- memory --------------------------------------------------------------------------------

    def _make_pool(self, p: str, n_slots: int) -> dict:
        """Pool arrays [n_slots, ...] per tensor and plane, slot s holding distinct expert s % D."""
        jax, jnp = self.jax, self.jnp
        pool = {}
        which = jnp.arange(n_slots, dtype=jnp.int32) % self.distinct
        for t in ("gate", "up", "down"):
            pool[t] = {}
            for plane in self.host[p][0][t]:
                stack = jax.device_put(np.stack([self.host[p][d][t][plane] for d in range(self.distinct)]), self.device)
                pool[t][plane] = jax.jit(lambda s, w: jnp.take(s, w, axis=0))(stack, which)
                del stack
        return pool

    def slot_of(self, p: str, layer: int, expert: int) -> int:
        return int(self.layer_rank[p][layer]) * self.shape.n_experts + int(expert)

    def set_copy_path(self, copy_path: str):
        """Switch the copy path (the pools stay; raw pointers are re-read since the jax path may move buffers)."""
        if copy_path not in ("raw", "jax"):
            raise InputError(None, f"copy path {copy_path!r}: use raw or jax")
        if copy_path == "raw" and not self.on_gpu:
            raise InputError(None, "--copy-path raw needs a CUDA GPU (CuPy); use --copy-path jax on CPU")
        self.copy_path = copy_path
        if copy_path == "raw":
            self._setup_raw()
        else:
            self._setup_jax()

    def _setup_raw(self):
        """Pinned CuPy host buffers (once) and the pools' device pointers through DLPack (every switch)."""
        import cupy as cp

        self.cp = cp
        if not hasattr(self, "_pinned_src"):
            self.stream = cp.cuda.Stream(non_blocking=True)
            self._pinned = []  # keep alive
            self._pinned_src = {}
            for p in self.paths:
                srcs = []
                for t in ("gate", "up", "down"):
                    for plane in self.pools[p][t]:
                        ptrs = []
                        for d in range(self.distinct):
                            host = np.ascontiguousarray(self.host[p][d][t][plane]).view(np.uint8).reshape(-1)
                            mem = cp.cuda.alloc_pinned_memory(host.nbytes)
                            np.frombuffer(mem, np.uint8, host.nbytes)[:] = host
                            self._pinned.append(mem)
                            ptrs.append(mem.ptr)
                        srcs.append(ptrs)
                self._pinned_src[p] = srcs
        self.raw_units = {}  # path -> per plane (dst base pointer, row bytes, src pointer per distinct expert)
        for p in self.paths:
            units = []
            arrays = [a for t in ("gate", "up", "down") for a in self.pools[p][t].values()]
            for arr, srcs in zip(arrays, self._pinned_src[p]):
                arr.block_until_ready()
                ptr = buffer_pointer(arr, cp.from_dlpack)
                units.append((ptr, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize, srcs))
            self.raw_units[p] = units
        import gc

        gc.collect()

    def _setup_jax(self):
        """pinned_host JAX arrays of each distinct expert's planes (numpy where the backend has no pinned_host)."""
        if hasattr(self, "host_arrays"):
            return
        jax = self.jax
        kinds = {m.kind for m in self.device.addressable_memories()} if hasattr(self.device, "addressable_memories") else set()
        self.host_kind = "pinned_host" if "pinned_host" in kinds and self.on_gpu else None
        sharding = jax.sharding.SingleDeviceSharding(self.device, memory_kind="pinned_host") if self.host_kind else None
        self.host_arrays = {}
        for p in self.paths:
            per_d = []
            for d in range(self.distinct):
                leaves = [self.host[p][d][t][plane] for t in ("gate", "up", "down") for plane in self.pools[p][t]]
                per_d.append([jax.device_put(a, sharding) if sharding else a for a in leaves])
            self.host_arrays[p] = per_d

    def issue_copies(self, p: str, slots: list[int], experts: list[int]):
        """Start the copies of missing experts of path p into their pool slots (raw path: async on the copy stream)."""
        if self.copy_path == "raw":
            memcpy = self.cp.cuda.runtime.memcpyAsync
            sp = self.stream.ptr
            for slot, e in zip(slots, experts):
                d = e % self.distinct
                for base, row, srcs in self.raw_units[p]:
                    memcpy(base + slot * row, srcs[d], row, 1, sp)
            return None
        jax = self.jax
        leaves = [self.host_arrays[p][e % self.distinct] for e in experts]
        target = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device") if self.host_kind else self.device
        moved = jax.device_put(leaves, target)
        k = self.top_k
        pad = lambda seq: list(seq) + [seq[-1]] * (k - len(seq))  # noqa: E731  fixed shape: one compile per path
        fn = self._update_fn(p)
        flat = [a for t in ("gate", "up", "down") for a in self.pools[p][t].values()]
        cols = list(zip(*pad(moved)))  # per plane: the experts' arrays
        new = fn(flat, np.asarray(pad(slots), np.int32), cols)
        i = 0
        for t in ("gate", "up", "down"):
            for plane in self.pools[p][t]:
                self.pools[p][t][plane] = new[i]
                i += 1
        return None

    def wait_copies(self):
        if self.copy_path == "raw":
            self.stream.synchronize()

    def _update_fn(self, p: str):
        if p not in self._update_fns:
            jax, jnp = self.jax, self.jnp

            def update(flat, slots, cols):
                return [pool.at[slots].set(jnp.stack(col)) for pool, col in zip(flat, cols)]

            self._update_fns[p] = jax.jit(update, donate_argnums=0)
        return self._update_fns[p]

    # -- compute -------------------------------------------------------------------------------

    def _make_dense(self, rng: np.random.Generator):
        """bf16 attention weights per layer, KV caches, and the jitted dense layer and output head."""
        jax, jnp = self.jax, self.jnp
        s = self.shape
        bf = jnp.bfloat16
        key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
        self.dense_w = []
        for la in range(s.n_layers):
            key, *ks = jax.random.split(key, 6)
            n = lambda k, shp, sc=0.02: (sc * jax.random.normal(k, shp, jnp.float32)).astype(bf)  # noqa: E731
            self.dense_w.append(dict(
                wq=n(ks[0], (s.hidden, s.n_heads * s.head_dim)), wk=n(ks[1], (s.hidden, s.n_kv * s.head_dim)),
                wv=n(ks[2], (s.hidden, s.n_kv * s.head_dim)), wo=n(ks[3], (s.n_heads * s.head_dim, s.hidden)),
                wr=(0.02 * jax.random.normal(ks[4], (s.hidden, s.n_experts), jnp.float32)),
                ln1=jnp.ones((s.hidden,), jnp.float32), ln2=jnp.ones((s.hidden,), jnp.float32),
                qn=jnp.ones((s.head_dim,), jnp.float32), kn=jnp.ones((s.head_dim,), jnp.float32)))
        self.kv = [(jnp.zeros((self.ctx_cap, s.n_kv, s.head_dim), bf), jnp.zeros((self.ctx_cap, s.n_kv, s.head_dim), bf))
                   for _ in range(s.n_layers)]
        key, k1, k2 = jax.random.split(key, 3)
        self.head_w = (0.02 * jax.random.normal(k1, (s.hidden, s.vocab), jnp.float32)).astype(bf)
        self.embed = (jax.random.normal(k2, (16, s.hidden), jnp.float32))
        k_top = self.top_k

        def rms(x, w):
            return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w

        def rope(x, pos):
            half = s.head_dim // 2
            freq = 1.0 / (1e6 ** (jnp.arange(half, dtype=jnp.float32) / half))
            ang = pos.astype(jnp.float32) * freq
            c, sn = jnp.cos(ang), jnp.sin(ang)
            x1, x2 = x[..., :half], x[..., half:]
            return jnp.concatenate([x1 * c - x2 * sn, x2 * c + x1 * sn], axis=-1)

        def dense(h, kc, vc, pos, w):
            x = rms(h, w["ln1"]).astype(bf)
            q = jnp.dot(x, w["wq"], preferred_element_type=jnp.float32).reshape(s.n_heads, s.head_dim)
            k = jnp.dot(x, w["wk"], preferred_element_type=jnp.float32).reshape(s.n_kv, s.head_dim)
            v = jnp.dot(x, w["wv"], preferred_element_type=jnp.float32).reshape(s.n_kv, s.head_dim)
            q, k = rope(rms(q, w["qn"]), pos), rope(rms(k, w["kn"]), pos)
            kc = jax.lax.dynamic_update_slice(kc, k.astype(bf)[None], (pos, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v.astype(bf)[None], (pos, 0, 0))
            qg = q.reshape(s.n_kv, s.n_heads // s.n_kv, s.head_dim).astype(bf)
            sc = jnp.einsum("kgd,tkd->kgt", qg, kc, preferred_element_type=jnp.float32) / math.sqrt(s.head_dim)
            sc = jnp.where(jnp.arange(self.ctx_cap) <= pos, sc, -jnp.inf)
            att = jax.nn.softmax(sc, axis=-1).astype(bf)
            o = jnp.einsum("kgt,tkd->kgd", att, vc, preferred_element_type=jnp.float32).reshape(1, -1)
            h = h + jnp.dot(o.astype(bf), w["wo"], preferred_element_type=jnp.float32)
            xn = rms(h, w["ln2"])
            logits = jnp.dot(xn, w["wr"])
            top = jax.lax.top_k(logits[0], k_top)[1]
            return h, xn, kc, vc, top

        self._dense = jax.jit(dense, donate_argnums=(1, 2))

        def head(h):
            return jnp.argmax(jnp.dot(h.astype(bf), self.head_w, preferred_element_type=jnp.float32)[0])

        self._head = jax.jit(head)

    def dense(self, layer: int, h, pos: int):
        kc, vc = self.kv[layer]
        h, xn, kc, vc, top = self._dense(h, kc, vc, np.int32(pos), self.dense_w[layer])
        self.kv[layer] = (kc, vc)
        return h, xn, top

    def expert_fn(self, p: str, g: int):
        """Jitted: acc + Σ_i w_i · FFN_{ids_i}(x) over g experts of path p (one launch per tensor pass)."""
        key = (p, g)
        if key not in self._expert_fns:
            jax, jnp = self.jax, self.jnp
            from jaxmoe.kernels import expert_ffn as ef

            interpret, kernel = self.interpret, self.kernel
            s = self.shape

            def fn(acc, x, pool, ids, w):
                if p == "q4_k+q6_k_down":
                    h = _gate_up(x, pool["gate"], pool["up"], ids, kernel, interpret)  # [g, 1, F] f32
                    q6 = jnp.take(pool["down"]["q6"], ids, axis=0).reshape(-1, Q6_BLOCK)
                    from jaxmoe.quants_jax import dequantize_jnp

                    wd = dequantize_jnp("q6_k", q6).reshape(g, s.hidden, s.ffn).astype(jnp.bfloat16)
                    y = jnp.einsum("gmf,ghf->gmh", h.astype(jnp.bfloat16), wd, preferred_element_type=jnp.float32)
                else:
                    impl = "pallas" if kernel == "pallas" else "reference"
                    y = ef.expert_ffn(x, pool, ids, fmt=p, implementation=impl, interpret=interpret)
                return acc + jnp.einsum("g,gmh->mh", w, y)

            self._expert_fns[key] = jax.jit(fn)
        return self._expert_fns[key]

    def precompile(self, shapes: set | None = None):
        """Compile expert launch shapes (default: each kernel path × 1..top-k experts), the dense layer and head."""
        jnp = self.jnp
        x = self.embed_token(0)
        shapes = sorted(shapes) if shapes is not None else [(p, g) for p in self.paths for g in range(1, self.top_k + 1)]

        def one(pg):
            p, g = pg
            self.run_experts(x, x, p, jnp.arange(g, dtype=jnp.int32), jnp.zeros((g,), jnp.float32)).block_until_ready()

        if self.on_gpu and os.environ.get("OFFLOAD_SERIAL_COMPILE") != "1":
            from concurrent.futures import ThreadPoolExecutor

            one(shapes[0])  # first trace imports and initialises the kernel modules on one thread
            with ThreadPoolExecutor(8) as pool:  # compilation releases the GIL
                list(pool.map(one, shapes[1:]))
        else:
            for pg in shapes:
                one(pg)
        h, xn, top = self.dense(0, x, 0)
        self.head(h).block_until_ready()

    def run_experts(self, acc, x, p: str, ids: np.ndarray, w: np.ndarray):
        return self.expert_fn(p, int(ids.size))(acc, x, self.pools[p], ids, w)

    def head(self, h):
        return self._head(h)

    def embed_token(self, i: int):
        return self.embed[i % self.embed.shape[0]][None]

    # -- the decode loop -----------------------------------------------------------------------

    def launch_shapes(self, plan: Plan) -> set:
        """{(kernel path, experts)} of every launch the plan needs (resident and missing launches apart)."""
        acc_layer = np.repeat(plan.layer, np.diff(plan.start))
        group = np.repeat(np.arange(plan.n_groups), np.diff(plan.start))
        served = plan.result != SKIPPED
        names = np.array([path_of(self.native_names[la], s) for la, s in zip(acc_layer[served], plan.slot[served])])
        key = np.char.add(np.char.add(names, "|"), (group[served] * 2 + (plan.result[served] == LOADED)).astype(str))
        uniq, counts = np.unique(key, return_counts=True)
        return {(k.split("|")[0], int(c)) for k, c in zip(uniq.tolist(), counts.tolist())}

    def compile_plan(self, plan: Plan) -> list:
        """Per group: (layer, pos, token_end, resident launches, (path, slots, experts) copies, missing launches).

        All of a plan's launch index and weight arrays reach the device in one `jax.device_put` of the
        whole list (one call instead of one transfer per array: a 768-group plan took 1.3 s that way).
        """
        host, groups = [], []
        for gi in range(plan.n_groups):
            la = int(plan.layer[gi])
            lo, hi = int(plan.start[gi]), int(plan.start[gi + 1])
            res, miss = {}, {}
            for a in range(lo, hi):
                r = int(plan.result[a])
                if r == SKIPPED:
                    continue
                p = path_of(self.native_names[la], int(plan.slot[a]))
                e = int(plan.expert[a])
                (res if r == HIT else miss).setdefault(p, []).append((self.slot_of(p, la, e), e, float(plan.weight[a])))

            def launch(d):
                out = []
                for p, v in sorted(d.items()):
                    host.append(np.array([s for s, _, _ in v], np.int32))
                    host.append(np.array([w for _, _, w in v], np.float32))
                    out.append((p, len(host) - 2, len(host) - 1))
                return out

            copies = [(p, [s for s, _, _ in v], [e for _, e, _ in v]) for p, v in sorted(miss.items())]
            groups.append((la, int(plan.pos[gi]), bool(plan.token_end[gi]), launch(res), copies, launch(miss)))
        dev = self.jax.device_put(host, self.device) if host else []
        pick = lambda launches: [(p, dev[i], dev[j]) for p, i, j in launches]  # noqa: E731
        return [(la, pos, end, pick(res), copies, pick(miss)) for la, pos, end, res, copies, miss in groups]

    def run(self, compiled: list, breakdown: dict | None = None) -> float:
        """Execute compiled groups once; returns wall seconds (first dispatch → last token's head on the host)."""
        clock = time.perf_counter
        bd = breakdown
        self.counts = dict(copies=0, computed=0, tokens=0)
        gc_was_on = gc.isenabled()
        gc.disable()  # a collection inside the host-bound loop shows up as a slow layer
        try:
            return self._run(compiled, bd, clock)
        finally:
            if gc_was_on:
                gc.enable()

    def _run(self, compiled: list, bd: dict | None, clock) -> float:
        t_start = clock()
        h = None
        token = 0
        t_token = t_start
        self.token_s = []  # wall seconds of each token (spikes vs uniform slowness: docs/validation.md)
        for la, pos, end, res, copies, miss in compiled:
            t0 = clock()
            if h is None:
                h = self.embed_token(token)
            h, xn, top = self.dense(la, h, pos)
            top.block_until_ready()  # the router's top-k reaches the host
            t1 = clock()
            acc = h
            for p, ids, w in res:
                acc = self.run_experts(acc, xn, p, ids, w)
            t2 = clock()
            for p, slots, experts in copies:
                self.issue_copies(p, slots, experts)
                self.counts["copies"] += len(slots)
            t3 = clock()
            if copies:
                self.wait_copies()
            t4 = clock()
            for p, ids, w in miss:
                acc = self.run_experts(acc, xn, p, ids, w)
            h = acc
            t5 = clock()
            self.counts["computed"] += sum(int(ids.size) for _, ids, _ in res) + sum(int(ids.size) for _, ids, _ in miss)
            if end:
                self.head(h).block_until_ready()
                t_end = clock()
                self.token_s.append(t_end - t_token)
                t_token = t_end
                token += 1
                self.counts["tokens"] += 1
                h = None
            if bd is not None:
                bd["router_wait_s"][la] += t1 - t0
                bd["dispatch_s"][la] += (t2 - t1) + (t5 - t4)
                bd["copy_issue_s"][la] += t3 - t2
                bd["stall_s"][la] += t4 - t3
                if end:
                    bd["head_s"] += clock() - t5
        if h is not None:
            h.block_until_ready()
        return clock() - t_start

    def new_breakdown(self) -> dict:
        L = self.shape.n_layers
        return dict(router_wait_s=np.zeros(L), dispatch_s=np.zeros(L), copy_issue_s=np.zeros(L), stall_s=np.zeros(L),
                    head_s=0.0)


def buffer_pointer(arr, from_dlpack) -> int:
    """Address of a JAX array's buffer, read through a DLPack view (CuPy on the GPU) that is dropped at once.

    Holding the view would pin an external reference on the buffer, and the jax copy path's donated
    pool update then fails ("Donation requested for buffer with external reference") or copies the pool.
    """
    view = from_dlpack(arr)
    ptr = int(view.data.ptr) if hasattr(view.data, "ptr") else int(view.ctypes.data)
    del view
    return ptr


def _gate_up(x, gate: dict, up: dict, ids, kernel: str, interpret: bool):
    """h = SiLU(x·W_gateᵀ)·(x·W_upᵀ) of Q4_K experts → [G, M, F] float32 (launch A of the v4 kernels alone)."""
    import functools
    import warnings

    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    from jaxmoe.kernels import expert_ffn as ef
    from jaxmoe.kernels import int_dot, repack
    from jaxmoe.kernels.dequant_fma import _plane_views

    if kernel != "pallas":
        wg = ef.dequantize_jnp(ef._take(gate, ids), "q4_k")
        wu = ef.dequantize_jnp(ef._take(up, ids), "q4_k")
        xf = x.astype(jnp.float32)
        return jax.nn.silu(jnp.einsum("mk,gnk->gmn", xf, wg)) * jnp.einsum("mk,gnk->gmn", xf, wu)
    fmt, bn = "q4_k", 16
    names = repack.PLANES[fmt]
    _, f, nb_up = gate["d"].shape
    g, m = ids.shape[0], x.shape[0]
    xq = int_dot._act_views(*int_dot.quantize_pallas(x, interpret), (m,), nb_up, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        call = pl.pallas_call(
            functools.partial(int_dot._up_kernel, fmt=fmt, names=names, nb=nb_up, bn=bn, mt=1, use_asm=not interpret),
            grid=(g, f // bn, m),
            out_shape=(jax.ShapeDtypeStruct((g, m, f // 2), jnp.uint32), jax.ShapeDtypeStruct((g, m, f // 16), jnp.float32),
                       jax.ShapeDtypeStruct((g, m, f // 16), jnp.float32)),
            compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret, name="ffn_up_int_q4_k_q6down")
        words, step, _ = call(ids.astype(jnp.int32), *_plane_views(gate, fmt), *_plane_views(up, fmt), *xq)
    return int_dot.dequantize_int16(words, step)


# ---------------------------------------------------------------------------------------------
# Measuring a grid
# ---------------------------------------------------------------------------------------------


def resolve_budget(text: str, model) -> tuple[int, str]:
    """'derived:GPU' (VRAM − dense − head − KV − reserve of a hardware profile), 'N%' of all experts, or bytes."""
    from sim.profiles import derived_expert_budget, load_hardware, parse_bytes

    t = text.strip()
    if t.startswith("derived:"):
        hw = load_hardware(t.split(":", 1)[1])
        return int(derived_expert_budget(model, hw, 4096)), t
    if t.endswith("%"):
        try:
            return int(float(t[:-1]) / 100 * model.total_expert_bytes()), t
        except ValueError:
            raise InputError(None, f"--budget {text!r}: cannot parse the percentage") from None
    return parse_bytes(t), t


def measure_config(ex: Executor, plan: Plan, repeats: int, warmup: int = 1, compiled: list | None = None) -> dict:
    """Run one plan `repeats` times, after `warmup` untimed runs (no interleaving: a single configuration)."""
    compiled = compiled if compiled is not None else ex.compile_plan(plan)
    for _ in range(warmup):
        ex.run(compiled)  # launch shapes are precompiled; this settles caches and the copy path
    bd = ex.new_breakdown()
    secs, executed = [], dict(copies=0, computed=0, tokens=0)
    for _ in range(repeats):
        secs.append(ex.run(compiled, bd))
        for k in executed:
            executed[k] += ex.counts[k]
    return summarize_runs(ex, plan, secs, bd, executed)


def summarize_runs(ex: Executor, plan: Plan, secs: list, bd: dict, executed: dict,
                   token_s: list | None = None) -> dict:
    """The record of one configuration from its timed runs (tokens/s with a 95 % t-interval over runs);
    `token_s`: each run's per-token wall seconds, kept as `token_s_per_run`."""
    repeats = len(secs)
    tps = [plan.tokens / s for s in secs]
    mean, lo, hi = t_interval(tps)
    counts = plan_counts(plan)
    loaded = plan.result == LOADED
    acc_layer = np.repeat(plan.layer, np.diff(plan.start))
    logical = int(plan.sizes[acc_layer[loaded], plan.slot[loaded]].sum())
    physical = 0
    for a in np.flatnonzero(loaded):
        physical += ex.copy_bytes[path_of(plan.native_names[acc_layer[a]], int(plan.slot[a]))]
    per = lambda a: [round(float(v) / repeats, 7) for a_ in [a] for v in a_]  # noqa: E731
    return dict(
        tokens=plan.tokens, repeats=repeats, seconds=secs, tokens_per_s=tps,
        tokens_per_s_mean=mean, tokens_per_s_ci95=[lo, hi],
        **counts, hit_rate=counts["hits"] / counts["accesses"] if counts["accesses"] else float("nan"),
        bytes_copied_logical=logical, bytes_copied_physical=physical,
        executed_copies=executed["copies"], executed_experts=executed["computed"], executed_tokens=executed["tokens"],
        sim_hits=int(plan.sim["hits"]), sim_misses=int(plan.sim["misses"]), sim_skipped=int(plan.sim["skipped"]),
        per_layer_s_per_run=dict(router_wait=per(bd["router_wait_s"]), dispatch=per(bd["dispatch_s"]),
                                 copy_issue=per(bd["copy_issue_s"]), stall=per(bd["stall_s"])),
        head_s_per_run=bd["head_s"] / repeats,
    ) | ({} if token_s is None else {"token_s_per_run": [[round(float(v), 6) for v in r] for r in token_s]})


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    info = dict(platform=d.platform, device_kind=getattr(d, "device_kind", ""), jax=jax.__version__,
                python=sys.version.split()[0])
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        pass
    return info


EPILOG = """examples:
  python -m jaxmoe.offload traces/synth-qwen3.npz --out results/offload/grid.json
  python -m jaxmoe.offload synth.npz real.npz --policy slru,lru \\
      --precision native,static:mass:30%:q3_k,static:mass:30%:q2_k,dynamic:0.6:0.9 \\
      --budget derived:rtx3060-12gb,50%,30% --copy-path raw,jax --repeats 3 \\
      --calibrate results/offload/calib.json --out results/offload/grid.json
  python -m jaxmoe.offload tiny.npz --copy-path jax --kernel reference --shape tiny   # CPU check

budgets: derived:GPU = the simulator's derived expert budget of hardware profile GPU (12 GB cards:
derived:rtx3060-12gb); N% = share of all native expert bytes; or bytes (9GiB, 9.5GB).
Timing in interleaved rounds: --warmup untimed rounds, then --repeats timed rounds; each round runs every
configuration once per copy path (and, with --calibrate, the calibration's synthetic plans, warm-up rounds
included), so slow drift of the host-bound loop spreads over all configurations and shows in their
intervals instead of biasing whichever ran last. --interleave token (default): within a round, token t of
every configuration and plan runs, in a fresh seeded random order, before any token t+1; --interleave run:
each configuration's run whole, the configurations in a fresh seeded random order. tokens/s = the plan's decoded tokens / wall
time (first dense dispatch → last token's argmax on the host); the interval is a 95 % t-interval over rounds.
Only the simulator's evaluation window is executed: its calibration window warms the (logical) cache.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxmoe.offload", description=__doc__.split("\n\n", 1)[1],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", help="routing traces (.npz) whose decode steps are executed")
    ap.add_argument("--policy", default="slru,lru", help="cache policies, comma-separated (default: %(default)s)")
    ap.add_argument("--precision", default="native", help="precision policies, comma-separated (sim.replay's grammar; low formats "
                    "q2_k and q3_k only: the tensor-aware *_gu formats have no executor kernel)")
    ap.add_argument("--budget", default="derived:rtx3060-12gb", help="expert budgets, comma-separated (see below)")
    ap.add_argument("--copy-path", default="raw,jax", help="raw (cudaMemcpyAsync via CuPy) and/or jax (device_put)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds: runs per configuration (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default: %(default)s)")
    ap.add_argument("--interleave", choices=("token", "run"), default="token",
                    help="within a round, alternate the configurations token by token (default) or run each one "
                         "whole (the protocol of runs 4-5 in docs/validation.md)")
    ap.add_argument("--calib-fraction", type=float, default=0.25, help="the simulator's calibration window share")
    ap.add_argument("--seed", type=int, default=0, help="weights and static-policy seed")
    ap.add_argument("--distinct", type=int, default=2, help="distinct experts per format, replicated to all ids")
    ap.add_argument("--kernel", choices=("pallas", "reference"), default="pallas",
                    help="expert FFN: the Pallas kernels (interpret mode without a GPU) or the plain-jnp reference")
    ap.add_argument("--shape", choices=("qwen3", "tiny"), default="qwen3",
                    help="qwen3: Qwen3-30B-A3B decode shape; tiny: a small shape with the trace's geometry (tests)")
    ap.add_argument("--calibrate", metavar="JSON",
                    help="first run the micro-calibration (jaxmoe.offload_calib) and write its measurements here")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="skip the rounds that would end after this many seconds (judged by the last round's length; 0: none); "
                         "the complete rounds are written")
    ap.add_argument("--out", required=True, help="output JSON (written atomically; partial results on a deadline)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def tiny_shape(meta) -> Shape:
    return Shape(n_layers=meta.n_layers, n_experts=meta.n_experts, hidden=256, ffn=256, n_heads=2, n_kv=1,
                 head_dim=64, vocab=512)


@exit_on_input_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t_begin = time.perf_counter()
    out_path = Path(args.out)
    if out_path.exists() and out_path.is_dir():
        raise InputError(out_path, "is a directory")
    paths_cp = _split(args.copy_path)
    for cpath in paths_cp:
        if cpath not in ("raw", "jax"):
            raise InputError(None, f"--copy-path {cpath!r}: use raw or jax")
    if args.repeats < 1:
        raise InputError(None, "--repeats must be ≥ 1")
    for prec in _split(args.precision):
        check_executable(prec)  # a precision the executor cannot run fails before any trace is loaded
    from sim.profiles import model_for_trace
    from sim.trace import load_trace

    traces = {}
    for tp in args.traces:
        tr = load_trace(tp)
        model = model_for_trace(tr.meta)
        traces[tp] = (tr, model)
    # one executor per copy path, sized for the traces (all must share layer count, experts and top-k)
    metas = {(m.n_layers, m.n_experts) for tr, m in traces.values()}
    natives = {tuple(m.native_name(la) for la in range(m.n_layers)) for _, m in traces.values()}
    if len(metas) != 1 or len(natives) != 1:
        raise InputError(None, "all traces must share layers, experts and native formats (one executor)")
    (n_layers, n_experts), native_names = metas.pop(), natives.pop()
    top_k = max(tr.meta.top_k for tr, _ in traces.values())
    tr0 = next(iter(traces.values()))[0]
    shape = Shape(n_layers=n_layers, n_experts=n_experts) if args.shape == "qwen3" else tiny_shape(tr0.meta)
    max_pos = max(int(np.max(np.bincount(tr.seq.astype(np.int64)))) for tr, _ in traces.values())
    ctx_cap = 1 << max(6, int(math.ceil(math.log2(max_pos + 1))))
    configs = []  # budget-major, traces innermost: a deadline cuts whole budgets, not a whole trace
    for b in _split(args.budget):
        for pol in _split(args.policy):
            for prec in _split(args.precision):
                for tp, (tr, model) in traces.items():
                    cap, label = resolve_budget(b, model)
                    configs.append((tp, label, cap, pol, prec))
    # the plans come first (CPU only): a bad policy fails before any device work
    plans = {}
    for tp, label, cap, pol, prec in configs:
        try:
            plans[(tp, label, pol, prec)] = simulator_plan(traces[tp][0], policy=pol, precision=prec, capacity_bytes=cap,
                                                           calib_fraction=args.calib_fraction, seed=args.seed)
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(None, f"configuration {pol} {prec} {label}: {exc}") from None
    doc = dict(command="python -m jaxmoe.offload " + " ".join(sys.argv[1:] if argv is None else argv),
               device=device_info(), shape=shape.__dict__, ctx_cap=ctx_cap, distinct=args.distinct, kernel=args.kernel,
               results=[], calibration=None, stopped_early=False)
    _write(out_path, doc)
    ex = Executor(shape, native_names, top_k, copy_path=paths_cp[0], distinct=args.distinct, ctx_cap=ctx_cap,
                  kernel=args.kernel, seed=args.seed)
    t0 = time.perf_counter()
    shapes = set().union(*(ex.launch_shapes(plan) for plan in plans.values()))
    if args.calibrate:
        g_hi = min(8, shape.n_experts)
        shapes |= {(p, g) for p in ex.paths for g in (1, g_hi)}
    ex.precompile(shapes)
    doc["setup_s"] = dict(precompile=time.perf_counter() - t0, total=time.perf_counter() - t_begin)
    print(f"executor ready in {doc['setup_s']['total']:.1f} s (precompile {doc['setup_s']['precompile']:.1f} s)", file=sys.stderr)
    from jaxmoe import offload_calib

    cal = offload_calib.CalibrationRounds(ex, paths_cp) if args.calibrate else None
    jobs = [(c, cp) for c in configs for cp in paths_cp]
    compiled = {c: ex.compile_plan(plans[c[0], c[1], c[3], c[4]]) for c in configs}
    slices = {c: token_slices(v) for c, v in compiled.items()}
    doc["setup_s"]["plans"] = time.perf_counter() - t0 - doc["setup_s"]["precompile"]
    doc["interleave"] = args.interleave
    runs = {j: dict(secs=[], token_s=[], parts=[], bd=ex.new_breakdown(), executed=dict(copies=0, computed=0, tokens=0))
            for j in jobs}
    rng = np.random.default_rng(args.seed)
    show = not args.quiet
    bar = None
    if show:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task("offloaded decode", total=(args.warmup + args.repeats) * len(jobs))
    rounds_done = 0
    try:
        last_round_s = 0.0
        for rnd in range(args.warmup + args.repeats):
            timed = rnd >= args.warmup
            t_round = time.perf_counter()
            if args.deadline_s and t_round - t_begin + last_round_s > args.deadline_s:
                raise _Deadline  # only whole rounds: every configuration has the same runs
            for cpath in paths_cp:  # one copy-path switch per round; jobs in a fresh random order each round
                ex.set_copy_path(cpath)
                gc.collect()
                mine = [j for j in jobs if j[1] == cpath]
                if args.interleave == "token":
                    _token_round(ex, cpath, mine, slices, runs, cal, rng, timed)
                    if bar is not None:
                        bar.update(task, advance=len(mine), description=f"round {rnd + 1}: {cpath}")
                    continue
                if cal is not None:  # warm-up rounds too: their first use of each synthetic plan is discarded
                    cal.round(ex, cpath, rng, keep=timed)
                for i in rng.permutation(len(mine)):
                    job = mine[i]
                    st = runs[job]
                    before = _bd_totals(st["bd"])
                    secs = ex.run(compiled[job[0]], st["bd"] if timed else None)
                    if timed:
                        _keep_run(st, secs, ex.token_s, before, ex.counts)
                    if bar is not None:
                        bar.update(task, advance=1, description=f"round {rnd + 1}: {cpath} {job[0][3]} {job[0][4]} {job[0][1]}")
            last_round_s = time.perf_counter() - t_round
            if timed:
                rounds_done += 1
                _grid_records(doc, ex, jobs, plans, runs, rounds_done)
                _write(out_path, doc)
    except _Deadline:
        doc["stopped_early"] = True
    finally:
        if bar is not None:
            bar.stop()
    if cal is not None and rounds_done:  # once, after the rounds: it also times the raw copy floor and kernels
        doc["calibration"] = cal.result(ex) | dict(interleave=args.interleave)
        _write(Path(args.calibrate), doc["calibration"])
    doc["rounds"] = rounds_done
    doc["elapsed_s"] = time.perf_counter() - t_begin
    _write(out_path, doc)
    return doc


def token_slices(compiled: list) -> list[list]:
    """A compiled plan cut into its tokens (each a compiled plan of its own, ending at a token's last layer)."""
    out, cur = [], []
    for grp in compiled:
        cur.append(grp)
        if grp[2]:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _token_round(ex, cpath: str, mine: list, slices: dict, runs: dict, cal, rng, timed: bool) -> None:
    """One round of copy path `cpath`, interleaved token by token: token t of every job (grid configurations and
    the calibration's synthetic plans) runs, in a fresh random order, before any job's token t + 1.

    Why: in run 5 (docs/validation.md) a whole run of this host-bound loop is uniformly fast or slow (the run's
    median token varies as much as the run) while its consecutive tokens vary little: a slow host state lasts
    about as long as one run. Spread over the round, each configuration's tokens sample many such states
    instead of one. Each token starts and ends synchronised (its last layer's head waits for the argmax on
    the host), so a token's wall time is the same whether its neighbours are its own plan's or another's.
    """
    units = [(("grid", j), slices[j[0]]) for j in mine]
    head = 0.0
    if cal is not None:
        head = cal.head(ex, cpath, keep=timed)
        units += [(("cal", key), token_slices(comp)) for key, comp, _, _ in cal.jobs[cpath]]
    total = {u: 0.0 for u, _ in units}
    toks = {u: [] for u, _ in units}
    before = {u: _bd_totals(runs[u[1]]["bd"]) for u, _ in units if u[0] == "grid"}
    execd = {u: dict(copies=0, computed=0, tokens=0) for u, _ in units}
    for t in range(max(len(sl) for _, sl in units)):
        live = [(u, sl) for u, sl in units if t < len(sl)]
        for i in rng.permutation(len(live)):
            u, sl = live[i]
            secs = ex.run(sl[t], runs[u[1]]["bd"] if timed and u[0] == "grid" else None)
            total[u] += secs
            toks[u].append(secs)
            for k in execd[u]:
                execd[u][k] += ex.counts[k]
    if not timed:
        return
    for u, _ in units:
        if u[0] == "cal":
            cal.record(cpath, u[1], total[u], head)
            continue
        _keep_run(runs[u[1]], total[u], toks[u], before[u], execd[u])


def _keep_run(st: dict, secs: float, token_s: list, before: dict, executed: dict) -> None:
    """Keep one timed run of a configuration: its seconds, per-token seconds, loop split (its breakdown's
    totals now less `before`, taken when the run began) and what it executed."""
    st["secs"].append(secs)
    st["token_s"].append(token_s)
    st["parts"].append({k: round(v - before[k], 6) for k, v in _bd_totals(st["bd"]).items()})
    for k in st["executed"]:
        st["executed"][k] += executed[k]


def _bd_totals(bd: dict) -> dict:
    """Seconds so far per part of the decode loop (router wait, dispatch, copy issue, stall, head), summed over layers."""
    return {k.removesuffix("_s"): float(np.sum(v)) for k, v in bd.items()}


class _Deadline(Exception):
    """--deadline-s would pass during the next round: stop before it (every configuration keeps the same rounds)."""


def _grid_records(doc: dict, ex, jobs: list, plans: dict, runs: dict, rounds: int) -> None:
    """doc["results"]: one record per (configuration, copy path) over its first `rounds` timed runs."""
    doc["results"] = []
    for (tp, label, cap, pol, prec), cpath in jobs:
        st = runs[(tp, label, cap, pol, prec), cpath]
        if not st["secs"]:
            continue
        plan = plans[(tp, label, pol, prec)]
        rec = dict(trace=Path(tp).name, budget=label, capacity_bytes=int(cap), policy=pol,
                   precision=plan.sim["precision"], copy_path=cpath)
        rec.update(summarize_runs(ex, plan, st["secs"][:rounds], st["bd"], st["executed"], st["token_s"][:rounds]))
        rec["parts_s_per_run"] = st["parts"][:rounds]  # each run's loop split: which part makes a slow run slow
        doc["results"].append(rec)


def _write(path: Path, doc) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=json_default) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    main()
