"""The 48-layer, 128-expert, top-8 pipeline (issue 10): train, record, quantize, measure — one GPU command.

    # on the GPU machine (one command, < 10 min; the exact command used is in docs/quality.md)
    bash jaxmoe/scale_device.sh $OUT --out /tmp/out --workers 15 --time-budget-s 120 --eval-chunks 48
    # the markdown tables of a result
    python -m jaxmoe.scale --report results/quality-48l.json
    # CPU smoke run of the same code path (tests/test_scale.py)
    python -m jaxmoe.scale --tiny --data data/corpus --out /tmp/scale-tiny

Why one command: the float model (1.2 B expert weights, ≈5 GB) cannot leave the GPU machine, so
everything that needs its weights runs while they are in memory, and only results come back:
1. **Train** (`MODEL48`: Qwen3-30B-A3B's routing geometry — 48 layers, 128 experts, top-8,
   normalized top-k, GQA 4:2 — at hidden 256 and expert FFN 256; K-quant rows must be whole 256-weight
   super-blocks, so neither can be smaller, and Qwen3's ffn/hidden ratio of 0.375 is impossible at this
   width). `moe_scan`: layers in `lax.scan` with `jax.checkpoint`, experts as an exact sparse grouped
   dispatch; bf16 matmuls, float32 master weights, AdamW and the load-balancing loss of `jaxmoe.train`.
   Seeded; a fixed step count (`--steps`) fixes the schedule, `--time-budget-s` is a guard.
   Held-out perplexity (eval split, all window positions) is logged every `eval_every` steps.
2. **Trace**: 16 calibration prompts (calib split) then 48 evaluation prompts (eval split), 32 tokens
   each, 512 decode steps sampled like llama.cpp's defaults (temperature 0.8, top-k 40, seeded), routed by the float model (`record.choose_prompts`), saved as a
   `sim.trace` with Qwen3-30B-A3B's name prefix so that the simulator prices it with that model's
   byte sizes (the routing is this model's; the provenance says so). Gates are rounded to multiples
   of 2⁻¹¹ with their sum kept at exactly 1 (largest remainder), so they store losslessly as float16.
3. **Quantize** (CPU process pool, `jaxmoe.quants`), in phases: first float → Q4_K (the served model),
   Q4_K → Q3_K and Q4_K → Q2_K (re-quantized, the low copies a cache would hold); then float → Q2_K
   directly (compounding) and Q4_K → Q2_K weighted by an importance matrix (`jaxmoe.imatrix`: per expert,
   per input column Σ x² / count over the calibration tokens routed to it). The later phases' rows are
   skipped when they are not ready by `--late-deadline-s`.
4. **Quality** (`jaxmoe.quality`'s method: chunks of 512, the second half scored): every configuration
   against BOTH the float and the Q4_K model — KLD, PPL ratio, same-top-1 with paired bootstrap 95 %
   intervals over chunks; paired differences between signals.
5. **Cache-coupled quality**: the Q4_K model's routing over calibration + evaluation chunks (each
   chunk one teacher-forced decode sequence) is replayed through `sim.engine` (the simulator's cache
   and precision decisions) at the 12 GB card's derived budget and a tight one; each access's served
   format (or skip) becomes a per-(token, layer, expert) plan for a second forward pass; selections
   the plan does not hold (routing drift: the served formats change the routing downstream) follow
   the policy's own rule as misses, and their share is reported.
6. A compact model for CPU tests (4 layers, 8 experts, top-2, tied embedding) as a Q4_K GGUF.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import model as M
from jaxmoe import moe_scan as S
from jaxmoe import quants
from jaxmoe import train as TR
from jaxmoe.quality import _ci, _kl_terms, bootstrap_indices, make_chunks, threshold_pair
from jaxmoe.record import choose_prompts
from sim.io import InputError, exit_on_input_error, json_default, write_text_atomic
from sim.precision import demoted_experts, importance
from sim.trace import DECODE, PREFILL, Trace, TraceMeta, save_trace

F32 = jnp.float32
MODEL48 = M.Config(vocab=8192, hidden=256, n_layers=48, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=128,
                   top_k=8, expert_ffn=256, norm_topk_prob=True, rope_theta=10_000.0, rms_eps=1e-6, max_seq=544)
TINY = M.Config(vocab=8192, hidden=256, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=64, n_experts=16, top_k=4,
                expert_ffn=256, rope_theta=10_000.0, max_seq=96)
COMPACT = M.Config(vocab=8192, hidden=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8, top_k=2,
                   expert_ffn=256, rope_theta=10_000.0, max_seq=512, tie_embeddings=True)
GATE_UNIT = 2048  # trace gates are multiples of 1/GATE_UNIT (exact in float16)
TRACE_MODEL = "qwen3-30b-a3b-geometry jaxmoe 48-layer model (routing of a small trained model, NOT Qwen3-30B-A3B)"
EXPERT_KINDS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one pipeline run (FULL on the GPU, SMOKE for the CPU test)."""

    cfg: M.Config
    train: TR.TrainConfig
    prompt_tokens: int = 32
    decode: int = 512
    calib_seqs: int = 16
    eval_seqs: int = 48
    n_ctx: int = 512
    eval_chunks: int = 64
    calib_chunks: int = 16
    coupled_calib_chunks: int = 4  # sim's pure-Python replay (no numba on the GPU machine): ~15 µs per access
    coupled_eval_chunks: int = 12
    batch_chunks: int = 8
    n_boot: int = 1000
    fractions: tuple[float, ...] = (0.25, 0.5)
    # static demotion by gate-mass share (the operating points the replays serve): per layer, the least-mass
    # experts whose summed calibration mass stays within this share of the layer's
    mass_shares: tuple[float, ...] = (0.1, 0.25, 0.5)
    # trace decoding: sampled like llama.cpp's defaults (temperature 0.8, top-k 40), seeded; 0 → greedy argmax
    # (greedy decoding of a small model repeats itself, and repeated tokens route alike)
    temperature: float = 0.8
    sample_top_k: int = 40
    sample_seed: int = 0
    budgets: tuple[str, ...] = ("derived", "4GiB")
    compact_steps: int = 300
    compact_seconds: float = 30.0
    workers: int = 15
    fit_schedule: bool = True  # fit the step count to the time budget after 10 steps (False with --steps)
    compact_after_s: float = 470.0  # skip the compact model when the run has taken longer than this
    late_set_deadline_s: float = 420.0  # wait for the later quantization phases until this many s into the run
    eval_windows: int = 64  # windows of the periodic held-out evaluation


FULL = Plan(cfg=MODEL48, train=TR.TrainConfig(batch=64, seq=512, epochs=4.0, lr=3e-3, warmup_steps=50, log_every=10,
                                              eval_every=50, time_budget_s=160.0))
