"""Varlen attention over packed documents, registered in transformers' public attention registries.

A pack is one flat sequence [1, T] of documents; `cu_seq_lens_q/k` (int32, n_docs+1) and
`max_length_q/k` (int) describe the document boundaries. They arrive through the model's forward
kwargs, computed once per pack on the host (pack/collate.py), never per layer. The per-document
paths loop over the boundaries in Python, so they read `cu_seq_lens_cpu`, the host copy the pack
keeps: the device copy is for the CUDA kernels, and reading it would sync the device in every layer.

Every argument that changes the result is implemented or refused, never dropped: scaling, sliding
windows, logit softcapping (`softcap`), attention sinks (`s_aux`, learned per head, with gradient)
and dropout. Any other keyword must be on `HARMLESS_KWARGS`; anything else stops the step with the
family and the argument named.

Backends, by availability and by what they implement: flash-attn varlen (CUDA, if installed:
softcap, windows, dropout), torch's CPU flash kernel per document (CPU: windows), per-document SDPA
(dropout, and plain attention everywhere else), and explicit per-document scores (softcap and sinks where no
kernel has them; O(L^2) memory per document). Tensor suffixes: B batch (=1), H heads, T tokens,
D head dim.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

from zeropad.errors import ConfigError

ATTN_NAME = "zeropad_varlen"

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None

# Keywords transformers forwards to every attention call that do not change its output (the
# packing kwargs are named parameters; output_attentions only asks for weights, which no fused
# kernel returns). Anything else is refused, so a new feature cannot be silently dropped.
HARMLESS_KWARGS = frozenset({
    "position_ids", "use_cache", "cache_position", "output_attentions", "output_hidden_states",
    "output_router_logits", "num_items_in_batch", "return_dict", "seq_idx",
})


def family(module: torch.nn.Module) -> str:
    """'gemma2 (Gemma2Attention)': the config's model_type and the attention class, for messages."""
    model_type = getattr(getattr(module, "config", None), "model_type", None) or "unknown family"
    return f"{model_type} ({type(module).__name__})"


@dataclass(frozen=True)
class _Features:
    scaling: float
    sliding_window: int | None
    softcap: float | None
    sinks: torch.Tensor | None  # [H] logits of a virtual key with no value, one per query head
    dropout: float


def _backend(query: torch.Tensor, value: torch.Tensor, feats: _Features) -> str:
    # The CUDA varlen kernels take fp16/bf16 only; fp32 runs (and CPUs) compute per document.
    if query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16) and feats.sinks is None:
        if _HAS_FLASH_ATTN:
            return "flash_attn"
        if feats.softcap is None and feats.dropout == 0.0 and (
                feats.sliding_window is None or "window_size" in _varlen_params()):
            return "torch_varlen"
    if feats.softcap is not None or feats.sinks is not None:
        return "explicit_per_doc"
    if query.device.type == "cpu" and feats.dropout == 0.0 and value.shape[-1] == query.shape[-1]:
        return "cpu_flash"  # (the kernel takes one head dim: MLA's narrower values go to SDPA)
    return "sdpa_per_doc"


