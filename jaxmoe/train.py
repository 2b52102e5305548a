"""Train the project's small Qwen3-MoE on the offline corpus, then save it as a Q4_K GGUF.

Command lines (the corpus comes from `python -m jaxmoe.corpus --out data/corpus`):

    # on the GPU machine (H200, JAX 0.11): one command, < 8 minutes including compile
    python -m jaxmoe.train --data data/corpus --out runs/small
    # CPU smoke run: a tiny model, a few steps (what tests/test_train.py runs)
    python -m jaxmoe.train --smoke --data data/corpus --out /tmp/smoke

Outputs in --out: `model.gguf` (llama.cpp qwen3moe; experts Q4_K, attention/embedding/output Q8_0,
norms and routers F32; tokenizer embedded), `config.json` (model + training settings),
`train_log.json` (loss curve, held-out perplexity of the float model and of the GGUF read back,
per-layer expert load on the evaluation split, timings), and `weights.npz` (float32, keyed by GGUF
tensor name in GGUF layout; `load_float_weights`) only when it is at most 40 MB or --save-float is
given (the default model's is 236 MB).

Model size and why (`MODEL`): vocabulary 8192 (the corpus tokenizer), hidden 256, 8 layers, 4 query /
2 key-value heads of 64, 32 experts per layer, top-4, expert FFN 256 — Qwen3-30B-A3B's shape scaled
down (same block, same GQA ratio class, norm_topk_prob). The binding limit is the GGUF budget of
40 MB: K-quant rows must be whole 256-weight super-blocks, so hidden and expert FFN are at least 256;
one expert is then 3 × 256 × 256 weights = 110,592 bytes at Q4_K, and 8 layers × 32 experts take
28.3 MB; embedding + output at Q8_0 add 4.5 MB, attention 1.7 MB → ≈ 35 MB. (Hidden 512 would put
the experts alone at 57 MB.) Compute is not the limit: the dense expert einsum (all 32 experts per
token, one large matmul — faster on a GPU at this size than a sparse dispatch) costs ≈ 0.34 GFLOP per
training token, so an H200 sustaining even 100 TFLOP/s in bf16 runs ≈ 300k tokens/s. The corpus is
the limit: ≈ 13 M training tokens. The default trains 4 epochs (≈ 50 M tokens, ≈ 1,600 steps of
64 × 512): repeating data up to ~4 epochs costs almost nothing against fresh data [Muennighoff et al.,
"Scaling Data-Constrained Language Models", NeurIPS 2023], and the held-out perplexity is logged
during training to show whether it overfits. A wall-clock guard (--time-budget-s) stops early if the
machine is slower than expected.

Training: next-token cross-entropy + 0.01 × a Switch-Transformer load-balancing loss per layer,
E · Σ_i f_i · P_i (f_i: fraction of the k·tokens selections that went to expert i; P_i: mean router
probability of expert i; = 1 when balanced) [Fedus et al., arXiv 2101.03961; the Qwen MoE models
use the same term], averaged over layers. AdamW with decoupled weight decay [Loshchilov & Hutter,
arXiv 1711.05101] written out in jnp (optax is not in the project's environment), β = (0.9, 0.95),
global-norm clipping at 1, linear warm-up then cosine decay to 10 %. Master weights are float32;
matmuls run in bfloat16 (`model.cast_matrices`), norms/router/softmax/loss in float32.
Batches are windows of seq+1 tokens at multiples of seq, shuffled per epoch with the seed.
Same data + seed → the same batches and initial weights; GPU reductions (e.g. the embedding
gradient's scatter-add) may still differ in the last bits between runs.

Bringing the results back from the GPU machine: its $OUT returns files of at most 16 MiB, so split
the GGUF (`split -b 15m runs/small/model.gguf $OUT/model.gguf.part-`) and `cat` the parts here.
The `gguf` package is not installed there: carry its wheel (pure Python; README of the device tool).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import gguf_io
from jaxmoe import model as M
from sim.io import InputError, atomic_path, exit_on_input_error, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
MAX_FLOAT_NPZ_BYTES = 40_000_000  # save float32 weights by default only up to this size
MAX_GGUF_BYTES = 40_000_000

MODEL = M.Config(vocab=8192, hidden=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=32, top_k=4,
                 expert_ffn=256, norm_topk_prob=True, rope_theta=10_000.0, rms_eps=1e-6, max_seq=512)
SMOKE_MODEL = M.Config(vocab=8192, hidden=256, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, n_experts=4,
                       top_k=2, expert_ffn=256, rope_theta=10_000.0, max_seq=64)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (hashable: a static argument of the jitted step)."""

    # batches
    batch: int = 64  # sequences per step
    seq: int = 512  # tokens per sequence (targets)
    epochs: float = 4.0
    max_steps: int = 0  # > 0: stop after this many steps (overrides epochs when smaller)
    # AdamW and schedule
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    aux_coef: float = 0.01  # load-balancing loss weight
    compute_dtype: str = "bfloat16"
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4  # batches of the periodic held-out evaluation
    final_eval_windows: int = 1024  # windows of the final held-out evaluation
    time_budget_s: float = 300.0  # stop training after this much wall time in the loop (compile included)


