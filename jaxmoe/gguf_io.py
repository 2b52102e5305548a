"""Read and write Qwen3-MoE models as GGUF files that llama.cpp's `qwen3moe` architecture can load.

GGUF [ggml-org/ggml docs/gguf.md; gguf-py 0.19] stores key-value metadata and named tensors. ggml
lists a tensor's dimensions fastest-first (`ne[0]` is the row length), the reverse of numpy's
row-major shape; `gguf.GGUFWriter` takes numpy shapes and reverses them itself. So the numpy layouts
written here are exactly llama.cpp's `create_tensor` shapes reversed:

| tensor (".weight")    | llama.cpp ne                  | numpy here        | from `jaxmoe.model`    |
|-----------------------|-------------------------------|-------------------|------------------------|
| token_embd            | {n_embd, n_vocab}             | [V, D]            | embed                  |
| blk.N.attn_norm       | {n_embd}                      | [D]               | attn_norm              |
| blk.N.attn_q          | {n_embd, n_head*head_dim}     | [N*H, D]          | wq [D,N,H] → T         |
| blk.N.attn_k / attn_v | {n_embd, n_head_kv*head_dim}  | [K*H, D]          | wk, wv [D,K,H] → T     |
| blk.N.attn_output     | {n_head*head_dim, n_embd}     | [D, N*H]          | wo [N,H,D] → T         |
| blk.N.attn_q_norm/k_  | {head_dim}                    | [H]               | q_norm, k_norm         |
| blk.N.ffn_norm        | {n_embd}                      | [D]               | ffn_norm               |
| blk.N.ffn_gate_inp    | {n_embd, n_expert}            | [E, D]            | router [D,E] → T       |
| blk.N.ffn_gate_exps   | {n_embd, n_ff_exp, n_expert}  | [E, F, D]         | gate [E,D,F] → (0,2,1) |
| blk.N.ffn_up_exps     | {n_embd, n_ff_exp, n_expert}  | [E, F, D]         | up                     |
| blk.N.ffn_down_exps   | {n_ff_exp, n_embd, n_expert}  | [E, D, F]         | down [E,F,D] → (0,2,1) |
| output_norm           | {n_embd}                      | [D]               | final_norm             |
| output (absent: tied) | {n_embd, n_vocab}             | [V, D]            | lm_head [D,V] → T      |

Quantized rows run along the last numpy axis, so one expert's bytes are contiguous: expert e of an
`_exps` tensor is `data[e]` (shape [rows, row_bytes]). Qwen3 uses NeoX RoPE in llama.cpp, so q/k are
written unpermuted (unlike llama's). Norms and the router stay F32 (llama.cpp never quantizes them).
Quantized bytes come from `jaxmoe.quants` (ggml's reference quantizers); reading dequantizes with the
`gguf` package. A HF `tokenizers` byte-level BPE JSON can be embedded as `tokenizer.ggml.*`
(model "gpt2": tokens, token types, merges, bos/eos ids), plus the JSON itself under
`tokenizer.huggingface.json`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxmoe.model import Config, ExpertWeights, LayerWeights, Weights
from sim.io import InputError, atomic_path

ARCH = gguf.MODEL_ARCH.QWEN3MOE
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]  # "qwen3moe"
_T = gguf.MODEL_TENSOR
EXPERT_KINDS = ("gate", "up", "down")
_EXPERT_TENSOR = {"gate": _T.FFN_GATE_EXP, "up": _T.FFN_UP_EXP, "down": _T.FFN_DOWN_EXP}
FLOAT_FORMATS = ("f32", "f16")
_FILE_TYPE = {  # general.file_type by the experts' format (informational for llama.cpp)
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q3_k": gguf.LlamaFileType.MOSTLY_Q3_K_M, "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K,
}


def tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    """llama.cpp's name of a qwen3moe tensor (from gguf's tables), with the '.weight' suffix."""
    if kind not in gguf.MODEL_TENSORS[ARCH]:
        raise ValueError(f"{kind!r} is not a {ARCH_NAME} tensor")
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=layer) if "{bid}" in base else base) + ".weight"


def expert_tensor_name(layer: int, kind: str) -> str:
    """Name of layer `layer`'s stacked expert tensor, kind in ('gate', 'up', 'down')."""
    return tensor_name(_EXPERT_TENSOR[kind], layer)