def _window_mask(n: int, sliding_window: int | None, device) -> torch.Tensor:
    """[n, n] bool, True where query i may attend key j: causal, and within the window if any
    (transformers' convention: a window of W keeps keys i-W < j <= i)."""
    pos = torch.arange(n, device=device)
    dist = pos[:, None] - pos[None, :]
    mask = dist >= 0
    return mask & (dist < sliding_window) if sliding_window is not None else mask


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """(count, length) of each run of consecutive documents of one length."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0] + 1, n)
        else:
            runs.append((1, n))
    return runs


def _sdpa_per_doc(q_BHTD, k_BHTD, v_BHTD, bounds: list[int], feats: _Features) -> torch.Tensor:
    """Causal SDPA on each document (each run of equal-length documents): exact, and never builds a [T, T] mask."""
    gqa = q_BHTD.shape[1] != k_BHTD.shape[1]
    outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=feats.dropout,
                                           scale=feats.scaling, enable_gqa=gqa)
            for (q, k, v), mask in _doc_batches(bounds, feats.sliding_window, q_BHTD.dtype, q_BHTD, k_BHTD, v_BHTD)]
    return _pack_tokens(outs)


def _doc_batches(bounds: list[int], sliding_window: int | None, dtype, *tensors: torch.Tensor):
    """Per run of `count` equal-length documents: ([count, H, n, ...] views of each [1, H, T, ...] tensor (a
    logsumexp [1, H, T] too), additive window mask or None).

    The documents are cut with one torch.split per tensor, not a slice each: in backward a split is one
    concatenation, where n slices would each scatter into a zero tensor of the whole pack (O(n T)). A run of
    consecutive documents of one length (fixed-length pretraining chunks) is one batched call: its [1, H, count * n,
    D] slice viewed as [count, H, n, D], no copy. Slices stay 4-D: on CPU, SDPA takes its fused flash kernel only for
    4-D inputs (3-D ones fall back to the generic math path, ~3x slower in forward + backward)."""
    # An empty document (repeated boundary) holds no token: it is dropped, not handed to a kernel (the CPU one
    # divides by its length)
    runs = [run for run in _runs([end - start for start, end in zip(bounds[:-1], bounds[1:])]) if run[1] > 0]
    sizes = [count * n for count, n in runs]
    for (count, n), *parts in zip(runs, *(x.split(sizes, dim=2) for x in tensors)):
        window = sliding_window if sliding_window is not None and sliding_window < n else None
        mask = None if window is None else torch.zeros(n, n, dtype=dtype, device=parts[0].device).masked_fill_(
            ~_window_mask(n, window, parts[0].device), float("-inf"))  # additive: the CPU kernel takes no bool mask
        yield [x.unflatten(2, (count, n)).transpose(1, 2).flatten(0, 1) for x in parts], mask


def _pack_tokens(parts: list[torch.Tensor], lse: bool = False) -> torch.Tensor:
    """[count, H, n, D] pieces -> [1, H, T, D], laid out [1, T, H, D] ([count, H, n] -> [1, H, T] for logsumexps)."""
    if lse:
        return torch.cat([x.transpose(0, 1).flatten(1, 2) for x in parts], dim=1)[None]
    return torch.cat([x.transpose(1, 2).flatten(0, 1) for x in parts], dim=0)[None].transpose(1, 2)


# The CPU path: torch's CPU flash-attention kernel per document (per run of equal lengths), forward and backward,
# as one custom op. One op serves eager and train.compile alike: dynamo sees neither the host-side boundaries (a
# .tolist() would break the graph, and a loop over them would recompile per pack) nor the loop. The forward keeps
# each document's output and logsumexp, as SDPA's own autograd does, so the backward is the kernel's backward
# alone: no recomputed forward. Outputs and gradients are laid out [1, T, H, D] in memory (the kernel writes each
# document that way), so the reshape the attention module does next is free. `cu_seqlens` is the pack's host copy.
_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _unit_stride_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # The kernels read each row of head_dim as contiguous memory (SDPA checks that before calling them; these ops
    # call them directly): a strided head dim, a view such as x[..., ::2], is copied first.
    return [x if x.stride(-1) == 1 else x.contiguous() for x in tensors]


def _tokens_major(x: torch.Tensor, width: int) -> torch.Tensor:
    """An empty [1, H, T, width] laid out [1, T, H, width], as _pack_tokens returns."""
    return x.new_empty((1, x.shape[2], x.shape[1], width)).transpose(1, 2)


@torch.library.custom_op("zeropad::cpu_flash_per_doc", mutates_args=())
def cpu_flash_per_doc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                      sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention per document: ([1, H, T, Dv] output, [1, H, T] logsumexp)."""
    q, k, v = _unit_stride_rows(q, k, v)
    outs, lses = [], []
    for (qd, kd, vd), mask in _doc_batches(cu_seqlens.tolist(), sliding_window, q.dtype, q, k, v):
        out, lse = _cpu_flash(qd, kd, vd, 0.0, mask is None, attn_mask=mask, scale=scale)
        outs.append(out)
        lses.append(lse)
    return _pack_tokens(outs), _pack_tokens(lses, lse=True)


@cpu_flash_per_doc.register_fake
def _(q, k, v, cu_seqlens, scale, sliding_window):
    lse = q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
    return _tokens_major(q, v.shape[-1]), lse