SMOKE_TRAIN = TrainConfig(batch=4, seq=64, epochs=1.0, max_steps=8, lr=3e-3, warmup_steps=2, log_every=2,
                          eval_every=4, eval_batches=1, final_eval_windows=8, compute_dtype="float32")


# ----------------------------------------------------------------------------- data

def load_corpus(data_dir: str | Path) -> dict:
    """The corpus' meta.json and its train/calib/eval token arrays (uint16), validated."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        vocab = int(meta["tokenizer"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(meta_path, f"cannot read corpus meta ({type(exc).__name__}: {exc})") from None
    out = {"meta": meta, "vocab": vocab}
    for split in ("train", "eval"):
        path = data_dir / f"{split}.bin"
        try:
            arr = np.fromfile(path, dtype="<u2")
        except OSError as exc:
            raise InputError(path, f"cannot read token file: {exc}") from None
        if arr.size and int(arr.max()) >= vocab:
            raise InputError(path, f"token id {int(arr.max())} is outside the vocabulary of {vocab}")
        out[split] = arr
    return out


def windows(n_tokens: int, seq: int) -> np.ndarray:
    """Start offsets of the non-overlapping windows of seq+1 tokens (stride seq)."""
    return np.arange(0, max(0, n_tokens - seq), seq, dtype=np.int64)  # s + seq + 1 <= n_tokens


def _gather(tokens: jax.Array, starts: jax.Array, seq: int) -> jax.Array:
    """tokens int32 [N], starts [B] → windows [B, seq+1]."""
    return jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (seq + 1,)))(starts)


# ----------------------------------------------------------------------------- loss and step

def load_balance_loss(routing: M.Routing, n_experts: int) -> jax.Array:
    """Switch load-balancing loss E·Σ f_i P_i per layer, averaged over layers (1.0 when balanced)."""
    k = routing.ids.shape[-1]
    f = jnp.mean(jnp.sum(jax.nn.one_hot(routing.ids, n_experts, dtype=jnp.float32), axis=-2), axis=(0, 1)) / k  # [L,E]
    p = jnp.mean(routing.probs, axis=(0, 1))  # [L,E]
    return n_experts * jnp.mean(jnp.sum(f * p, axis=-1))


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood, float32; logits [B,T,V], targets [B,T]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def loss_fn(params: M.Weights, batch: jax.Array, cfg: M.Config, tcfg: TrainConfig):
    """Training loss of batch [B, T+1] → (ce + aux_coef·aux, (ce, aux))."""
    w = M.cast_matrices(params, jnp.dtype(tcfg.compute_dtype))
    logits, routing = M.forward(batch[:, :-1], w, cfg, return_router_probs=True)
    ce = jnp.mean(_nll(logits, batch[:, 1:]))
    aux = load_balance_loss(routing, cfg.n_experts)
    return ce + tcfg.aux_coef * aux, (ce, aux)


def lr_at(step: jax.Array, total_steps: jax.Array, tcfg: TrainConfig) -> jax.Array:
    """Linear warm-up to tcfg.lr, then cosine decay to min_lr_frac·lr at total_steps."""
    step = step.astype(jnp.float32)
    warm = tcfg.lr * (step + 1) / max(1, tcfg.warmup_steps)
    prog = jnp.clip((step - tcfg.warmup_steps) / jnp.maximum(1.0, total_steps - tcfg.warmup_steps), 0.0, 1.0)
    cos = tcfg.lr * (tcfg.min_lr_frac + (1 - tcfg.min_lr_frac) * 0.5 * (1 + jnp.cos(jnp.pi * prog)))
    return jnp.where(step < tcfg.warmup_steps, warm, cos)


@dataclasses.dataclass
class TrainState:
    """Parameters, AdamW moments and the step counter."""

    params: M.Weights
    m: M.Weights
    v: M.Weights
    step: jax.Array


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "m", "v", "step"], meta_fields=[])


def init_state(params: M.Weights) -> TrainState:
    """Zero AdamW moments for float32 params."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return TrainState(params=params, m=zeros, v=jax.tree_util.tree_map(jnp.zeros_like, params), step=jnp.int32(0))