@dataclass
class GGUFTensor:
    """One stored tensor: its format and its data as stored (float array, or uint8 [..., row_bytes])."""

    name: str
    fmt: str  # lower-case: "f32", "f16", "q8_0", "q4_k", ...
    shape: tuple[int, ...]  # numpy shape of the float tensor (ggml's ne reversed)
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class GGUFModel:
    """A model read from GGUF: config, float32 weights, the stored tensors, tokenizer and metadata."""

    cfg: Config
    weights: Weights | None  # float32 numpy leaves (None when read with dequantize=False)
    tensors: dict[str, GGUFTensor]
    tokenizer: dict[str, Any] | None = None  # tokens, token_type, merges, bos_id, eos_id, model, pre, hf_json
    metadata: dict[str, Any] = field(default_factory=dict)

    def expert_format(self, layer: int, kind: str) -> str:
        """Storage format of layer `layer`'s `kind` experts."""
        return self.tensors[expert_tensor_name(layer, kind)].fmt

    def expert_bytes(self, layer: int, kind: str, expert: int) -> np.ndarray:
        """Stored data of one expert matrix ([rows, row_bytes] uint8 if quantized) — a view, not a copy."""
        return self.tensors[expert_tensor_name(layer, kind)].data[expert]


# ----------------------------------------------------------------------------- weights <-> tensors

def weights_to_tensors(weights: Weights, cfg: Config) -> dict[str, np.ndarray]:
    """Float32 numpy arrays in GGUF layout, keyed by llama.cpp tensor name (output absent when tied)."""
    D = cfg.hidden

    def a(x):
        return np.asarray(x, np.float32)

    out = {tensor_name(_T.TOKEN_EMBD): a(weights.embed)}
    for l, lw in enumerate(weights.layers):
        out |= {
            tensor_name(_T.ATTN_NORM, l): a(lw.attn_norm),
            tensor_name(_T.ATTN_Q, l): a(lw.wq).reshape(D, -1).T,  # [D,N,H] -> [D,N*H] -> [N*H,D]
            tensor_name(_T.ATTN_K, l): a(lw.wk).reshape(D, -1).T,  # [D,K,H] -> [D,K*H] -> [K*H,D]
            tensor_name(_T.ATTN_V, l): a(lw.wv).reshape(D, -1).T,
            tensor_name(_T.ATTN_OUT, l): a(lw.wo).reshape(-1, D).T,  # [N,H,D] -> [N*H,D] -> [D,N*H]
            tensor_name(_T.ATTN_Q_NORM, l): a(lw.q_norm),
            tensor_name(_T.ATTN_K_NORM, l): a(lw.k_norm),
            tensor_name(_T.FFN_NORM, l): a(lw.ffn_norm),
            tensor_name(_T.FFN_GATE_INP, l): a(lw.router).T,  # [D,E] -> [E,D]
            expert_tensor_name(l, "gate"): a(lw.experts.gate).transpose(0, 2, 1),  # [E,D,F] -> [E,F,D]
            expert_tensor_name(l, "up"): a(lw.experts.up).transpose(0, 2, 1),
            expert_tensor_name(l, "down"): a(lw.experts.down).transpose(0, 2, 1),  # [E,F,D] -> [E,D,F]
        }
    out[tensor_name(_T.OUTPUT_NORM)] = a(weights.final_norm)
    if weights.lm_head is not None:
        out[tensor_name(_T.OUTPUT)] = a(weights.lm_head).T  # [D,V] -> [V,D]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def tensors_to_weights(t: Mapping[str, np.ndarray], cfg: Config, source: str | os.PathLike | None = None) -> Weights:
    """Inverse of `weights_to_tensors` (float arrays in GGUF layout → `Weights` of float32 numpy)."""
    D, N, K, H = cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in t:
            raise InputError(source, f"tensor {name} is missing")
        x = np.asarray(t[name], np.float32)
        if x.shape != shape:
            raise InputError(source, f"tensor {name} has shape {x.shape}, expected {shape} for this config")
        return x

    E, F, V = cfg.n_experts, cfg.expert_ffn, cfg.vocab
    layers = []
    for l in range(cfg.n_layers):
        layers.append(LayerWeights(
            attn_norm=get(tensor_name(_T.ATTN_NORM, l), (D,)),
            wq=np.ascontiguousarray(get(tensor_name(_T.ATTN_Q, l), (N * H, D)).T.reshape(D, N, H)),  # -> [D,N,H]
            wk=np.ascontiguousarray(get(tensor_name(_T.ATTN_K, l), (K * H, D)).T.reshape(D, K, H)),
            wv=np.ascontiguousarray(get(tensor_name(_T.ATTN_V, l), (K * H, D)).T.reshape(D, K, H)),
            wo=np.ascontiguousarray(get(tensor_name(_T.ATTN_OUT, l), (D, N * H)).T.reshape(N, H, D)),  # -> [N,H,D]
            q_norm=get(tensor_name(_T.ATTN_Q_NORM, l), (H,)),
            k_norm=get(tensor_name(_T.ATTN_K_NORM, l), (H,)),
            ffn_norm=get(tensor_name(_T.FFN_NORM, l), (D,)),
            router=np.ascontiguousarray(get(tensor_name(_T.FFN_GATE_INP, l), (E, D)).T),
            experts=ExpertWeights(
                gate=np.ascontiguousarray(get(expert_tensor_name(l, "gate"), (E, F, D)).transpose(0, 2, 1)),
                up=np.ascontiguousarray(get(expert_tensor_name(l, "up"), (E, F, D)).transpose(0, 2, 1)),
                down=np.ascontiguousarray(get(expert_tensor_name(l, "down"), (E, D, F)).transpose(0, 2, 1)),
            ),
        ))
    out_name = tensor_name(_T.OUTPUT)
    lm_head = None if cfg.tie_embeddings else np.ascontiguousarray(get(out_name, (V, D)).T)
    return Weights(embed=get(tensor_name(_T.TOKEN_EMBD), (V, D)), layers=layers,
                   final_norm=get(tensor_name(_T.OUTPUT_NORM), (D,)), lm_head=lm_head)


