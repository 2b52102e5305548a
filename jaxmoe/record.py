"""Record expert-routing traces from the project's small Qwen3-MoE model (prefill + greedy decode).

`python -m jaxmoe.record --model MODEL.gguf --tokens data/corpus/eval.bin --out traces/qwen3.npz`

Prompts. The token file holds documents one after another, each ended by the end-of-text id. The
documents at least `--prompt-tokens` long are eligible; `--seqs` of them are taken evenly spaced in
file order (document index ⌊i·n_eligible/n_seqs⌋), and each prompt is the first `--prompt-tokens`
tokens of its document. The choice depends only on the file and the two numbers.

Run. All prompts go through the model together: one batched prefill fills a KV cache, then
`--decode` greedy steps (argmax of the logits, ties → lowest id; an end-of-text token does not stop
a sequence) each feed the previous step's token back through `model.decode_step`. The routing of
every (token, layer) is a return value of the model (`model.Routing`): the top-k ids in rank order,
their renormalised gate weights, and `predicted`, the ids layer l's router picks from the residual
stream leaving layer l-1 (layer 0: ABSENT). The expert FFNs run as a sparse grouped matmul
(`grouped_experts`, below) and the LM head only where logits are needed (`hidden_head`); both give
the same routing as the model's dense path up to float rounding (tests/test_record.py).

Trace. Sequences are laid out one after another (sequence i's prompt steps, phase prefill, then its
decode steps), as if the engine had served them one at a time; the simulator's schema wants each
sequence's steps contiguous. Every group is present (this engine computes the last layer for all
prefill tokens). Meta: a model name that says it is a small Qwen3-MoE-architecture model, the
geometry, `expert_weights` = 3·hidden·expert_ffn, `expert_bytes` per layer at the GGUF's own
formats (`sim.formats`), `expert_format` ("q4_k", or "A+B_down" when ffn_down differs),
`dense_bytes` (the layer's other tensors as stored), `extra.head_bytes` / `extra.kv_bytes_per_token`
(what sim.profiles reads for a model it does not know), and provenance: the model file's sha256, the
token file and its sha256, the prompts' document indices, the command. The model name must not contain
a built-in profile's name (sim.profiles would take Qwen3-30B-A3B's geometry), so it says "not the
30B-A3B"; the provenance says NOT Qwen3-30B-A3B in full.

Sparse expert dispatch (`grouped_experts`), after MegaBlocks' block-sparse grouping [Gale et al.,
"MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", MLSys 2023, arXiv 2211.15841]:
the N·k (token, expert) assignments are sorted by expert; each expert's run is padded to whole
tiles of `tile` rows; a loop over the tiles in use gathers a tile's token rows, runs that expert's
SwiGLU FFN on them (three [tile, D]×[D, F] matmuls) and scatters the gate-weighted results back to
their tokens. Work is N·k rows plus at most one partial tile per expert, against N·E rows for the
dense all-experts einsum (8× fewer for top-4 of 32) — the fast choice on a CPU. Shapes are static
(the tile count is bounded by ⌊N·k/tile⌋ + E), so one compilation serves every routing.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import gguf_io
from jaxmoe import model as M
from sim.formats import FORMATS
from sim.io import InputError, exit_on_input_error
from sim.trace import DECODE, PREFILL, Trace, TraceMeta, save_trace

F32 = jnp.float32
EOS_ID = 0  # <|endoftext|> in the corpus tokenizer (data/corpus/meta.json)
# in the trace's model name; never a built-in profile's name ("qwen3-30b-a3b"), which sim.profiles matches
MODEL_NOTE = "small Qwen3-MoE-architecture model trained by this project, not the 30B-A3B"
PROVENANCE_NOTE = "a small Qwen3-MoE-architecture model trained by this project, NOT Qwen3-30B-A3B"


# ----------------------------------------------------------------------------- sparse experts

def tile_rows(n_assignments: int, n_experts: int) -> int:
    """Rows per tile: about the mean rows per expert, a power of two in [8, 128]."""
    mean = max(1, n_assignments // max(1, n_experts))
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def grouped_experts(h: jax.Array, ids: jax.Array, gates: jax.Array, experts: M.ExpertWeights,
                    tile: int | None = None) -> jax.Array:
    """Sparse MoE FFN: Σ_r gates[..., r] · expert_{ids[..., r]}(h), run per expert on sorted tiles.

    h f32 [B,T,D]; ids int [B,T,k] index the leading axis of `experts` (any size X ≥ max id + 1,
    e.g. 2E for an [own; low-precision] stack); gates f32 [B,T,k] (0 drops a selection). → f32 [B,T,D].
    """
    B, T, D = h.shape
    k = ids.shape[-1]
    N, A = B * T, B * T * ids.shape[-1]
    X = experts.gate.shape[0]
    if tile is None:
        tile = tile_rows(A, X)
    x = ids.reshape(A).astype(jnp.int32)  # [A] expert of each assignment (token-major)
    w = gates.reshape(A).astype(F32)
    order = jnp.argsort(x, stable=True)  # assignments grouped by expert, token order within
    xs, ws, ts = x[order], w[order], (order // k).astype(jnp.int32)
    counts = jnp.bincount(x, length=X)  # [X]
    first_row = jnp.cumsum(counts) - counts  # sorted position of each expert's first assignment
    tiles_of = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles_of)  # [X] one past each expert's last tile
    tile_start = tile_end - tiles_of
    n_tiles = A // tile + X  # static bound on Σ ceil(count / tile)
    P = n_tiles * tile
    prow = tile_start[xs] * tile + jnp.arange(A, dtype=jnp.int32) - first_row[xs]  # padded row of each
    row_tok = jnp.full((P,), N, jnp.int32).at[prow].set(ts)  # row N of h_pad is zeros (padding)
    row_w = jnp.zeros((P,), F32).at[prow].set(ws)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), X - 1)
    h_pad = jnp.concatenate([h.reshape(N, D), jnp.zeros((1, D), h.dtype)])  # [N+1, D]
    rows = h_pad[row_tok].reshape(n_tiles, tile, D).astype(experts.gate.dtype)

    def body(i, out):
        e = tile_expert[i]
        xt = rows[i]  # [tile, D]
        g = xt @ experts.gate[e]  # [tile, F]
        u = xt @ experts.up[e]
        y = (jax.nn.silu(g) * u) @ experts.down[e]  # [tile, D]
        return out.at[i].set(y.astype(F32))

    y = jax.lax.fori_loop(0, tile_end[-1], body, jnp.zeros((n_tiles, tile, D), F32))  # tiles in use only
    y = y.reshape(P, D) * row_w[:, None]
    return jnp.zeros((N + 1, D), F32).at[row_tok].add(y)[:N].reshape(B, T, D)


def sparse_expert_fn(layer: int, h: jax.Array, ids: jax.Array, gates: jax.Array,
                     experts: M.ExpertWeights) -> jax.Array:
    """model.ExpertFn running `grouped_experts` (same result as `model.dense_experts` up to rounding)."""
    del layer
    return grouped_experts(h, ids, gates, experts)


def hidden_head(weights: M.Weights) -> tuple[M.Weights, jax.Array]:
    """Weights whose LM head is the identity (forward then returns the final-normed hidden state), and
    the real head [D, V]: apply it only where logits are needed."""
    D = weights.final_norm.shape[0]
    head = weights.embed.T if weights.lm_head is None else weights.lm_head
    return dataclasses.replace(weights, lm_head=jnp.eye(D, dtype=F32)), jnp.asarray(head)


def head_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """Logits f32 [..., V] of final-normed hidden states [..., D] (the model's head einsum)."""
    return jnp.einsum("...d,dv->...v", hidden.astype(head.dtype), head).astype(F32)


# ----------------------------------------------------------------------------- prompts

def document_starts(tokens: np.ndarray, eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each document of a token file (documents end with eos_id; length excludes it)."""
    ends = np.flatnonzero(tokens == eos_id)
    if ends.size == 0 or ends[-1] != tokens.size - 1:
        ends = np.r_[ends, tokens.size]
    starts = np.r_[0, ends[:-1] + 1]
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def choose_prompts(tokens: np.ndarray, n_seqs: int, prompt_tokens: int, eos_id: int = EOS_ID,
                   path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int32 [n_seqs, prompt_tokens] prompts (document openings, evenly spaced) and their document indices."""
    starts, lengths = document_starts(tokens, eos_id)
    eligible = np.flatnonzero(lengths >= prompt_tokens)
    if eligible.size < n_seqs:
        raise InputError(path, f"only {eligible.size} documents have ≥ {prompt_tokens} tokens; "
                               f"{n_seqs} sequences were asked for")
    docs = eligible[(np.arange(n_seqs) * eligible.size) // n_seqs]
    prompts = np.stack([tokens[starts[d]:starts[d] + prompt_tokens] for d in docs]).astype(np.int32)
    return prompts, docs


# ----------------------------------------------------------------------------- recording

@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(tokens, weights, head, cache, cfg):
    hidden, routing, cache = M.prefill(tokens, weights, cfg, cache, expert_fn=sparse_expert_fn)
    nxt = jnp.argmax(head_logits(hidden[:, -1], head), axis=-1).astype(jnp.int32)
    return nxt, routing, cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode(token, weights, head, cache, cfg):
    hidden, routing, cache = M.decode_step(token, weights, cfg, cache, expert_fn=sparse_expert_fn)
    nxt = jnp.argmax(head_logits(hidden, head), axis=-1).astype(jnp.int32)
    return nxt, routing, cache


def record_routing(weights: M.Weights, cfg: M.Config, prompts: np.ndarray, n_decode: int,
                   progress=None) -> dict[str, np.ndarray]:
    """Batched prefill of prompts [B,P] and n_decode greedy KV-cache steps → numpy routing and tokens.

    Returns ids/gates/predicted [B, P + n_decode, L, k] (prefill positions first) and `decoded`
    int32 [B, n_decode]: the tokens fed to the decode steps (position P + j holds decoded[:, j]).
    """
    B, P = prompts.shape
    if P + n_decode > cfg.max_seq:
        raise InputError(None, f"prompt {P} + decode {n_decode} tokens exceed the model's context {cfg.max_seq}")
    w_hidden, head = hidden_head(weights)
    w_hidden = jax.tree_util.tree_map(jnp.asarray, w_hidden)
    cache = M.init_cache(cfg, B, max_seq=P + n_decode)
    token, routing, cache = _prefill(jnp.asarray(prompts, jnp.int32), w_hidden, head, cache, cfg)
    parts = [jax.tree_util.tree_map(np.asarray, (routing.ids, routing.gates, routing.predicted))]
    decoded = []
    for j in range(n_decode):
        decoded.append(np.asarray(token))
        token, routing, cache = _decode(token, w_hidden, head, cache, cfg)
        parts.append((routing.ids, routing.gates, routing.predicted))
        if progress is not None and (j + 1) % 32 == 0:
            progress(j + 1)
    ids, gates, pred = (np.concatenate([np.asarray(p[i]) for p in parts], axis=1) for i in range(3))
    dec = np.stack(decoded, axis=1).astype(np.int32) if decoded else np.zeros((B, 0), np.int32)
    return {"ids": ids, "gates": gates, "predicted": pred, "decoded": dec}


def expert_format_name(gguf: gguf_io.GGUFModel, layer: int) -> str:
    """The trace's name of a layer's native expert format: "q4_k", or "A+B_down" when ffn_down differs."""
    g, u, d = (gguf.expert_format(layer, kind) for kind in gguf_io.EXPERT_KINDS)
    if g != u:
        raise InputError(None, f"layer {layer}: ffn_gate ({g}) and ffn_up ({u}) formats differ")
    return g if d == g else f"{g}+{d}_down"


def expert_bytes_per_layer(gguf: gguf_io.GGUFModel) -> list[int]:
    """Bytes of one expert (gate + up + down) of each layer, at the file's own formats."""
    cfg = gguf.cfg
    n = cfg.hidden * cfg.expert_ffn
    return [sum(FORMATS[gguf.expert_format(l, kind)].nbytes(n) for kind in gguf_io.EXPERT_KINDS)
            for l in range(cfg.n_layers)]


def dense_bytes_per_layer(gguf: gguf_io.GGUFModel) -> list[int]:
    """Bytes of each layer's non-expert tensors (attention, norms, router) as stored."""
    out = []
    for l in range(gguf.cfg.n_layers):
        prefix = f"blk.{l}."
        out.append(sum(t.nbytes for n, t in gguf.tensors.items()
                       if n.startswith(prefix) and not n.split(".")[-2].endswith("_exps")))
    return out


def head_bytes(gguf: gguf_io.GGUFModel) -> int:
    """Bytes read per decoded token outside the layers: the output head and one token-embedding row."""
    embd = gguf.tensors["token_embd.weight"]
    out = gguf.tensors.get("output.weight", embd)
    return int(out.nbytes + embd.nbytes // gguf.cfg.vocab + gguf.tensors["output_norm.weight"].nbytes)


def kv_bytes_per_token(cfg: M.Config) -> int:
    """K+V cache bytes per token of context over all layers, f16 as llama.cpp stores them by default."""
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_label(gguf: gguf_io.GGUFModel) -> str:
    """The trace's model name: the GGUF's general.name and a plain note of what the model is."""
    name = str(gguf.metadata.get("general.name", "jaxmoe-qwen3moe"))
    return f"{name} ({MODEL_NOTE})"


def build_trace(rec: dict[str, np.ndarray], gguf: gguf_io.GGUFModel, prompt_tokens: int, *,
                provenance: str, extra: dict) -> Trace:
    """Lay the batched routing out sequence by sequence (prefill steps, then decode) as a sim Trace."""
    cfg = gguf.cfg
    B, S, L, k = rec["ids"].shape
    phase = np.where(np.arange(S) < prompt_tokens, PREFILL, DECODE).astype(np.uint8)
    meta = TraceMeta(
        model=model_label(gguf), n_layers=cfg.n_layers, n_experts=cfg.n_experts, top_k=cfg.top_k,
        provenance=provenance, expert_weights=3 * cfg.hidden * cfg.expert_ffn,
        expert_bytes=tuple(expert_bytes_per_layer(gguf)),
        expert_format=tuple(expert_format_name(gguf, l) for l in range(L)),
        dense_bytes=tuple(dense_bytes_per_layer(gguf)), extra=extra)
    return Trace.from_arrays(
        rec["ids"].reshape(B * S, L, k), rec["gates"].reshape(B * S, L, k), np.tile(phase, B),
        np.repeat(np.arange(B, dtype=np.int32), S), meta, rec["predicted"].reshape(B * S, L, k))


def load_tokens(path: str | Path, vocab: int) -> np.ndarray:
    """A corpus token file (uint16 little-endian) as int64, checked against the vocabulary."""
    try:
        tokens = np.fromfile(path, dtype="<u2").astype(np.int64)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read token file: {exc}") from None
    if tokens.size == 0:
        raise InputError(path, "token file is empty")
    if tokens.max() >= vocab:
        raise InputError(path, f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab}")
    return tokens


def read_model(path: str | Path) -> gguf_io.GGUFModel:
    """Read a qwen3moe GGUF (missing file → InputError)."""
    if not Path(path).is_file():
        raise InputError(path, "no such model file")
    return gguf_io.read_gguf(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxmoe.record",
        description="Run the small Qwen3-MoE model on held-out prompts (batched prefill + greedy KV-cache "
                    "decode) and write the routing as a simulator trace (docs/trace-format.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m jaxmoe.record --model jaxmoe/trained/qwen3moe-small.gguf --tokens data/corpus/eval.bin "
               "--out traces/qwen3.npz\n"
               "  python -m jaxmoe.record --model m.gguf --tokens data/corpus/eval.bin --seqs 4 "
               "--prompt-tokens 32 --decode 16 --out /tmp/t.npz\n")
    p.add_argument("--model", required=True, help="qwen3moe GGUF (experts Q4_K)")
    p.add_argument("--tokens", required=True, help="held-out token file (uint16, documents ended by id 0)")
    p.add_argument("--seqs", type=int, default=32, help="sequences (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--decode", type=int, default=256, help="greedy decode steps per sequence (default 256)")
    p.add_argument("--eos-id", type=int, default=EOS_ID, help=f"end-of-document id (default {EOS_ID})")
    p.add_argument("--out", required=True, help="output trace (.npz)")
    return p


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: record a trace."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    for name in ("seqs", "prompt_tokens"):
        if getattr(a, name) < 1:
            raise InputError(None, f"--{name.replace('_', '-')} must be ≥ 1")
    if a.decode < 0:
        raise InputError(None, "--decode must be ≥ 0")
    t0 = time.perf_counter()
    gguf = read_model(a.model)
    cfg = gguf.cfg
    if a.prompt_tokens + a.decode > cfg.max_seq:
        raise InputError(a.model, f"prompt {a.prompt_tokens} + decode {a.decode} tokens exceed the model's "
                                  f"context {cfg.max_seq}")
    tokens = load_tokens(a.tokens, cfg.vocab)
    prompts, docs = choose_prompts(tokens, a.seqs, a.prompt_tokens, a.eos_id, a.tokens)
    _log(f"record: {a.seqs} prompts × {a.prompt_tokens} tokens + {a.decode} decode steps on {cfg.n_layers} layers, "
         f"{cfg.n_experts} experts, top-{cfg.top_k}")
    t1 = time.perf_counter()
    rec = record_routing(gguf.weights, cfg, prompts, a.decode,
                         progress=lambda j: _log(f"  decode step {j}/{a.decode} ({time.perf_counter() - t1:.1f} s)"))
    run_s = time.perf_counter() - t1
    command = "python -m jaxmoe.record " + " ".join(shlex.quote(x) for x in argv)
    model_sha = sha256_file(a.model)
    tokens_sha = sha256_file(a.tokens)
    provenance = (f"{Path(a.model).name} (sha256 {model_sha[:16]}…), {PROVENANCE_NOTE}; prompts from "
                  f"{Path(a.tokens).name} (sha256 {tokens_sha[:16]}…); command: {command}")
    extra = {
        "arch": "qwen3moe", "norm_topk": bool(cfg.norm_topk_prob), "recorder": "jaxmoe.record",
        "head_bytes": head_bytes(gguf), "kv_bytes_per_token": kv_bytes_per_token(cfg),
        "command": command, "model_file": Path(a.model).name, "model_sha256": model_sha,
        "gguf_name": str(gguf.metadata.get("general.name", "")), "config": cfg.to_dict(),
        "tokens_file": str(a.tokens), "tokens_sha256": tokens_sha, "corpus_split": Path(a.tokens).stem,
        "seqs": a.seqs, "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode,
        "prompt_documents": [int(d) for d in docs], "decode": "greedy argmax, batched, KV cache",
        "predicted": "layer l's router applied to the residual stream leaving layer l-1 (model.Routing.predicted)",
    }
    trace = build_trace(rec, gguf, a.prompt_tokens, provenance=provenance, extra=extra)
    save_trace(trace, a.out)
    _log(f"wrote {a.out}: {trace.n_steps} steps in {time.perf_counter() - t0:.1f} s "
         f"(model run {run_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