@torch.library.custom_op("zeropad::cpu_flash_per_doc_backward", mutates_args=())
def _cpu_flash_per_doc_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                                sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad, q, k, v, out = _unit_stride_rows(grad, q, k, v, out)
    grads = []
    for (gd, qd, kd, vd, od, lse_d), mask in _doc_batches(cu_seqlens.tolist(), sliding_window, q.dtype,
                                                          grad, q, k, v, out, lse):
        grads.append(_cpu_flash_backward(gd, qd, kd, vd, od, lse_d, 0.0, mask is None, attn_mask=mask, scale=scale))
    return tuple(_pack_tokens(list(g)) for g in zip(*grads))


@_cpu_flash_per_doc_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, scale, sliding_window):
    return tuple(_tokens_major(x, x.shape[-1]) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.scale, ctx.sliding_window = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)


def _backward(ctx, grad, _grad_lse):
    dq, dk, dv = _cpu_flash_per_doc_backward(grad, *ctx.saved_tensors, ctx.scale, ctx.sliding_window)
    return dq, dk, dv, None, None, None


cpu_flash_per_doc.register_autograd(_backward, setup_context=_setup_context)


# What runs per document without the op (dropout, softcap, sinks; fp32 on a GPU): eagerly, and under torch.compile
# as one graph break, rather than traced and specialised on each pack's boundaries.
@torch.compiler.disable
def _per_doc_eager(per_doc, q_BHTD, k_BHTD, v_BHTD, cu_seqlens: torch.Tensor, feats: _Features) -> torch.Tensor:
    return per_doc(q_BHTD, k_BHTD, v_BHTD, cu_seqlens.tolist(), feats)