# ----------------------------------------------------------------------------- encoding

def _qtype(fmt: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[fmt.upper()]


def encode(array: np.ndarray, fmt: str) -> np.ndarray:
    """Float array → stored data in `fmt` (f32/f16 arrays, or uint8 [..., row_bytes] via jaxmoe.quants)."""
    fmt = fmt.lower()
    if fmt == "f32":
        return np.ascontiguousarray(array, np.float32)
    if fmt == "f16":
        return np.ascontiguousarray(array, np.float16)
    from jaxmoe import quants  # the project's ggml-reference quantizers (Q2_K..Q6_K, Q8_0)

    return quants.quantize(np.asarray(array, np.float32), fmt)


def decode(data: np.ndarray, fmt: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored data → float32 array of `shape`, dequantized by the `gguf` package."""
    fmt = fmt.lower()
    if fmt in FLOAT_FORMATS:
        return np.asarray(data, np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(data, np.uint8), _qtype(fmt)).reshape(shape)


def _is_expert(name: str) -> bool:
    return name.split(".")[-2] in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def _is_vector_or_router(name: str) -> bool:
    return name.split(".")[-2] in ("attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm", "output_norm",
                                   "ffn_gate_inp")


def tensor_formats(cfg: Config, expert_format: str | Mapping[str, str] = "f32", dense_format: str = "f32",
                   overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Format of every tensor: experts per kind (str or {'gate','up','down'} → fmt), dense matrices,
    F32 norms and routers; `overrides` maps tensor names to formats last."""
    ef = {k: expert_format for k in EXPERT_KINDS} if isinstance(expert_format, str) else dict(expert_format)
    if set(ef) != set(EXPERT_KINDS):
        raise ValueError(f"expert_format needs exactly the keys {EXPERT_KINDS}, got {sorted(ef)}")
    dummy = {tensor_name(_T.TOKEN_EMBD): None, tensor_name(_T.OUTPUT_NORM): None}
    if not cfg.tie_embeddings:
        dummy[tensor_name(_T.OUTPUT)] = None
    names = list(dummy)
    for l in range(cfg.n_layers):
        names += [tensor_name(k, l) for k in (_T.ATTN_NORM, _T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT,
                                              _T.ATTN_Q_NORM, _T.ATTN_K_NORM, _T.FFN_NORM, _T.FFN_GATE_INP)]
        names += [expert_tensor_name(l, k) for k in EXPERT_KINDS]
    out = {}
    for n in names:
        if _is_expert(n):
            kind = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}[n.split(".")[-2]]
            out[n] = ef[kind].lower()
        elif _is_vector_or_router(n):
            out[n] = "f32"
        else:
            out[n] = dense_format.lower()
    for n, f in (overrides or {}).items():
        if n not in out:
            raise ValueError(f"override names unknown tensor {n!r}")
        out[n] = f.lower()
    return out


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_metadata(tokenizer_json: str | os.PathLike, vocab: int, *, bos_id: int | None = None,
                       eos_id: int | None = None, pre: str | None = None) -> dict[str, Any]:
    """tokenizer.ggml.* fields of a HF `tokenizers` BPE JSON, padded with UNUSED tokens to `vocab`."""
    path = Path(tokenizer_json)
    try:
        text = path.read_text()
        tj = json.loads(text)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read tokenizer JSON: {exc}") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(path, f"tokenizer model type {model.get('type')!r} is not BPE")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: int(gguf.TokenType.NORMAL) for i in id_to_tok}
    for at in tj.get("added_tokens", []):
        id_to_tok[int(at["id"])] = at["content"]
        types[int(at["id"])] = int(gguf.TokenType.CONTROL if at.get("special") else gguf.TokenType.USER_DEFINED)
    n = max(id_to_tok) + 1
    if n > vocab:
        raise InputError(path, f"tokenizer has {n} ids but the model's vocabulary is {vocab}")
    tokens, token_type = [], []
    for i in range(vocab):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            token_type.append(types[i])
        else:
            tokens.append(f"[PAD{i}]")
            token_type.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {at["content"]: int(at["id"]) for at in tj.get("added_tokens", []) if at.get("special")}
    if eos_id is None:
        eos_id = special.get("<|endoftext|>", special.get("</s>"))
    if bos_id is None:
        bos_id = eos_id  # Qwen: bos = eos = <|endoftext|>, never added
    if pre is None:
        pt = tj.get("pre_tokenizer") or {}
        pre = "gpt-2" if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) else "default"
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": token_type, "merges": merges,
            "bos_id": bos_id, "eos_id": eos_id, "hf_json": text}


