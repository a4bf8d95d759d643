"""Varlen attention over packed documents, registered in transformers' public attention registries.

A pack is one flat sequence [1, T] of documents; `cu_seq_lens_q/k` (int32, n_docs+1) and
`max_length_q/k` (int) describe the document boundaries. They arrive through the model's forward
kwargs, computed once per pack on the host (pack/collate.py), never per layer.

Backends, by availability: flash-attn varlen (CUDA, if installed), torch's varlen_attn (CUDA),
per-document SDPA (CPU and fallback). Tensor suffixes: B batch (=1), H heads, T tokens, D head dim.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

ATTN_NAME = "zeropad_varlen"

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _backend(query: torch.Tensor) -> str:
    # The CUDA varlen kernels take fp16/bf16 only; fp32 runs (and CPUs) use per-document SDPA.
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa_per_doc"
    if _HAS_FLASH_ATTN:
        return "flash_attn"
    return "torch_varlen"


def _sdpa_per_doc(q_BHTD, k_BHTD, v_BHTD, cu_seqlens, scaling, sliding_window) -> torch.Tensor:
    """Causal SDPA on each document's slice: exact, and never builds a [T, T] mask.

    Slices stay 4-D: on CPU, SDPA takes its fused flash kernel only for 4-D inputs (3-D ones
    fall back to the generic math path, ~3x slower in forward + backward)."""
    bounds = cu_seqlens.tolist()
    gqa = q_BHTD.shape[1] != k_BHTD.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[:, :, start:end] for x in (q_BHTD, k_BHTD, v_BHTD))
        if sliding_window is None:
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
        else:
            pos = torch.arange(end - start, device=q.device)
            dist = pos[:, None] - pos[None, :]
            mask = (dist >= 0) & (dist < sliding_window)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen(q_THD, k_THD, v_THD, cu, max_len, scaling, sliding_window) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn, across its signatures: torch >= 2.12 takes window_size
    and enable_gqa; earlier releases take is_causal and need KV heads repeated for GQA."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kwargs: dict = {"scale": scaling}
    if "window_size" in params:
        kwargs["window_size"] = (sliding_window - 1, 0) if sliding_window is not None else (-1, 0)
    else:
        assert sliding_window is None, "sliding-window attention needs torch >= 2.12 or flash-attn on CUDA"
        kwargs["is_causal"] = True
    if q_THD.shape[1] != k_THD.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q_THD.shape[1] // k_THD.shape[1]
            k_THD, v_THD = (x.repeat_interleave(groups, dim=1) for x in (k_THD, v_THD))
    return varlen_attn(q_THD, k_THD, v_THD, cu, cu, max_len, max_len, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query/key/value: [1, H, T, D]; returns ([1, T, H, D], None) as transformers expects."""
    assert query.shape[0] == 1, "packed attention expects one flat sequence per micro-step (batch size 1)"
    T = query.shape[2]
    if cu_seq_lens_q is None:  # a single unpacked document (e.g. generation without packing kwargs)
        cu_seq_lens_q = torch.tensor([0, T], dtype=torch.int32, device=query.device)
        max_length_q = T
    assert cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q or torch.equal(cu_seq_lens_k, cu_seq_lens_q), (
        "self-attention over packs needs identical query and key boundaries"
    )
    assert attention_mask is None, "zeropad_varlen takes no attention mask: documents are given by cu_seq_lens"
    dropout = dropout if module.training else 0.0
    assert dropout == 0.0, "attention dropout is not supported by the packed attention"

    if query.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # Under autocast, q/k leave fp32-weight norms (e.g. Qwen3's q_norm) in fp32 while v is bf16.
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = (x.to(dtype) for x in (query, key, value))
    backend = _backend(query)
    if backend == "sdpa_per_doc":
        out_BHTD = _sdpa_per_doc(query, key, value, cu_seq_lens_q, scaling, sliding_window)
        return out_BHTD.transpose(1, 2), None

    q_THD, k_THD, v_THD = (x[0].transpose(0, 1) for x in (query, key, value))
    cu = cu_seq_lens_q.to(torch.int32)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
        out_THD = flash_attn_varlen_func(
            q_THD, k_THD, v_THD, cu, cu, max_length_q, max_length_q,
            softmax_scale=scaling, causal=True, window_size=window,
        )
    else:
        out_THD = _torch_varlen(q_THD, k_THD, v_THD, cu, max_length_q, scaling, sliding_window)
    return out_THD.unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    # Documents are separated by cu_seq_lens, so no [T, T] mask is ever built.
    return None


def register() -> str:
    """Register under both registries (a name missing from the mask registry silently gets no mask)."""
    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    return ATTN_NAME


register()