SMOKE = Plan(cfg=TINY, train=TR.TrainConfig(batch=4, seq=64, epochs=1.0, max_steps=4, lr=3e-3, warmup_steps=2,
                                            log_every=2, eval_every=2, time_budget_s=120.0, compute_dtype="float32"),
             prompt_tokens=8, decode=16, calib_seqs=2, eval_seqs=4, n_ctx=64, eval_chunks=4, calib_chunks=2,
             coupled_calib_chunks=2, coupled_eval_chunks=3, batch_chunks=2, n_boot=200, fractions=(0.5,), budgets=("derived", "25%"),
             compact_steps=3, compact_seconds=60.0, workers=2, eval_windows=4, compact_after_s=1e9, fit_schedule=False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- training

def cast_stacked(w: M.Weights, dtype) -> M.Weights:
    """Matrices (not norms, not routers) of stacked weights cast to dtype."""
    lw = w.layers
    lw = dataclasses.replace(lw, wq=lw.wq.astype(dtype), wk=lw.wk.astype(dtype), wv=lw.wv.astype(dtype),
                             wo=lw.wo.astype(dtype), experts=jax.tree_util.tree_map(lambda a: a.astype(dtype), lw.experts))
    return dataclasses.replace(w, embed=w.embed.astype(dtype), layers=lw,
                               lm_head=None if w.lm_head is None else w.lm_head.astype(dtype))


def _loss(params, batch, cfg, tcfg):
    w = cast_stacked(params, jnp.dtype(tcfg.compute_dtype))
    hidden, aux = S.forward(batch[:, :-1], w, cfg, checkpoint=True, want_probs_stats=True)
    logits = S.logits_of(hidden, w)
    ce = jnp.mean(TR._nll(logits, batch[:, 1:]))
    lb = cfg.n_experts * jnp.mean(jnp.sum(aux["f"] * aux["p_mean"], axis=-1))
    return ce + tcfg.aux_coef * lb, (ce, lb)


def _step(state, tokens, starts, total, cfg, tcfg):
    batch = TR._gather(tokens, starts, tcfg.seq)
    (loss, (ce, aux)), grads = jax.value_and_grad(_loss, has_aux=True)(state.params, batch, cfg, tcfg)
    gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    scale = jnp.minimum(1.0, tcfg.grad_clip / (gnorm + 1e-6))
    grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    lr = TR.lr_at(state.step, total, tcfg)
    return TR.adamw(state, grads, lr, tcfg), {"loss": loss, "ce": ce, "aux": aux, "grad_norm": gnorm, "lr": lr}


train_step = jax.jit(_step, static_argnames=("cfg", "tcfg"), donate_argnums=(0,))


def _eval_nll_fn(cfg):
    @jax.jit
    def f(params, batch):
        with jax.default_matmul_precision("highest"):
            hidden, _ = S.forward(batch[:, :-1], params, cfg)
            return jnp.sum(TR._nll(S.logits_of(hidden, params), batch[:, 1:]))
    return f


def heldout_ppl(params, tokens: np.ndarray, cfg: M.Config, seq: int, batch: int, n_windows: int, fn=None) -> float:
    """Perplexity over the first n_windows windows of seq+1 tokens (every position scored)."""
    fn = fn or _eval_nll_fn(cfg)
    starts = TR.windows(tokens.size, seq)[:n_windows]
    nll, n = 0.0, 0
    for i in range(0, starts.size, batch):
        b = np.stack([tokens[s:s + seq + 1] for s in starts[i:i + batch]]).astype(np.int32)
        nll += float(fn(params, jnp.asarray(b)))
        n += b.shape[0] * seq
    return math.exp(nll / n)


EVAL_FIRST_S, EVAL_S = 20.0, 4.0  # seconds of the first (compiling) and of a later periodic evaluation (H100, 48 layers)


def train_model(cfg: M.Config, tcfg: TR.TrainConfig, train_tokens: np.ndarray, eval_tokens: np.ndarray,
                eval_windows: int, label: str = "train", fit_schedule: bool = False) -> tuple[M.Weights, dict]:
    """Train stacked weights from seed; returns (float32 params on device, training log).

    fit_schedule: after 10 steps, shorten the planned step count (and so the cosine schedule) to what the
    time budget allows at the measured step time; the log's `steps_planned` is the count used, and
    `--steps` with that count (without fitting) repeats the run's schedule."""
    starts_all = TR.windows(train_tokens.size, tcfg.seq)
    steps_per_epoch = starts_all.size // tcfg.batch
    if steps_per_epoch == 0:
        raise InputError(None, f"{train_tokens.size} training tokens: fewer than one batch")
    total = max(1, round(tcfg.epochs * steps_per_epoch))
    if tcfg.max_steps > 0:
        total = min(total, tcfg.max_steps)
    t_init = time.perf_counter()
    params = jax.device_put(S.stack_layers(M.init_weights(cfg, tcfg.seed)))
    state = TR.init_state(params)
    init_s = time.perf_counter() - t_init
    log(f"{label}: params {M.param_count(cfg)}; {total} steps planned ({steps_per_epoch}/epoch), init {init_s:.1f} s")
    tokens_dev = jnp.asarray(train_tokens.astype(np.int32))
    rng = np.random.default_rng(tcfg.seed)
    order: list[int] = []
    curve, evals = [], []
    eval_fn = _eval_nll_fn(cfg)
    step_tcfg = TR.step_config(tcfg)
    total_dev = jnp.float32(total)
    t0 = time.perf_counter()
    compile_s, t_train, step, stopped_early, eval_s = None, None, 0, False, 0.0
    step = -1
    while step + 1 < total:
        step += 1
        if not order:
            order = rng.permutation(starts_all.size)[: steps_per_epoch * tcfg.batch].tolist()
        idx, order = order[: tcfg.batch], order[tcfg.batch:]
        state, m = train_step(state, tokens_dev, jnp.asarray(starts_all[idx].astype(np.int32)), total_dev,
                              cfg=cfg, tcfg=step_tcfg)
        if compile_s is None:
            jax.block_until_ready(m["loss"])
            compile_s = time.perf_counter() - t0
            t_train = time.perf_counter()
        if fit_schedule and step == 10:
            jax.block_until_ready(m["loss"])
            step_s = (time.perf_counter() - t_train) / 10
            left = tcfg.time_budget_s - (time.perf_counter() - t0)
            # periodic held-out evaluations come out of the same budget: the first compiles (≈ EVAL_FIRST_S)
            n_evals = int(left / step_s) // tcfg.eval_every
            left -= (EVAL_FIRST_S + EVAL_S * max(0, n_evals - 1)) if n_evals else 0.0
            fitted = min(total, step + 1 + int(left / (step_s * 1.03)) - 2)
            log(f"{label}: {step_s:.3f} s/step; schedule {total} → {fitted} steps to fit {tcfg.time_budget_s:.0f} s")
            total = max(step + 2, fitted)
            total_dev = jnp.float32(total)

        if (step + 1) % tcfg.log_every == 0 or step + 1 == total:
            row = {k: float(v) for k, v in m.items()} | {"step": step + 1, "tokens": (step + 1) * tcfg.batch * tcfg.seq,
                                                        "elapsed_s": round(time.perf_counter() - t0, 2)}
            curve.append(row)
            log(f"{label} step {step + 1}  loss {row['loss']:.4f} ce {row['ce']:.4f} aux {row['aux']:.3f} "
                f"|g| {row['grad_norm']:.2f} lr {row['lr']:.2e} {row['elapsed_s']:.0f}s")
        if (step + 1) % tcfg.eval_every == 0 and step + 1 < total:
            te = time.perf_counter()
            ppl = heldout_ppl(state.params, eval_tokens, cfg, tcfg.seq, tcfg.batch, eval_windows, eval_fn)
            eval_s += time.perf_counter() - te
            evals.append({"step": step + 1, "tokens": (step + 1) * tcfg.batch * tcfg.seq, "ppl": ppl})
            log(f"{label}   held-out ppl {ppl:.3f} at step {step + 1}")
        if time.perf_counter() - t0 > tcfg.time_budget_s:
            stopped_early = step + 1 < total
            break
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t_train - eval_s
    done = step + 1
    ppl = heldout_ppl(state.params, eval_tokens, cfg, tcfg.seq, tcfg.batch, eval_windows, eval_fn)
    evals.append({"step": done, "tokens": done * tcfg.batch * tcfg.seq, "ppl": ppl})
    log(f"{label}: {done} steps, final held-out ppl {ppl:.3f}")
    info = {"model": cfg.to_dict(), "train": dataclasses.asdict(tcfg), "params": M.param_count(cfg),
            "steps_planned": total, "steps_done": done, "stopped_early": stopped_early,
            "tokens_seen": done * tcfg.batch * tcfg.seq, "epochs_done": done / steps_per_epoch,
            "train_tokens": int(train_tokens.size), "init_s": round(init_s, 1), "compile_s": round(compile_s, 1),
            "train_s": round(train_s, 1), "periodic_eval_s": round(eval_s, 1),
            "tokens_per_s": round((done - 1) * tcfg.batch * tcfg.seq / max(train_s, 1e-9)),
            "heldout": {"windows": eval_windows, "seq": tcfg.seq, "what": "eval split, every position of each window"},
            "curve": curve, "evals": evals}
    return state.params, info


# ----------------------------------------------------------------------------- trace

def round_gates(g: np.ndarray, unit: int = GATE_UNIT) -> np.ndarray:
    """Gates [..., k] (each row sums to 1) → multiples of 1/unit summing to exactly 1 (largest remainder),
    in float32; the rank order of a row is kept (ties may form). Exact in float16 for unit ≤ 2048."""
    g = np.asarray(g, np.float64)
    g = g / g.sum(-1, keepdims=True)
    scaled = g * unit
    base = np.floor(scaled)
    short = (unit - base.sum(-1)).astype(np.int64)  # units still to hand out, 0..k
    frac = scaled - base
    order = np.argsort(-frac, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1, kind="stable")
    base = base + (rank < short[..., None])
    # keep rank order: a larger gate never ends below a smaller one (rounding up a smaller one can invert)
    base = -np.sort(-base, axis=-1)
    return (base / unit).astype(np.float32)


def record_trace(params, cfg: M.Config, calib_tokens, eval_tokens, plan: Plan) -> tuple[dict, dict]:
    """Decode calibration then evaluation prompts (sampled: `plan.temperature`, `plan.sample_top_k`, seeded;
    greedy at temperature 0) → routing arrays and provenance."""
    pc, dc = choose_prompts(calib_tokens, plan.calib_seqs, plan.prompt_tokens)
    pe, de = choose_prompts(eval_tokens, plan.eval_seqs, plan.prompt_tokens)
    prompts = np.concatenate([pc, pe])
    B, P = prompts.shape
    S_len = P + plan.decode
    if S_len > cfg.max_seq:
        raise InputError(None, f"prompt {P} + decode {plan.decode} exceed the model's context {cfg.max_seq}")
    step = jax.jit(lambda t, w, c: S.decode_tokens(t, w, cfg, c))
    pick = jax.jit(lambda lg, key: next_tokens(lg, key, plan.temperature, plan.sample_top_k))
    key = jax.random.PRNGKey(plan.sample_seed)
    cache = M.init_cache(cfg, B, S_len)
    t0 = time.perf_counter()
    with jax.default_matmul_precision("highest"):
        lg, ids, gates, cache = step(jnp.asarray(prompts), params, cache)
        parts = [(ids, gates)]
        decoded = []
        for _ in range(plan.decode):
            key, sub = jax.random.split(key)
            tok = pick(lg, sub)
            decoded.append(tok)
            lg, ids, gates, cache = step(tok[:, None], params, cache)
            parts.append((ids, gates))
    ids = np.concatenate([np.asarray(p[0]) for p in parts], axis=1)  # [B, S, L, k]
    gates = np.concatenate([np.asarray(p[1]) for p in parts], axis=1)
    dec = np.stack([np.asarray(d) for d in decoded], axis=1)
    secs = time.perf_counter() - t0
    log(f"trace: {B} sequences × ({P} prompt + {plan.decode} decode) in {secs:.1f} s")
    distinct = [len(np.unique(r)) for r in dec]
    info = {"calib_docs": dc.tolist(), "eval_docs": de.tolist(), "prompt_tokens": P, "decode_tokens": plan.decode,
            "record_s": round(secs, 1), "distinct_decoded_tokens_per_seq": distinct,
            "decode": (f"sampled: temperature {plan.temperature:g}, top-k {plan.sample_top_k}, seed {plan.sample_seed}"
                       if plan.temperature > 0 else "greedy argmax"),
            "distinct_decoded_tokens_mean": round(float(np.mean(distinct)), 1)}
    return {"ids": ids, "gates": gates}, info


def next_tokens(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """int32 [B] next tokens of logits [B, V]: argmax at temperature 0, else a draw from the softmax of the
    `top_k` largest logits divided by the temperature."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v, i = jax.lax.top_k(logits.astype(F32), min(top_k, logits.shape[-1]))
    choice = jax.random.categorical(key, v / temperature, axis=-1)
    return jnp.take_along_axis(i, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def build_trace(rec: dict, cfg: M.Config, prompt_tokens: int, provenance: str, extra: dict) -> Trace:
    """Sequences one after another (prompt steps, phase prefill, then decode steps)."""
    B, S_len, L, k = rec["ids"].shape
    phase = np.where(np.arange(S_len) < prompt_tokens, PREFILL, DECODE).astype(np.uint8)
    meta = TraceMeta(model=TRACE_MODEL, n_layers=L, n_experts=cfg.n_experts, top_k=k, provenance=provenance,
                     extra=extra | {"norm_topk": bool(cfg.norm_topk_prob)})
    return Trace.from_arrays(rec["ids"].reshape(B * S_len, L, k), round_gates(rec["gates"]).reshape(B * S_len, L, k),
                             np.tile(phase, B), np.repeat(np.arange(B, dtype=np.int32), S_len), meta)


# ----------------------------------------------------------------------------- quantization (process pool)

def imatrix_supported() -> bool:
    """True when jaxmoe.quants.quantize takes ggml's quant_weights (the importance-matrix path)."""
    return "quant_weights" in inspect.signature(quants.quantize).parameters


# set names: q4 = float → Q4_K; q3r / q2r = Q4_K → Q3_K / Q2_K; q2d = float → Q2_K; q2ri = Q4_K → Q2_K with imatrix.
# Arrays on disk are in GGUF layout (rows along the contiguous dimension): gate/up [L, E, F, D], down [L, E, D, F].


def imatrix_spread(w: np.ndarray) -> dict:
    """How uneven an imatrix [L, E, K] is: quantiles over (layer, expert) rows of max / median column weight
    (1 = flat; the weighted quantizer then does little), for reading a weighted copy's quality afterwards."""
    rows = w.reshape(-1, w.shape[-1]).astype(np.float64)
    med = np.median(rows, axis=1)
    ratio = rows.max(axis=1) / np.where(med > 0, med, np.nan)
    q = ([round(float(x), 3) for x in np.nanquantile(ratio, [0.5, 0.9, 0.99, 1.0])] if np.isfinite(ratio).any()
         else [None] * 4)  # JSON has no NaN
    return {"max_over_median_q50_q90_q99_max": q,
            "rows_with_zero_median": int((med <= 0).sum())}


def _quant_job(args) -> tuple[int, str, float]:
    """One (layer, kind) of the listed sets: dequantized weights into the memmaps under folder `d`.
    "q4" computes float → Q4_K; sets derived from Q4_K read it back when this job does not compute it."""
    d, layer, kind, sets = args
    t0 = time.perf_counter()
    a = np.ascontiguousarray(np.load(f"{d}/float_{kind}.npy", mmap_mode="r")[layer], np.float32)  # [E, rows, K]
    shape = a.shape
    outs = {s: np.load(f"{d}/{s}_{kind}.npy", mmap_mode="r+") for s in sets}
    qw = None
    if _weighted(sets):
        qw = np.asarray(np.load(f"{d}/imatrix_{kind}.npy", mmap_mode="r")[layer], np.float32)  # [E, K]
    if "q4" in sets:
        q4 = quants.dequantize(quants.quantize(a, "q4_k"), "q4_k", shape)
        outs["q4"][layer] = q4
        outs["q4"].flush()
        Path(f"{d}/q4_{kind}_{layer}.done").touch()
    elif any(s[2] != "d" for s in sets):
        if not Path(f"{d}/q4_{kind}_{layer}.done").exists():  # not yet written by its phase-1 job: recompute
            q4 = quants.dequantize(quants.quantize(a, "q4_k"), "q4_k", shape)
        else:
            q4 = np.ascontiguousarray(np.load(f"{d}/q4_{kind}.npy", mmap_mode="r")[layer])
    for s in sets:
        if s == "q4":
            continue
        fmt = {"3": "q3_k", "2": "q2_k"}[s[1]]
        src_arr = a if s[2] == "d" else q4
        b = quants.quantize(src_arr, fmt, quant_weights=qw) if s.endswith("i") else quants.quantize(src_arr, fmt)
        outs[s][layer] = quants.dequantize(b, fmt, shape)
        outs[s].flush()
    return layer, kind, time.perf_counter() - t0


PHASES = (("q4", "q2r", "q3r"), ("q2d",), ("q2ri",))  # essential first; later phases are dropped when late


def _weighted(phase: tuple[str, ...]) -> bool:
    """Whether a phase quantizes with the importance matrix (its sets end in "i")."""
    return any(s.endswith("i") for s in phase)


def start_quantization(experts_np: dict[str, np.ndarray], d: Path, workers: int):
    """Write the float experts (GGUF layout) to d and queue the phases that need only them (FIFO: phase by
    phase) → ({set: futures}, pool). The importance-matrix phase follows with `queue_imatrix_phase` once the
    calibration pass has measured it, so the CPUs start while the GPU still computes the imatrix."""
    d.mkdir(parents=True, exist_ok=True)
    for kind, a in experts_np.items():
        np.save(d / f"float_{kind}.npy", a)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    futs: dict[str, list] = {}
    for ph in PHASES:
        if not _weighted(ph):
            _queue(pool, futs, d, ph)
    return futs, pool


def queue_imatrix_phase(pool, futs: dict[str, list], imatrix: dict[str, np.ndarray], d: Path) -> None:
    """Queue the importance-matrix-weighted phases (after the float-only ones: FIFO)."""
    for kind, a in imatrix.items():
        np.save(d / f"imatrix_{kind}.npy", np.asarray(a, np.float32))
    for ph in PHASES:
        if _weighted(ph):
            _queue(pool, futs, d, ph)


def _queue(pool, futs: dict[str, list], d: Path, phase: tuple[str, ...]) -> None:
    """Create the phase's output memmaps (the float experts' shape) and submit one job per (layer, kind)."""
    for kind in EXPERT_KINDS:
        shape = np.load(d / f"float_{kind}.npy", mmap_mode="r").shape
        for s in phase:
            np.lib.format.open_memmap(d / f"{s}_{kind}.npy", mode="w+", dtype=np.float32, shape=shape).flush()
    n_layers = shape[0]
    jobs = [pool.submit(_quant_job, (str(d), l, kind, phase)) for l in range(n_layers) for kind in EXPERT_KINDS]
    for s in phase:
        futs[s] = jobs


def wait_sets(futs: dict[str, list], names: Sequence[str], deadline: float | None = None) -> tuple[list[str], float]:
    """Wait for the jobs of `names` until `deadline` (perf_counter time; None: no limit) → (sets complete, worker-s)."""
    from concurrent.futures import wait
    done, secs, counted = [], 0.0, set()
    for n in names:
        jobs = futs[n]
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        finished, pending = wait(jobs, timeout=timeout)
        if not pending:
            done.append(n)
            if id(jobs) not in counted:  # the sets of one phase share their jobs
                counted.add(id(jobs))
                secs += sum(f.result()[2] for f in finished)
    return done, secs


def load_sets(d: Path, sets: Sequence[str]) -> dict[str, M.ExpertWeights]:
    """The dequantized sets back in model layout, on the device."""
    out = {}
    for s in sets:
        arrs = {kind: jnp.swapaxes(jnp.asarray(np.load(d / f"{s}_{kind}.npy", mmap_mode="r")), -1, -2)
                for kind in EXPERT_KINDS}
        out[s] = M.ExpertWeights(**arrs)
    return out


# ----------------------------------------------------------------------------- quality passes

def _pass_fn(cfg: M.Config, first: int):
    @jax.jit
    def f(tokens, weights, sets, choice, ref_f, ref_q):
        with jax.default_matmul_precision("highest"):
            hidden, aux = S.forward(tokens, weights, cfg, sets=sets, choice=choice)
            logp = jax.nn.log_softmax(S.logits_of(hidden[:, first:-1], weights), axis=-1)
        tgt = tokens[:, first + 1:]
        lp_t = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
        st = {"nll": -lp_t}
        for name, ref in (("f", ref_f), ("q", ref_q)):
            rt = jnp.take_along_axis(ref, tgt[..., None], -1)[..., 0]
            st[f"ref_nll_{name}"] = -rt
            st[f"kl_{name}"] = _kl_terms(ref, logp)
            st[f"top1_{name}"] = (jnp.argmax(logp, -1) == jnp.argmax(ref, -1)).astype(F32)
        sums = {k: jnp.sum(v, axis=1) for k, v in st.items()}
        mass = {"total": jnp.sum(aux["gates"]), "low": jnp.sum(aux["low_mass"]), "skip": jnp.sum(aux["skip_mass"])}
        return logp, sums, mass, aux["ids"], aux["gates"]
    return f


def _calib_fn(cfg: M.Config):
    @jax.jit
    def f(tokens, weights, sets, err_sets):
        with jax.default_matmul_precision("highest"):
            _, aux = S.forward(tokens, weights, cfg, sets=sets, err_sets=err_sets, imatrix=True)
        return {k: aux[k] for k in ("ids", "gates", "err_sum", "ref_sq", "err_n", "im_in", "im_act")}
    return f


class Quality:
    """Fixed evaluation chunks, the float and Q4_K reference distributions, and one pass per configuration."""

    def __init__(self, weights: M.Weights, cfg: M.Config, chunks: np.ndarray, batch: int, n_boot: int, seed: int = 0):
        self.w, self.cfg, self.chunks = weights, cfg, chunks
        self.batch = max(1, min(batch, chunks.shape[0]))
        self.first = chunks.shape[1] // 2
        self.n = chunks.shape[1] - 1 - self.first
        self.fn = _pass_fn(cfg, self.first)
        C = chunks.shape[0]
        zeros = jnp.zeros((C, self.n, cfg.vocab), F32)
        self.ref = {"f": zeros, "q": zeros}
        self.boot = bootstrap_indices(C, n_boot, seed)
        self.results: dict[str, dict] = {}

    def run(self, name: str, sets, choice=None, keep: str | None = None, routing: bool = False, plan=None) -> dict:
        """One configuration over all chunks; `keep` stores its log-probs as reference 'f' or 'q'."""
        C, B = self.chunks.shape[0], self.batch
        t0 = time.perf_counter()
        L, E = self.cfg.n_layers, self.cfg.n_experts
        ch = choice or S.static_choice(np.zeros((L, E), np.int32))
        sums, mass, logps, ids_all, gates_all = {}, np.zeros(3), [], [], []
        routing = routing or plan is not None
        for lo in range(0, C, B):
            idx = np.minimum(np.arange(lo, lo + B), C - 1)
            n_real = min(B, C - lo)
            c = ch
            if plan is not None:
                c = dataclasses.replace(ch, plan_ids=jnp.asarray(plan[0][idx]), plan_var=jnp.asarray(plan[1][idx]))
            logp, s, m, ids, gates = self.fn(jnp.asarray(self.chunks[idx]), self.w, sets, c,
                                             self.ref["f"][idx], self.ref["q"][idx])
            for k, v in s.items():
                sums.setdefault(k, []).append(np.asarray(v, np.float64)[:n_real])
            if n_real < B:  # padded chunks repeat the last one: remove their mass
                g = np.asarray(gates, np.float64)
                mass_scale = g[:n_real].sum() / g.sum()
            else:
                mass_scale = 1.0
            mass += np.array([float(m["total"]), float(m["low"]), float(m["skip"])]) * mass_scale
            if keep:
                logps.append(logp[:n_real])
            if routing:
                ids_all.append(np.asarray(ids)[:n_real])
                gates_all.append(np.asarray(gates)[:n_real])
        res = {"sums": {k: np.concatenate(v) for k, v in sums.items()}, "low_mass": mass[1] / mass[0],
               "skipped_mass": mass[2] / mass[0], "seconds": round(time.perf_counter() - t0, 2)}
        if keep:
            self.ref[keep] = jnp.concatenate(logps)
        if routing:
            res["ids"], res["gates"] = np.concatenate(ids_all), np.concatenate(gates_all)
        if plan is not None:  # share of selections whose expert the plan holds (1 − routing drift)
            res["planned_share"] = float(np.mean((res["ids"][..., :, None] == plan[0][..., None, :]).any(-1)))
        self.results[name] = res
        log(f"quality {name}: {self._brief(res)} ({res['seconds']} s)")
        return res

    def _brief(self, res) -> str:
        s, n = res["sums"], self.n
        out = [f"ppl {math.exp(s['nll'].sum() / (s['nll'].size * n)):.3f}"]
        for r in ("f", "q"):
            out.append(f"kld_{r} {s[f'kl_{r}'].sum() / (s[f'kl_{r}'].size * n):.5f}")
        out.append(f"low {res['low_mass']:.1%} skip {res['skipped_mass']:.1%}")
        return " ".join(out)

    def metrics(self, name: str, ref: str) -> dict:
        """KLD, PPL ratio, same-top-1 (and PPL) against reference 'f' (float) or 'q' (Q4_K), with CIs."""
        s, n, boot = self.results[name]["sums"], self.n, self.boot

        def mean(v, idx=None):
            return v.sum() / (v.size * n) if idx is None else v[idx].sum(axis=1) / (idx.shape[1] * n)

        nll, rnll, kl, top1 = s["nll"], s[f"ref_nll_{ref}"], s[f"kl_{ref}"], s[f"top1_{ref}"]
        return {"reference": {"f": "float", "q": "q4_k"}[ref],
                "ppl": math.exp(mean(nll)), "ppl_ci": _ci(np.exp(mean(nll, boot))),
                "ppl_ratio": math.exp(mean(nll) - mean(rnll)), "ppl_ratio_ci": _ci(np.exp(mean(nll, boot) - mean(rnll, boot))),
                "kld": mean(kl), "kld_ci": _ci(mean(kl, boot)), "top1": mean(top1), "top1_ci": _ci(mean(top1, boot)),
                "n_tokens": int(nll.size * n), "n_chunks": int(nll.size)}

    def paired_diff(self, a: str, b: str, ref: str, key: str = "kl") -> dict:
        """Mean per-token (a − b) of KLD (key 'kl') or NLL ('nll') with its paired bootstrap 95 % CI."""
        sa, sb = self.results[a]["sums"], self.results[b]["sums"]
        k = f"{key}_{ref}" if key == "kl" else key
        d = sa[k] - sb[k]
        n = self.n
        m = d.sum() / (d.size * n)
        ci = _ci(d[self.boot].sum(axis=1) / (self.boot.shape[1] * n))
        return {"a": a, "b": b, "metric": "kld" if key == "kl" else "nll", "reference": {"f": "float", "q": "q4_k"}[ref],
                "diff": m, "ci": ci, "verdict": "a lower" if ci[1] < 0 else ("b lower" if ci[0] > 0 else "tie")}


# ----------------------------------------------------------------------------- cache coupling (sim)

def _numba_real() -> bool:
    try:
        import numba
    except ImportError:
        return False
    return not getattr(numba, "JAXMOE_STUB", False)


def _replay_job(args) -> dict:
    """One (precision policy, budget) replay of a saved trace through sim's engine → per-access plan."""
    trace_path, toy, pol, budget, calib_seqs, seed = args
    from sim.budget import default_budget
    from sim.engine import HIT, LOADED, SKIPPED, CacheSpec, replay
    from sim.precision import SLOTS, parse_precision, static_slots
    from sim.profiles import load_hardware, model_for_trace, parse_bytes
    from sim.simulate import Prepared, ReplayConfig, summarize
    from sim.trace import load_trace

    trace = load_trace(trace_path)
    L, k = trace.meta.n_layers, trace.meta.top_k
    model = _toy_profile(trace.meta) if toy else model_for_trace(trace.meta)
    hw = load_hardware("rtx3060-12gb")
    n_seq = len(np.unique(trace.seq))
    frac = calib_seqs / n_seq
    prep = Prepared(trace, model, hw, calib_fraction=frac, ubatch=512, prefetch="none", seed=seed, context=4096)
    total = model.total_expert_bytes()
    if budget == "derived":  # the simulator's default: derived from the card's VRAM, or 40 % when all fits
        cap = default_budget(model, hw, 4096)[0]
    elif budget.endswith("%"):
        cap = int(float(budget[:-1]) / 100 * total)
    else:
        cap = parse_bytes(budget)
    cfg = ReplayConfig(trace=trace, capacity_bytes=cap, precision=pol, timeline=False, calib_fraction=frac)
    policy = parse_precision(pol)
    hi = static_slots(prep.calib_trace, policy, model.n_layers, model.n_experts, seed)
    t0 = time.perf_counter()
    spec = CacheSpec(cfg.policy, int(cap), cfg.partition, model.n_layers, {})
    # the compiled path where numba exists (identical results); sim's pure-Python reference otherwise
    out = replay(prep.groups, spec, policy, hi, prep.sizes, prep.link_s, fast=_numba_real())
    rec = summarize(prep, cfg, policy.name, cap, out)
    first = int(np.flatnonzero(~prep.calib_steps)[0])
    res = np.asarray(out.result).reshape(-1, L, k)[first:]
    slot = np.asarray(out.slot).reshape(-1, L, k)[first:]
    var = np.where(res == SKIPPED, S.SKIP, slot).astype(np.int8)
    return {"policy": pol, "budget": budget, "capacity_bytes": int(cap), "replay_s": round(time.perf_counter() - t0, 1),
            "hit_rate": rec.hit_rate, "low_precision_mass": rec.low_precision_mass,
            "skipped_mass": rec.skipped_mass, "slots": list(SLOTS), "var": var,
            "loaded_share": float(np.mean(res == LOADED)), "hit_share": float(np.mean(res == HIT)),
            "compiled_replay": _numba_real(), "model_profile": model.name, "gpu": hw.name}


def start_coupled(q4_ids, q4_gates, calib_ids, calib_gates, policies: Sequence[str], budgets: Sequence[str],
                  work: Path, n_experts: int, toy: bool, workers: int, seed: int = 0):
    """Start replaying calibration + evaluation chunks (each a teacher-forced decode sequence) through sim's
    cache and precision decisions, one process per (policy, budget), while the GPU goes on; `finish_coupled`
    collects the plans: per evaluation selection the served variant (0 Q4_K, 1 Q2_K, 2 Q3_K = sim.engine.SLOTS)
    or SKIP."""
    C, T, L, k = q4_ids.shape
    Cc = calib_ids.shape[0]
    ids = np.concatenate([calib_ids, q4_ids]).reshape(-1, L, k)
    gates = np.concatenate([calib_gates, q4_gates]).reshape(-1, L, k)
    meta = TraceMeta(model=TRACE_MODEL, n_layers=L, n_experts=n_experts, top_k=k,
                     provenance="jaxmoe.scale coupled-quality routing (Q4_K model, teacher-forced chunks)")
    trace = Trace.from_arrays(ids, round_gates(gates), np.full(ids.shape[0], DECODE, np.uint8),
                              np.repeat(np.arange(Cc + C, dtype=np.int32), T), meta)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "coupled_trace.npz"
    save_trace(trace, path)
    jobs = [(str(path), toy, pol, b, Cc, seed) for b in budgets for pol in policies]
    pool = ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=get_context("spawn"))
    return pool, [pool.submit(_replay_job, j) for j in jobs], q4_ids.astype(np.int32)


def finish_coupled(started) -> list[dict]:
    pool, futs, q4_ids = started
    C, T, L, k = q4_ids.shape
    outs = [f.result() for f in futs]
    pool.shutdown()
    for o in outs:
        o["plan"] = (q4_ids, o.pop("var").astype(np.int32).reshape(C, T, L, k))
        log(f"coupled replay {o['policy']} @ {o['budget']} ({o['capacity_bytes'] / 2**30:.2f} GiB): hit {o['hit_rate']:.3f} "
            f"low {o['low_precision_mass']:.3f} skip {o['skipped_mass']:.3f} ({o['replay_s']} s)")
    return outs


def _toy_profile(meta):
    """A model profile for the tiny CPU config: Qwen3-30B-A3B's per-expert sizes on the toy geometry."""
    from sim.profiles import get_model
    base = get_model("qwen3-30b-a3b")
    return dataclasses.replace(base, name="toy", n_layers=meta.n_layers, n_experts=meta.n_experts, top_k=meta.top_k,
                               native_formats=base.native_formats[:meta.n_layers],
                               dense_bytes=base.dense_bytes[:meta.n_layers])


# ----------------------------------------------------------------------------- the pipeline

def load_split(data: Path, split: str, vocab: int) -> np.ndarray:
    path = data / f"{split}.bin"
    try:
        a = np.fromfile(path, dtype="<u2")
    except OSError as exc:
        raise InputError(path, f"cannot read token file: {exc}") from None
    if a.size == 0 or int(a.max()) >= vocab:
        raise InputError(path, "empty, or token ids outside the vocabulary")
    return a


def run(data: Path, out: Path, plan: Plan, *, work: Path, compact_out: Path | None = None) -> dict:
    """The whole pipeline; writes results JSON, train log and trace into `out`."""
    t_start = time.perf_counter()
    cfg, tcfg = plan.cfg, plan.train
    out.mkdir(parents=True, exist_ok=True)
    train_tokens = load_split(data, "train", cfg.vocab)
    eval_tokens = load_split(data, "eval", cfg.vocab)
    calib_tokens = load_split(data, "calib", cfg.vocab)
    dev = jax.devices()[0]
    log(f"device {dev.platform}:{dev.device_kind}; jax {jax.__version__}; imatrix path: {imatrix_supported()}")

    # 1. train
    params, train_info = train_model(cfg, tcfg, train_tokens, eval_tokens, plan.eval_windows,
                                     fit_schedule=plan.fit_schedule)
    train_info["device"] = f"{dev.platform}:{dev.device_kind}"
    write_text_atomic(out / "train_log.json", json.dumps(train_info, indent=1) + "\n")

    # 2. start quantization on the CPU pool (float-only phases); meanwhile the GPU measures the imatrix,
    #    records the trace and the float reference
    fexp = params.layers.experts
    t_q = time.perf_counter()
    experts_np = {kind: np.asarray(jnp.swapaxes(getattr(fexp, kind), -1, -2)) for kind in EXPERT_KINDS}  # GGUF layout
    qfuts, pool = start_quantization(experts_np, work, plan.workers)
    del experts_np

    # 3. float calibration pass: imatrix (Σ x² per expert and input column) for the weighted quantizer
    cal_chunks = make_chunks(calib_tokens, plan.n_ctx, plan.calib_chunks)
    calib_fn = _calib_fn(cfg)

    def calib_pass(sets, err_sets):
        acc, ids, gates = {}, [], []
        for lo in range(0, cal_chunks.shape[0], plan.batch_chunks):
            toks = jnp.asarray(cal_chunks[lo:lo + plan.batch_chunks])
            r = calib_fn(toks, params, sets, err_sets)
            for k in ("err_sum", "ref_sq", "err_n", "im_in", "im_act"):
                acc[k] = acc.get(k, 0) + np.asarray(r[k], np.float64)
            ids.append(np.asarray(r["ids"]))
            gates.append(np.asarray(r["gates"]))
        return acc, np.concatenate(ids), np.concatenate(gates)

    t0 = time.perf_counter()
    facc, _, _ = calib_pass((fexp,), (fexp, fexp))
    from jaxmoe.imatrix import (
        Imatrix,  # llama-quantize's quant_weights: Σx²/count per column, 1 for unreached experts
    )

    counts = facc["err_n"].round().astype(np.int64)
    im_in = np.stack([Imatrix(facc["im_in"][l], counts[l], cfg.n_experts).quant_weights() for l in range(cfg.n_layers)])
    im_act = np.stack([Imatrix(facc["im_act"][l], counts[l], cfg.n_experts).quant_weights() for l in range(cfg.n_layers)])
    imatrix = {"gate": im_in, "up": im_in, "down": im_act}  # [L, E, K] per kind
    imatrix_stats = {k: imatrix_spread(imatrix[k]) for k in ("gate", "down")}  # gate's is up's
    log(f"imatrix from {cal_chunks.size} calibration tokens in {time.perf_counter() - t0:.1f} s")
    if imatrix_supported():
        queue_imatrix_phase(pool, qfuts, imatrix, work)

    rec, trace_info = record_trace(params, cfg, calib_tokens, eval_tokens, plan)
    prov = (f"jaxmoe.scale: routing of a {cfg.n_layers}-layer, {cfg.n_experts}-expert, top-{cfg.top_k} Qwen3-MoE-architecture "
            f"model trained by this project (hidden {cfg.hidden}, expert FFN {cfg.expert_ffn}; NOT Qwen3-30B-A3B), float weights, "
            f"{trace_info['decode']}; {plan.calib_seqs} calibration prompts (calib split) then {plan.eval_seqs} evaluation prompts "
            f"(eval split), {plan.prompt_tokens} prompt + {plan.decode} decode tokens each; sizes priced as Qwen3-30B-A3B")
    extra = {"source_format": "jaxmoe.scale", "trained_geometry": cfg.to_dict(), "gate_unit": GATE_UNIT,
             "train_steps": train_info["steps_done"], "seed": tcfg.seed} | {k: v for k, v in trace_info.items()
                                                                           if k != "distinct_decoded_tokens_per_seq"}
    trace = build_trace(rec, cfg, plan.prompt_tokens, prov, extra)
    save_trace(trace, out / "trace.npz", compact=True)
    log(f"trace: {trace.n_steps} steps, {(out / 'trace.npz').stat().st_size / 1e6:.1f} MB")
    del rec

    chunks = make_chunks(eval_tokens, plan.n_ctx, plan.eval_chunks)
    Q = Quality(params, cfg, chunks, plan.batch_chunks, plan.n_boot)
    Q.run("float", (fexp,), keep="f")

    # wait for the essential quantized sets (later phases keep running)
    sets_done, qsecs = wait_sets(qfuts, PHASES[0])
    quant_s = time.perf_counter() - t_q
    sets = load_sets(work, sets_done)
    log(f"quantized {', '.join(sets_done)} in {quant_s:.1f} s wall, {qsecs:.0f} worker-s")
    late_sets: dict[str, float] = {}

    def late(name: str) -> bool:
        """Load a later-phase set if its jobs finish by the deadline; False (rows skipped) otherwise."""
        if name in sets:
            return True
        if name not in qfuts:
            return False
        ok, secs = wait_sets(qfuts, [name], t_start + plan.late_set_deadline_s)
        if ok:
            sets.update(load_sets(work, [name]))
            sets_done.append(name)
            late_sets[name] = round(time.perf_counter() - t_q, 1)
            log(f"quantized {name} ({secs:.0f} worker-s), ready {late_sets[name]} s after the start of quantization")
        else:
            log(f"{name} not ready by {plan.late_set_deadline_s:.0f} s: its rows are skipped")
        return bool(ok)

    q4 = sets["q4"]
    ta = M.ExpertWeights(gate=sets["q2r"].gate, up=sets["q2r"].up, down=q4.down)  # tensor-aware: ffn_down kept Q4_K
    r_q4 = Q.run("q4_k", (q4,), keep="q", routing=True)
    # with both references stored, the two reference models' own rows (each against the other)
    Q.run("float", (fexp,))
    Q.run("q4_k", (q4,), routing=True)
    # Q4_K calibration pass: routing for the signals, and each expert's output error when demoted to Q2_K
    qacc, cal_ids, cal_gates = calib_pass((q4,), (q4, sets["q2r"]))
    L, E = cfg.n_layers, cfg.n_experts
    calib_trace = Trace.from_arrays(cal_ids.reshape(-1, L, cfg.top_k), cal_gates.reshape(-1, L, cfg.top_k),
                                    np.full(cal_ids.shape[0] * cal_ids.shape[1], PREFILL, np.uint8),
                                    np.repeat(np.arange(cal_ids.shape[0]), cal_ids.shape[1]),
                                    TraceMeta(model="calibration", n_layers=L, n_experts=E, top_k=cfg.top_k))
    err_mean = np.divide(qacc["err_sum"], qacc["err_n"], out=np.zeros((L, E)), where=qacc["err_n"] > 0)
    signals = {s: importance(calib_trace, s, 0) for s in ("freq", "weight", "mass", "random")}
    signals["err"] = err_mean
    signals["err_mass"] = err_mean * signals["mass"]

    # start the cache replays (CPU processes) for the coupled evaluation; the GPU goes on meanwhile
    Cc = min(plan.coupled_calib_chunks, cal_ids.shape[0])
    Ce = min(plan.coupled_eval_chunks, chunks.shape[0])
    policies = ("native", "static:mass:25%:q2_k", "dynamic:0.6:0.9", "static:mass:25%:q3_k+dynamic:0.6:0.9")
    t_rep = time.perf_counter()
    started = start_coupled(r_q4["ids"][:Ce], r_q4["gates"][:Ce], cal_ids[:Cc], cal_gates[:Cc], policies, plan.budgets,
                            work, E, cfg is TINY, plan.workers + 1)

    # 4. configurations
    rows: list[dict] = []

    def add(name, policy, fmt, source, passes_name=None, **kw):
        r = Q.results[passes_name or name]
        for ref in ("f", "q"):
            rows.append({"name": name, "policy": policy, "format": fmt, "source": source, "low_mass": r["low_mass"],
                         "skipped_mass": r["skipped_mass"], **kw} | Q.metrics(passes_name or name, ref))

    add("float", "native", "f32", "float")
    add("q4_k", "native", "q4_k", "float")
    one = np.ones((L, E), np.int32)

    def all_row(s):
        fmt = {"3": "q3_k", "2": "q2_k"}[s[1]]
        src = {"r": "q4_k", "d": "float", "ri": "q4_k+imatrix"}[s[2:]]
        Q.run(f"all-{s}", (q4, sets[s]), S.static_choice(one))
        add(f"all-{s}", "static", fmt, src, fraction=1.0, signal="all")

    for s in ("q3r", "q2r"):
        all_row(s)
    Q.run("all-ta", (q4, ta), S.static_choice(one))
    add("all-ta", "static", "q2_k+q4_k_down", "q4_k", fraction=1.0, signal="all")
    demoted = {}
    for frac in plan.fractions:
        for sig, score in signals.items():
            dm = demoted_experts(score, frac)
            demoted[f"{sig}:{frac:g}"] = dm
            name = f"static-{sig}-{frac:g}-q2r"
            Q.run(name, (q4, sets["q2r"]), S.static_choice(dm.astype(np.int32)))
            add(name, "static", "q2_k", "q4_k", signal=sig, fraction=frac)
        if frac != plan.fractions[-1]:
            continue
        dm = demoted[f"mass:{frac:g}"]
        name = f"static-mass-{frac:g}-q3r"
        Q.run(name, (q4, sets["q3r"]), S.static_choice(dm.astype(np.int32)))
        add(name, "static", "q3_k", "q4_k", signal="mass", fraction=frac)
        name = f"static-mass-{frac:g}-ta"
        Q.run(name, (q4, ta), S.static_choice(dm.astype(np.int32)))
        add(name, "static", "q2_k+q4_k_down", "q4_k", signal="mass", fraction=frac)
    # the quality-vs-gate-mass curve: static demotion by mass up to a share of each layer's gate mass
    for share in plan.mass_shares:
        dm = demoted_by_mass_share(signals["mass"], share)
        demoted[f"gm:{share:g}"] = dm
        for low_name, low, fmt in (("q2r", sets["q2r"], "q2_k"), ("q3r", sets["q3r"], "q3_k"), ("ta", ta, "q2_k+q4_k_down")):
            name = f"static-gm-{share:g}-{low_name}"
            Q.run(name, (q4, low), S.static_choice(dm.astype(np.int32)))
            add(name, "static", fmt, "q4_k", signal="mass", gate_mass_share=share)
    zero = np.zeros((L, E), np.int32)
    for low_name, low in (("q2r", sets["q2r"]), ("ta", ta)):
        ch = S.Choice(table=jnp.asarray(zero), t1=jnp.asarray(threshold_pair(0.6)), t2=jnp.asarray(threshold_pair(0.9)),
                      dyn_variant=jnp.int32(1))
        name = f"dynamic-0.6-0.9-{low_name}"
        Q.run(name, (q4, low), ch)
        add(name, "dynamic", "q2_k" if low_name == "q2r" else "q2_k+q4_k_down", "q4_k", t1=0.6, t2=0.9,
            accesses="every access a miss")

    # later-phase sets: float → Q2_K (compounding) and the imatrix-weighted Q4_K → Q2_K, if ready in time
    fr = plan.fractions[-1]
    dm = demoted[f"mass:{fr:g}"]
    for s_, src in (("q2d", "float"), ("q2ri", "q4_k+imatrix")):
        if late(s_):
            all_row(s_)
            name = f"static-mass-{fr:g}-{s_}"
            Q.run(name, (q4, sets[s_]), S.static_choice(dm.astype(np.int32)))
            add(name, "static", "q2_k", src, signal="mass", fraction=fr)
    pool.shutdown(wait=False, cancel_futures=True)

    # signal pairs: paired differences of KLD (against float and against Q4_K)
    pairs = []
    for frac in plan.fractions:
        names = [f"static-{s}-{frac:g}-q2r" for s in signals]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for ref in ("f", "q"):
                    pairs.append(Q.paired_diff(a, b, ref) | {"fraction": frac})
        if frac != plan.fractions[-1]:
            continue
        for ref in ("f", "q"):
            for other in ("q2d", "ta", "q2ri"):
                if f"static-mass-{frac:g}-{other}" in Q.results:
                    pairs.append(Q.paired_diff(f"static-mass-{frac:g}-{other}", f"static-mass-{frac:g}-q2r", ref)
                                 | {"fraction": frac})
    for ref in ("f", "q"):
        for other in ("q2d", "ta", "q2ri"):
            if f"all-{other}" in Q.results:
                pairs.append(Q.paired_diff(f"all-{other}", "all-q2r", ref))

    # 5. cache-coupled quality: routing of the Q4_K passes → sim decisions → forward in the served formats
    write_text_atomic(out / "quality-partial.json", json.dumps({"rows": rows, "pairs": pairs}, indent=1,
                                                               default=json_default) + "\n")
    cplans = finish_coupled(started)
    coupled_replay_s = time.perf_counter() - t_rep
    Qc = Quality(params, cfg, chunks[:Ce], plan.batch_chunks, plan.n_boot)
    Qc.ref = {"f": Q.ref["f"][:Ce], "q": Q.ref["q"][:Ce]}
    coupled_rows = []
    cal_trace_c = calib_trace.select(np.arange(Cc * cal_ids.shape[1]))
    for cp in cplans:
        pol = cp["policy"]
        from sim.precision import parse_precision
        pp = parse_precision(pol)
        table = np.zeros((L, E), np.int32)
        if pp.is_static:
            dm = demoted_experts(importance(cal_trace_c, pp.static_signal, 0), pp.static_fraction)
            table = np.where(dm, 1 if pp.static_format == "q2_k" else 2, 0).astype(np.int32)
        t1, t2 = (pp.t1, pp.t2) if pp.is_dynamic else (1.0, 1.0)
        ch = S.Choice(table=jnp.asarray(table), t1=jnp.asarray(threshold_pair(t1)), t2=jnp.asarray(threshold_pair(t2)),
                      dyn_variant=jnp.int32(1 if pp.dynamic_format == "q2_k" else 2))
        name = f"coupled {pol} @ {cp['budget']}"
        r = Qc.run(name, (q4, sets["q2r"], sets["q3r"]), ch, plan=cp["plan"], routing=True)
        for ref in ("f", "q"):
            coupled_rows.append({"name": name, "precision": pol, "budget": cp["budget"], "capacity_bytes": cp["capacity_bytes"],
                                 "sim_hit_rate": cp["hit_rate"], "sim_low_mass": cp["low_precision_mass"],
                                 "sim_skipped_mass": cp["skipped_mass"], "low_mass": r["low_mass"],
                                 "skipped_mass": r["skipped_mass"], "planned_share": r["planned_share"],
                                 "drift_share": 1 - r["planned_share"], "replay_s": cp["replay_s"]} | Qc.metrics(name, ref))
    # uncoupled rows on the same chunks, for a like-for-like comparison
    for name, sets_, ch in (("every-miss dynamic:0.6:0.9", (q4, sets["q2r"]),
                             S.Choice(table=jnp.asarray(zero), t1=jnp.asarray(threshold_pair(0.6)),
                                      t2=jnp.asarray(threshold_pair(0.9)), dyn_variant=jnp.int32(1))),
                            ("q4_k (same chunks)", (q4,), None)):
        Qc.run(name, sets_, ch)
        for ref in ("f", "q"):
            coupled_rows.append({"name": name, "precision": name.split()[-1] if "dynamic" in name else "native",
                                 "budget": "none (every access a miss)" if "dynamic" in name else "n/a",
                                 "low_mass": Qc.results[name]["low_mass"], "skipped_mass": Qc.results[name]["skipped_mass"]}
                                | Qc.metrics(name, ref))

    # 6. compact CPU-test model
    compact = None
    if compact_out is not None and time.perf_counter() - t_start > plan.compact_after_s:
        log(f"compact model skipped: {time.perf_counter() - t_start:.0f} s elapsed > {plan.compact_after_s} s")
    elif compact_out is not None:
        compact = train_compact(train_tokens, eval_tokens, plan, compact_out)

    expert_bytes = {f: 3 * quants_bytes(f, cfg) for f in ("q4_k", "q3_k", "q2_k")}
    expert_bytes["q2_k+q4_k_down"] = 2 * quants_bytes("q2_k", cfg) + quants_bytes("q4_k", cfg)
    result = {
        "command": "python -m jaxmoe.scale " + " ".join(sys.argv[1:]),
        "model": cfg.to_dict(), "params": M.param_count(cfg), "device": f"{dev.platform}:{dev.device_kind}",
        "jax": jax.__version__,
        "train": {k: train_info[k] for k in ("steps_done", "tokens_seen", "epochs_done", "tokens_per_s", "compile_s",
                                             "train_s", "stopped_early")} | {"final_heldout_ppl": train_info["evals"][-1]["ppl"]},
        "setup": {"n_ctx": plan.n_ctx, "eval_chunks": int(chunks.shape[0]), "scored_per_chunk": Q.n,
                  "calib_chunks": int(cal_chunks.shape[0]), "n_boot": plan.n_boot, "ci_level": 0.95,
                  "coupled_eval_chunks": Ce, "coupled_calib_chunks": Cc, "coupled_replay_s": round(coupled_replay_s, 1),
                  "sets": list(sets_done), "imatrix": imatrix_supported(), "quantize_wall_s": round(quant_s, 1),
                  "late_sets_ready_s": late_sets, "imatrix_spread": imatrix_stats,
                  "expert_bytes_at_this_width": expert_bytes,
                  "signals": {"err": "mean ||y_Q2K − y_Q4K||² per routed calibration row (output error when demoted)",
                              "err_mass": "err × summed gate weight (MC-MoE-style frequency × weight × error)"},
                  "skip_rule": "skipped selections contribute nothing; other gates are not renormalised",
                  "demoted": {k: [np.flatnonzero(r).tolist() for r in v] for k, v in demoted.items()}},
        "rows": rows, "pairs": pairs, "coupled": coupled_rows,
        "coupled_replays": [{k: v for k, v in cp.items() if k != "plan"} for cp in cplans],
        "timing": {"total_s": round(time.perf_counter() - t_start, 1),
                   "passes": {k: v["seconds"] for k, v in {**Q.results, **Qc.results}.items()}},
        "compact_model": compact,
    }
    write_text_atomic(out / "quality.json", json.dumps(result, indent=1, allow_nan=False, default=json_default) + "\n")
    log(f"done in {result['timing']['total_s']:.0f} s")
    return result


def demoted_by_mass_share(mass: np.ndarray, share: float) -> np.ndarray:
    """bool [layers, experts]: per layer, the lowest-mass experts (stable order: ties → lower id) whose summed
    mass is at most `share` of the layer's total — demotion sized by gate mass rather than by expert count."""
    m = np.asarray(mass, np.float64)
    order = np.argsort(m, axis=1, kind="stable")
    sorted_m = np.take_along_axis(m, order, axis=1)
    total = m.sum(axis=1, keepdims=True)
    within = np.cumsum(sorted_m, axis=1) <= share * total * (1 + 1e-12)
    out = np.zeros(m.shape, dtype=bool)
    np.put_along_axis(out, order, within, axis=1)
    return out


def quants_bytes(fmt: str, cfg: M.Config) -> int:
    """Bytes of one expert matrix (hidden × expert_ffn) in fmt."""
    from sim.formats import get_format
    return get_format(fmt).nbytes(cfg.hidden * cfg.expert_ffn)


def train_compact(train_tokens, eval_tokens, plan: Plan, out_dir: Path) -> dict:
    """Train the compact CPU-test model briefly and write it as a Q4_K GGUF (experts Q4_K, rest Q8_0)."""
    from jaxmoe import gguf_io

    tc = dataclasses.replace(plan.train, batch=32, seq=256, max_steps=plan.compact_steps, warmup_steps=20,
                             eval_every=10**9, log_every=50, time_budget_s=plan.compact_seconds)
    if plan.cfg is TINY:
        tc = dataclasses.replace(tc, batch=2, seq=32)
    params, info = train_model(COMPACT, tc, train_tokens, eval_tokens, 8, label="compact")
    w = S.unstack_layers(jax.tree_util.tree_map(np.asarray, params), COMPACT.n_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "qwen3moe-compact.gguf"
    tok = Path(__file__).resolve().parent / "tokenizer.json"
    gguf_io.write_gguf(path, w, COMPACT, expert_format="q4_k", dense_format="q8_0",
                       tokenizer_json=tok if tok.is_file() else None, name="jaxmoe-qwen3moe-compact",
                       extra_metadata={"jaxmoe.train.steps": info["steps_done"], "jaxmoe.train.seed": tc.seed,
                                       "jaxmoe.train.eval_ppl_f32": info["evals"][-1]["ppl"]})
    info["gguf_bytes"] = path.stat().st_size
    write_text_atomic(out_dir / "compact_train_log.json", json.dumps(info, indent=1) + "\n")
    return {k: info[k] for k in ("steps_done", "tokens_seen", "tokens_per_s", "gguf_bytes")} | {
        "heldout_ppl": info["evals"][-1]["ppl"], "config": COMPACT.to_dict()}


def probe(cfg: M.Config, tcfg: TR.TrainConfig, steps: int, train_tokens: np.ndarray) -> dict:
    """Compile and time a few training steps of cfg (throughput and memory check before a full run)."""
    tcfg = dataclasses.replace(tcfg, max_steps=steps, eval_every=10**9, log_every=max(1, steps // 3))
    starts = TR.windows(train_tokens.size, tcfg.seq)
    t0 = time.perf_counter()
    params = jax.device_put(S.stack_layers(M.init_weights(cfg, tcfg.seed)))
    state = TR.init_state(params)
    init_s = time.perf_counter() - t0
    tokens_dev = jnp.asarray(train_tokens.astype(np.int32))
    step_tcfg = TR.step_config(tcfg)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = train_step(state, tokens_dev, jnp.asarray(starts[i * tcfg.batch:(i + 1) * tcfg.batch].astype(np.int32)),
                              jnp.float32(steps), cfg=cfg, tcfg=step_tcfg)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
        log(f"probe step {i + 1}: {times[-1]:.3f} s loss {float(m['loss']):.4f}")
    stats = jax.devices()[0].memory_stats() or {}
    out = {"init_s": round(init_s, 1), "compile_s": round(times[0], 1), "step_s": float(np.median(times[1:])),
           "tokens_per_s": tcfg.batch * tcfg.seq / float(np.median(times[1:])),
           "peak_bytes": stats.get("peak_bytes_in_use")}
    log(f"probe: {out}")
    return out


def _f(x: float, ci: Sequence[float] | None = None, pct: bool = False, digits: int = 5) -> str:
    if pct:
        return f"{x:.2%}" + ("" if ci is None else f" [{ci[0]:.2%}, {ci[1]:.2%}]")
    return f"{x:.{digits}f}" + ("" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def report(res: dict) -> str:
    """Markdown tables of a quality JSON (docs/quality.md): configurations, signal pairs, cache-coupled rows."""
    out = ["| configuration | reference | low mass | skipped | KLD [95 % CI] | PPL ratio [95 % CI] | same top-1 [95 % CI] |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['name']} | {r['reference']} | {r['low_mass']:.1%} | {r['skipped_mass']:.1%} | "
                   f"{_f(r['kld'], r['kld_ci'])} | {_f(r['ppl_ratio'], r['ppl_ratio_ci'], digits=4)} | "
                   f"{_f(r['top1'], r['top1_ci'], pct=True)} |")
    out += ["", "| a | b | fraction | reference | KLD(a) − KLD(b) [95 % CI] | verdict |", "|---|---|---|---|---|---|"]
    for p in res["pairs"]:
        out.append(f"| {p['a']} | {p['b']} | {p.get('fraction', 1.0)} | {p['reference']} | "
                   f"{p['diff']:.2e} [{p['ci'][0]:.2e}, {p['ci'][1]:.2e}] | {p['verdict']} |")
    out += ["", ("| configuration | reference | sim hit rate | sim low / skipped mass | pass low / skipped mass | "
                 "drift | KLD [95 % CI] | PPL ratio [95 % CI] | same top-1 [95 % CI] |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res["coupled"]:
        sim = (f"{r['sim_hit_rate']:.3f}", f"{r['sim_low_mass']:.1%} / {r['sim_skipped_mass']:.1%}") \
            if "sim_hit_rate" in r else ("—", "—")
        drift = f"{r['drift_share']:.1%}" if "drift_share" in r else "—"
        out.append(f"| {r['name']} | {r['reference']} | {sim[0]} | {sim[1]} | {r['low_mass']:.1%} / {r['skipped_mass']:.1%} | "
                   f"{drift} | {_f(r['kld'], r['kld_ci'])} | {_f(r['ppl_ratio'], r['ppl_ratio_ci'], digits=4)} | "
                   f"{_f(r['top1'], r['top1_ci'], pct=True)} |")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxmoe.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="corpus folder (train.bin, calib.bin, eval.bin, meta.json)")
    p.add_argument("--out", help="output folder: quality.json, train_log.json, trace.npz")
    p.add_argument("--report", metavar="JSON", help="only print the markdown tables of a quality JSON")
    p.add_argument("--work", default=None, help="scratch folder for the quantization pool (default OUT/work)")
    p.add_argument("--tiny", action="store_true", help="the CPU smoke configuration (tests)")
    p.add_argument("--steps", type=int, default=None, help="training steps (fixes the LR schedule)")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--batch", type=int, default=None, help="training sequences per step (default 64)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every this many steps")
    p.add_argument("--temperature", type=float, default=None,
                   help="trace decoding temperature (default 0.8, top-k 40, seeded; 0: greedy argmax)")
    p.add_argument("--eval-chunks", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="quantization processes")
    p.add_argument("--compact-out", default=None, help="also train the compact CPU-test model and write its GGUF here")
    p.add_argument("--compact-seconds", type=float, default=None)
    p.add_argument("--late-deadline-s", type=float, default=None, help="wait for the later quantization phases until "
                                                                       "this many seconds into the run")
    p.add_argument("--probe-steps", type=int, default=0, help="only compile and time this many training steps of the "
                                                              "48-layer model (no pipeline)")
    return p


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.report:
        try:
            res = json.loads(Path(a.report).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(a.report, f"cannot read quality JSON: {exc}") from None
        print(report(res))
        return 0
    if not a.data or not a.out:
        raise InputError(None, "--data and --out are required (or --report JSON)")
    plan = SMOKE if a.tiny else FULL
    tr = plan.train
    if a.steps is not None:
        tr = dataclasses.replace(tr, max_steps=a.steps)
        plan = dataclasses.replace(plan, fit_schedule=False)
    if a.time_budget_s is not None:
        tr = dataclasses.replace(tr, time_budget_s=a.time_budget_s)
    if a.batch is not None:
        if a.batch < 1:
            raise InputError(None, f"--batch {a.batch}: must be at least 1")
        tr = dataclasses.replace(tr, batch=a.batch)
    if a.eval_every is not None:
        if a.eval_every < 1:
            raise InputError(None, f"--eval-every {a.eval_every}: must be at least 1")
        tr = dataclasses.replace(tr, eval_every=a.eval_every)
    plan = dataclasses.replace(plan, train=tr)
    if a.temperature is not None:
        if a.temperature < 0:
            raise InputError(None, f"--temperature {a.temperature}: must be ≥ 0")
        plan = dataclasses.replace(plan, temperature=a.temperature)
    if a.eval_chunks:
        plan = dataclasses.replace(plan, eval_chunks=a.eval_chunks)
    if a.workers:
        plan = dataclasses.replace(plan, workers=a.workers)
    if a.late_deadline_s is not None:
        plan = dataclasses.replace(plan, late_set_deadline_s=a.late_deadline_s)
    if a.compact_seconds is not None:
        plan = dataclasses.replace(plan, compact_seconds=a.compact_seconds)
    data, out = Path(a.data), Path(a.out)
    if not data.is_dir():
        raise InputError(data, "corpus folder not found")
    if a.probe_steps:
        res = probe(MODEL48, FULL.train, a.probe_steps, load_split(data, "train", MODEL48.vocab))
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "probe.json", json.dumps(res, indent=1) + "\n")
        return 0
    run(data, out, plan, work=Path(a.work) if a.work else out / "work",
        compact_out=Path(a.compact_out) if a.compact_out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