def _add_tokenizer(w: gguf.GGUFWriter, tok: Mapping[str, Any]) -> None:
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_type"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    if tok.get("bos_id") is not None:
        w.add_bos_token_id(int(tok["bos_id"]))
    if tok.get("eos_id") is not None:
        w.add_eos_token_id(int(tok["eos_id"]))
    w.add_add_bos_token(False)
    if tok.get("hf_json"):
        w.add_string(gguf.Keys.Tokenizer.HF_JSON, tok["hf_json"])


# ----------------------------------------------------------------------------- write

def write_gguf(path: str | os.PathLike, weights: Weights, cfg: Config, *,
               expert_format: str | Mapping[str, str] = "f32", dense_format: str = "f32",
               overrides: Mapping[str, str] | None = None, stored: Mapping[str, GGUFTensor] | None = None,
               tokenizer_json: str | os.PathLike | None = None, name: str = "jaxmoe-qwen3moe",
               extra_metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write a qwen3moe GGUF atomically; returns the format of every tensor.

    `stored` passes already-encoded tensors through byte for byte (e.g. experts re-quantized by a
    quality run, or a model read with `read_gguf`); all others are encoded from `weights`.
    `extra_metadata` adds string/number/bool keys (e.g. "jaxmoe.train.steps").
    """
    formats = tensor_formats(cfg, expert_format, dense_format, overrides)
    floats = weights_to_tensors(weights, cfg)
    tok = None if tokenizer_json is None else tokenizer_metadata(tokenizer_json, cfg.vocab)
    stored = dict(stored or {})
    for tname, st in stored.items():
        if tname in floats and tuple(st.shape) != floats[tname].shape:
            raise ValueError(f"stored tensor {tname} has shape {st.shape}, weights have {floats[tname].shape}")
    todo = [n for n in floats if n not in stored]
    # numpy releases the GIL inside its array loops, so threads overlap the K-quant searches
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        encoded = dict(zip(todo, pool.map(lambda n: encode(floats[n], formats[n]), todo)))
    ef = formats[expert_tensor_name(0, "gate")] if cfg.n_layers else "f32"
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH_NAME)
        w.add_name(name)
        w.add_block_count(cfg.n_layers)
        w.add_context_length(cfg.max_seq)
        w.add_embedding_length(cfg.hidden)
        w.add_feed_forward_length(cfg.expert_ffn)  # no dense FFN in this model
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_eps)
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.top_k)
        w.add_expert_feed_forward_length(cfg.expert_ffn)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_file_type(int(_FILE_TYPE.get(ef, gguf.LlamaFileType.GUESSED)))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tok is not None:
            _add_tokenizer(w, tok)
        for k, v in (extra_metadata or {}).items():
            if isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, int):
                w.add_int64(k, v)
            elif isinstance(v, float):
                w.add_float64(k, v)
            else:
                w.add_string(k, str(v))
        for tname in floats:
            if tname in stored:
                fmt, data = stored[tname].fmt, stored[tname].data
            else:
                fmt, data = formats[tname], encoded[tname]
            if fmt in FLOAT_FORMATS:
                w.add_tensor(tname, data)
            else:
                w.add_tensor(tname, np.ascontiguousarray(data, np.uint8), raw_shape=data.shape,
                             raw_dtype=_qtype(fmt))
            formats[tname] = fmt
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return formats


# ----------------------------------------------------------------------------- read

def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32_value(v: float) -> float:
    """The shortest decimal that a stored float32 came from (1e-6 is stored as 9.99999997e-07)."""
    return float(str(np.float32(v)))


def read_gguf(path: str | os.PathLike, *, dequantize: bool = True) -> GGUFModel:
    """Read a qwen3moe GGUF: config, float32 weights (dequantized by gguf), stored tensors, tokenizer.

    With `dequantize=False` the weights are not built (`weights` is None): only config and raw tensors.
    """
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable GGUF file: {exc}") from None
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != ARCH_NAME:
        raise InputError(path, f"architecture is {arch!r}, expected {ARCH_NAME!r}")

    def need(key_template: str) -> Any:
        key = key_template.format(arch=ARCH_NAME)
        v = _field(reader, key)
        if v is None:
            raise InputError(path, f"metadata key {key} is missing")
        return v

    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        fmt = t.tensor_type.name.lower()
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # ggml ne -> numpy shape
        data = np.asarray(t.data)
        if fmt in FLOAT_FORMATS:
            data = data.reshape(shape)
        tensors[t.name] = GGUFTensor(name=t.name, fmt=fmt, shape=shape, data=data)
    embd = tensors.get(tensor_name(_T.TOKEN_EMBD))
    if embd is None:
        raise InputError(path, f"tensor {tensor_name(_T.TOKEN_EMBD)} is missing")
    L = gguf.Keys.LLM
    A = gguf.Keys.Attention
    cfg = Config(
        vocab=embd.shape[0], hidden=int(need(L.EMBEDDING_LENGTH)), n_layers=int(need(L.BLOCK_COUNT)),
        n_heads=int(need(A.HEAD_COUNT)), n_kv_heads=int(need(A.HEAD_COUNT_KV)), head_dim=int(need(A.KEY_LENGTH)),
        n_experts=int(need(L.EXPERT_COUNT)), top_k=int(need(L.EXPERT_USED_COUNT)),
        expert_ffn=int(need(L.EXPERT_FEED_FORWARD_LENGTH)),
        norm_topk_prob=bool(_field(reader, L.EXPERT_WEIGHTS_NORM.format(arch=ARCH_NAME), True)),
        rope_theta=_f32_value(need(gguf.Keys.Rope.FREQ_BASE)), rms_eps=_f32_value(need(A.LAYERNORM_RMS_EPS)),
        max_seq=int(need(L.CONTEXT_LENGTH)), tie_embeddings=tensor_name(_T.OUTPUT) not in tensors)
    weights = None
    if dequantize:
        floats = {}
        for n, t in tensors.items():
            try:
                floats[n] = decode(t.data, t.fmt, t.shape)
            except (KeyError, NotImplementedError, ValueError) as exc:
                raise InputError(path, f"cannot decode tensor {n} ({t.fmt}): {exc}") from None
        weights = tensors_to_weights(floats, cfg, path)
    tok = None
    T = gguf.Keys.Tokenizer
    if T.LIST in reader.fields:
        tok = {"model": _field(reader, T.MODEL), "pre": _field(reader, T.PRE), "tokens": _field(reader, T.LIST),
               "token_type": _field(reader, T.TOKEN_TYPE), "merges": _field(reader, T.MERGES, []),
               "bos_id": _field(reader, T.BOS_ID), "eos_id": _field(reader, T.EOS_ID),
               "hf_json": _field(reader, T.HF_JSON)}
    skip = {T.LIST, T.TOKEN_TYPE, T.MERGES, T.HF_JSON}
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k not in skip}
    return GGUFModel(cfg=cfg, weights=weights, tensors=tensors, tokenizer=tok, metadata=metadata)