def _explicit_per_doc(q_BHTD, k_BHTD, v_BHTD, bounds: list[int], feats: _Features) -> torch.Tensor:
    """Scores written out per document, for what SDPA cannot express: tanh softcap on the scaled
    logits, and sinks as one extra logit per head in the softmax denominator (dropped after)."""
    groups = q_BHTD.shape[1] // k_BHTD.shape[1]
    k_BHTD, v_BHTD = (x.repeat_interleave(groups, dim=1) for x in (k_BHTD, v_BHTD))
    # fp16/bf16 scores are normalised in fp32, as every kernel does
    score_dtype = torch.promote_types(q_BHTD.dtype, torch.float32)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    outs = []
    for q, k, v in zip(*(x.split(lengths, dim=2) for x in (q_BHTD, k_BHTD, v_BHTD))):  # one split: see above
        n = q.shape[2]
        scores = torch.matmul(q, k.transpose(2, 3)).to(score_dtype) * feats.scaling
        if feats.softcap is not None:
            scores = torch.tanh(scores / feats.softcap) * feats.softcap
        scores = scores.masked_fill(~_window_mask(n, feats.sliding_window, q.device), float("-inf"))
        if feats.sinks is not None:
            sink = feats.sinks.to(score_dtype).reshape(1, -1, 1, 1).expand(1, -1, n, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        if feats.dropout:
            probs = F.dropout(probs, p=feats.dropout)
        outs.append(torch.matmul(probs.to(v.dtype), v))
    return torch.cat(outs, dim=2)


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen(q_THD, k_THD, v_THD, cu, max_len, feats: _Features) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn, across its signatures: torch >= 2.12 takes window_size
    and enable_gqa; earlier releases take is_causal and need KV heads repeated for GQA (and get no
    windowed layer: _backend sends those per document)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kwargs: dict = {"scale": feats.scaling}
    if "window_size" in params:
        window = feats.sliding_window
        kwargs["window_size"] = (window - 1, 0) if window is not None else (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q_THD.shape[1] != k_THD.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q_THD.shape[1] // k_THD.shape[1]
            k_THD, v_THD = (x.repeat_interleave(groups, dim=1) for x in (k_THD, v_THD))
    return varlen_attn(q_THD, k_THD, v_THD, cu, cu, max_len, max_len, **kwargs)


def _flash_attn(q_THD, k_THD, v_THD, cu, max_len, feats: _Features) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    window = (feats.sliding_window - 1, 0) if feats.sliding_window is not None else (-1, -1)
    head_dim, v_head_dim = q_THD.shape[-1], v_THD.shape[-1]
    if v_head_dim != head_dim:  # MLA (DeepSeek): flash-attn needs one head dim; pad v, crop the output
        v_THD = F.pad(v_THD, [0, head_dim - v_head_dim])
    out = flash_attn_varlen_func(
        q_THD, k_THD, v_THD, cu, cu, max_len, max_len, dropout_p=feats.dropout,
        softmax_scale=feats.scaling, causal=True, window_size=window, softcap=feats.softcap or 0.0,
    )
    return out[..., :v_head_dim]


def _refuse(module: torch.nn.Module, what: str) -> ConfigError:
    return ConfigError(f"{family(module)}: {what}; zeropad_varlen refuses rather than train a different model")


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    cu_seq_lens_cpu: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query/key/value: [1, H, T, D] (value's D may differ, as in MLA); returns ([1, T, H, Dv], None).
    `cu_seq_lens_cpu`: cu_seq_lens_q on the host (pack/collate.varlen_kwargs); without it the per-document
    paths read cu_seq_lens_q."""
    unknown = sorted(set(kwargs) - HARMLESS_KWARGS)
    if unknown:
        raise _refuse(module, f"its attention passes {unknown}, which packed attention does not implement")
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise _refuse(module, "bidirectional (non-causal) attention cannot be packed")
    if attention_mask is not None:
        raise _refuse(module, "an attention mask reached the attention (documents are given by cu_seq_lens, "
                              "so a mask here carries something else, e.g. a bias or bidirectional spans)")
    if query.shape[0] != 1:
        raise _refuse(module, f"batch size {query.shape[0]}: packs are one flat sequence per micro-step")
    T = query.shape[2]
    if key.shape[2] != T:
        # Keys longer than the queries hold a KV cache's past tokens, which the document slicing below
        # would misalign (a sliding-window cache keeps the window's last tokens, so every key shifts).
        raise _refuse(module, f"{key.shape[2]} keys for {T} queries: a KV cache reached the attention; packs are "
                              "attended whole, so run the model with use_cache=False")
    if cu_seq_lens_q is None:  # a single unpacked document (e.g. generation without packing kwargs)
        cu_seq_lens_q = cu_seq_lens_cpu = torch.tensor([0, T], dtype=torch.int32)
        max_length_q = T
    if not (cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q or torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise _refuse(module, "different query and key document boundaries (self-attention over packs only)")
    feats = _Features(
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=sliding_window, softcap=softcap, sinks=s_aux,
        dropout=dropout if module.training else 0.0,
    )

    if torch.is_autocast_enabled(query.device.type):
        # Under autocast, q/k leave fp32-weight norms (e.g. Qwen3's q_norm) in fp32 while v is bf16; the kernels
        # (and the CPU one's custom op, which autocast does not reach) take one dtype, autocast's, as SDPA would.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (x.to(dtype) for x in (query, key, value))
    backend = _backend(query, value, feats)
    if backend in ("cpu_flash", "sdpa_per_doc", "explicit_per_doc"):
        bounds = cu_seq_lens_q if cu_seq_lens_cpu is None else cu_seq_lens_cpu
        if backend == "cpu_flash":
            out_BHTD, _ = cpu_flash_per_doc(query, key, value, bounds, feats.scaling, feats.sliding_window)
        else:
            per_doc = _sdpa_per_doc if backend == "sdpa_per_doc" else _explicit_per_doc
            out_BHTD = _per_doc_eager(per_doc, query, key, value, bounds, feats)
        return out_BHTD.transpose(1, 2), None

    q_THD, k_THD, v_THD = (x[0].transpose(0, 1) for x in (query, key, value))
    cu = cu_seq_lens_q.to(query.device, torch.int32)
    kernel = _flash_attn if backend == "flash_attn" else _torch_varlen
    return kernel(q_THD, k_THD, v_THD, cu, max_length_q, feats).unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    # Documents are separated by cu_seq_lens, so no [T, T] mask is ever built.
    return None


def register() -> str:
    """Register under both registries (a name missing from the mask registry silently gets no mask)."""
    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    return ATTN_NAME


register()