def adamw(state: TrainState, grads: M.Weights, lr: jax.Array, tcfg: TrainConfig) -> TrainState:
    """One AdamW update with bias correction; weight decay on arrays of rank >= 2 only."""
    t = (state.step + 1).astype(jnp.float32)
    b1, b2 = tcfg.beta1, tcfg.beta2
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t

    def upd(p, m, v):
        wd = tcfg.weight_decay if p.ndim >= 2 else 0.0
        return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + tcfg.adam_eps) + wd * p)

    return TrainState(params=jax.tree_util.tree_map(upd, state.params, m, v), m=m, v=v, step=state.step + 1)


def _train_step(state: TrainState, tokens: jax.Array, starts: jax.Array, total_steps: jax.Array,
                cfg: M.Config, tcfg: TrainConfig):
    batch = _gather(tokens, starts, tcfg.seq)
    (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg, tcfg)
    gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    scale = jnp.minimum(1.0, tcfg.grad_clip / (gnorm + 1e-6))
    grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    lr = lr_at(state.step, total_steps, tcfg)
    return adamw(state, grads, lr, tcfg), {"loss": loss, "ce": ce, "aux": aux, "grad_norm": gnorm, "lr": lr}


train_step = jax.jit(_train_step, static_argnames=("cfg", "tcfg"), donate_argnums=(0,))
_BOOKKEEPING = ("epochs", "max_steps", "seed", "log_every", "eval_every", "eval_batches", "final_eval_windows",
                "time_budget_s")


def step_config(tcfg: TrainConfig) -> TrainConfig:
    """tcfg with the fields the step does not read reset, so runs differing only in them share a compile."""
    return dataclasses.replace(tcfg, **{f: getattr(TrainConfig, f) for f in _BOOKKEEPING})


def _eval_batch(params: M.Weights, batch: jax.Array, cfg: M.Config):
    """Sum of NLL over the batch's targets and per-layer expert selection counts, float32 matmuls."""
    with jax.default_matmul_precision("highest"):
        logits, routing = M.forward(batch[:, :-1], params, cfg)
    counts = jnp.sum(jax.nn.one_hot(routing.ids, cfg.n_experts, dtype=jnp.float32), axis=(0, 1, 3))  # [L,E]
    return jnp.sum(_nll(logits, batch[:, 1:])), counts


eval_batch = jax.jit(_eval_batch, static_argnames=("cfg",))


def evaluate(params: M.Weights, tokens: np.ndarray, cfg: M.Config, seq: int, batch: int, n_windows: int) -> dict:
    """Held-out perplexity over the first n_windows windows (and expert load per layer)."""
    starts = windows(tokens.size, seq)[:n_windows]
    if starts.size == 0:
        raise InputError(None, f"evaluation split has {tokens.size} tokens, fewer than one window of {seq + 1}")
    nll, n, counts = 0.0, 0, np.zeros((cfg.n_layers, cfg.n_experts))
    for i in range(0, starts.size, batch):
        b = np.stack([tokens[s:s + seq + 1] for s in starts[i:i + batch]]).astype(np.int32)
        s, c = eval_batch(params, jnp.asarray(b), cfg=cfg)
        nll += float(s)
        counts += np.asarray(c)
        n += b.shape[0] * seq
    frac = counts / counts.sum(axis=1, keepdims=True)
    return {"tokens": n, "nll": nll / n, "ppl": math.exp(nll / n),
            "expert_load": {"max_frac": frac.max(axis=1).round(5).tolist(), "min_frac": frac.min(axis=1).round(5).tolist(),
                            "counts": counts.astype(int).tolist()}}


# ----------------------------------------------------------------------------- run

def run(data_dir: str | Path, out_dir: str | Path, cfg: M.Config, tcfg: TrainConfig, *,
        save_float: bool | None = None, tokenizer_json: str | Path | None = None, quiet: bool = False,
        direct_formats: Sequence[str] = ()) -> dict:
    """Train, evaluate, save GGUF/config/log (and float weights); returns the training log."""
    out_dir = Path(out_dir)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    corpus = load_corpus(data_dir)
    if corpus["vocab"] > cfg.vocab:
        raise InputError(Path(data_dir) / "meta.json", f"vocabulary {corpus['vocab']} exceeds the model's {cfg.vocab}")
    if tokenizer_json is None:
        tp = Path(corpus["meta"]["tokenizer"].get("path", ""))
        cands = [tp, REPO / tp, Path(data_dir) / tp.name]
        tokenizer_json = next((c for c in cands if tp.name and c.is_file()), None)
    train_tokens = corpus["train"]
    starts_all = windows(train_tokens.size, tcfg.seq)
    steps_per_epoch = starts_all.size // tcfg.batch
    if steps_per_epoch == 0:
        raise InputError(Path(data_dir) / "train.bin",
                         f"{train_tokens.size} tokens: fewer than one batch of {tcfg.batch} × {tcfg.seq + 1}")
    total = max(1, round(tcfg.epochs * steps_per_epoch))
    if tcfg.max_steps > 0:
        total = min(total, tcfg.max_steps)
    device = jax.devices()[0]
    say(f"device {device.platform}:{device.device_kind}  params {M.param_count(cfg)}  "
        f"train tokens {train_tokens.size:,}  steps {total} ({steps_per_epoch}/epoch)")

    params = M.init_weights(cfg, tcfg.seed)
    state = init_state(params)
    tokens_dev = jnp.asarray(train_tokens.astype(np.int32))
    rng = np.random.default_rng(tcfg.seed)
    order: list[int] = []
    curve, evals = [], []
    t0 = time.perf_counter()
    compile_s, stopped_early, step = None, False, 0
    total_dev = jnp.float32(total)
    step_tcfg = step_config(tcfg)
    for step in range(total):
        if not order:
            order = rng.permutation(starts_all.size)[: steps_per_epoch * tcfg.batch].tolist()
        idx, order = order[: tcfg.batch], order[tcfg.batch:]
        starts = jnp.asarray(starts_all[idx].astype(np.int32))
        state, metrics = train_step(state, tokens_dev, starts, total_dev, cfg=cfg, tcfg=step_tcfg)
        if compile_s is None:
            jax.block_until_ready(metrics["loss"])
            compile_s = time.perf_counter() - t0
            t_train = time.perf_counter()
        if (step + 1) % tcfg.log_every == 0 or step + 1 == total:
            row = {k: float(v) for k, v in metrics.items()}
            row |= {"step": step + 1, "tokens": (step + 1) * tcfg.batch * tcfg.seq,
                    "elapsed_s": round(time.perf_counter() - t0, 2)}
            curve.append(row)
            say(f"step {step + 1:5d}  loss {row['loss']:.4f}  ce {row['ce']:.4f}  aux {row['aux']:.4f}  "
                f"lr {row['lr']:.2e}  |g| {row['grad_norm']:.2f}  {row['elapsed_s']:.0f}s")
        if (step + 1) % tcfg.eval_every == 0 and step + 1 < total:
            e = evaluate(state.params, corpus["eval"], cfg, tcfg.seq, tcfg.batch, tcfg.eval_batches * tcfg.batch)
            evals.append({"step": step + 1, "ppl": e["ppl"], "nll": e["nll"]})
            say(f"  eval step {step + 1}: ppl {e['ppl']:.2f}")
        if time.perf_counter() - t0 > tcfg.time_budget_s:
            stopped_early = step + 1 < total
            break
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t_train
    steps_done = step + 1
    params_np = jax.tree_util.tree_map(np.asarray, state.params)

    final = evaluate(params_np, corpus["eval"], cfg, tcfg.seq, tcfg.batch, tcfg.final_eval_windows)
    say(f"final held-out ppl (float32): {final['ppl']:.3f} over {final['tokens']} tokens")
    gguf_path = out_dir / "model.gguf"
    t_q = time.perf_counter()
    formats = gguf_io.write_gguf(
        gguf_path, params_np, cfg, expert_format="q4_k", dense_format="q8_0", tokenizer_json=tokenizer_json,
        name="jaxmoe-qwen3moe-small",
        extra_metadata={"jaxmoe.train.steps": steps_done, "jaxmoe.train.seed": tcfg.seed,
                        "jaxmoe.train.eval_ppl_f32": final["ppl"]})
    quantize_s = time.perf_counter() - t_q
    gguf_bytes = gguf_path.stat().st_size
    q = gguf_io.read_gguf(gguf_path)
    final_q = evaluate(q.weights, corpus["eval"], cfg, tcfg.seq, tcfg.batch, tcfg.final_eval_windows)
    say(f"final held-out ppl (GGUF, experts Q4_K): {final_q['ppl']:.3f}; {gguf_path} {gguf_bytes / 1e6:.1f} MB")

    direct = {}
    for fmt in direct_formats:
        # float → fmt directly, for the compounding comparison (Q4_K → fmt is re-quantized later from model.gguf)
        path = out_dir / f"model-direct-{fmt}.gguf"
        gguf_io.write_gguf(path, params_np, cfg, expert_format=fmt, dense_format="q8_0", tokenizer_json=tokenizer_json,
                           name=f"jaxmoe-qwen3moe-small-direct-{fmt}",
                           extra_metadata={"jaxmoe.train.steps": steps_done, "jaxmoe.train.seed": tcfg.seed})
        direct[fmt] = {"path": path.name, "bytes": path.stat().st_size}
        say(f"wrote {path} (experts quantized from float straight to {fmt}): {direct[fmt]['bytes'] / 1e6:.1f} MB")

    float_bytes = 4 * M.param_count(cfg)["total"]
    if save_float or (save_float is None and float_bytes <= MAX_FLOAT_NPZ_BYTES):
        with atomic_path(out_dir / "weights.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **gguf_io.weights_to_tensors(params_np, cfg))
    log = {
        "model": cfg.to_dict(), "train": dataclasses.asdict(tcfg), "params": M.param_count(cfg),
        "data": {"dir": str(data_dir), "train_tokens": int(train_tokens.size), "eval_tokens": int(corpus["eval"].size),
                 "steps_per_epoch": steps_per_epoch},
        "steps_planned": total, "steps_done": steps_done, "stopped_early": stopped_early,
        "tokens_seen": steps_done * tcfg.batch * tcfg.seq, "epochs_done": steps_done / steps_per_epoch,
        "compile_s": round(compile_s, 2), "train_s": round(train_s, 2), "quantize_write_s": round(quantize_s, 2),
        "tokens_per_s": round((steps_done - 1) * tcfg.batch * tcfg.seq / max(train_s, 1e-9)),
        "curve": curve, "evals": evals, "final_eval_f32": final, "final_eval_gguf": final_q,
        "gguf": {"path": gguf_path.name, "bytes": gguf_bytes, "formats": sorted(set(formats.values())),
                 "expert_format": "q4_k", "dense_format": "q8_0"},
        "direct_gguf": direct,
        "device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
    }
    write_text_atomic(out_dir / "config.json", json.dumps({"model": cfg.to_dict(), "train": dataclasses.asdict(tcfg)},
                                                         indent=2) + "\n")
    write_text_atomic(out_dir / "train_log.json", json.dumps(log, indent=1) + "\n")
    if gguf_bytes > MAX_GGUF_BYTES:
        say(f"warning: GGUF is {gguf_bytes / 1e6:.1f} MB, over the {MAX_GGUF_BYTES / 1e6:.0f} MB budget")
    return log


def load_float_weights(path: str | Path, cfg: M.Config) -> M.Weights:
    """Read weights.npz (arrays keyed by llama.cpp tensor name, GGUF layout, float32)."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read weights: {exc}") from None
    return gguf_io.tensors_to_weights(arrays, cfg, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxmoe.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m jaxmoe.train --data data/corpus --out runs/small            # GPU, ~5-6 min\n"
               "  python -m jaxmoe.train --data data/corpus --out runs/s --steps 300    # shorter run\n"
               "  python -m jaxmoe.train --smoke --data data/corpus --out /tmp/smoke    # CPU, tiny model\n")
    p.add_argument("--data", required=True, help="corpus folder with meta.json, train.bin, eval.bin")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 8 steps, float32: a CPU smoke test")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=None, help=f"epochs over train.bin (default {TrainConfig.epochs})")
    p.add_argument("--batch", type=int, default=None, help=f"sequences per step (default {TrainConfig.batch})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {TrainConfig.lr})")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help=f"stop the training loop after this many seconds (default {TrainConfig.time_budget_s})")
    p.add_argument("--save-float", action="store_true", help="always write weights.npz (float32)")
    p.add_argument("--direct-formats", default="",
                   help="also write model-direct-FMT.gguf with experts quantized from float straight to each "
                        "comma-separated FMT (e.g. q2_k): the float → low-bit side of the compounding comparison")
    p.add_argument("--tokenizer", default=None, help="tokenizer JSON to embed (default: the corpus meta's)")
    return p


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    a = _parser().parse_args(argv)
    cfg, tcfg = (SMOKE_MODEL, SMOKE_TRAIN) if a.smoke else (MODEL, TrainConfig())
    over = {"max_steps": a.steps, "epochs": a.epochs, "batch": a.batch, "lr": a.lr, "seed": a.seed,
            "time_budget_s": a.time_budget_s}
    tcfg = dataclasses.replace(tcfg, **{k: v for k, v in over.items() if v is not None})
    data = Path(a.data)
    if not data.is_dir():
        raise InputError(data, "corpus folder not found (make it with: python -m jaxmoe.corpus --out data/corpus)")
    direct = [f.strip().lower() for f in a.direct_formats.split(",") if f.strip()]
    for fmt in direct:
        if fmt not in ("q2_k", "q3_k", "q4_k", "q6_k", "q8_0"):
            raise InputError(None, f"--direct-formats: {fmt!r} is not a K-quant/Q8_0 format")
    run(data, a.out, cfg, tcfg, save_float=True if a.save_float else None, tokenizer_json=a.tokenizer,
        direct_formats=direct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
