"""Token loss with global normalisation (DESIGN.md invariant 5), and the chunked LM-head loss.

Each micro-step contributes sum(token losses) / N, where N is the number of target tokens in the
whole optimizer step (all micro-steps; all ranks once distributed). Summing the micro-step
gradients then gives exactly the gradient of the token mean over the step, however the tokens
were grouped into packs.

The chunked loss never builds the [T, V] logits: the LM head and the cross-entropy run on chunks
of C tokens, and each chunk's gradients are computed while its logits are at hand. The loss buffers
then peak at about one [C, V] fp32 chunk plus the weight gradient, instead of three [T, V] fp32 tensors (at V = 151,936
and T = 16k, 10 GB each; benchmarks/memory.py). Suffixes: T tokens, H hidden, V vocabulary, C chunk.

The chunked loss runs the model as the loop holds it, DDP or FSDP2 wrapper included, so the
wrapper's hooks fire as for the plain loss: DDP's gradient synchronisation, FSDP's all-gather,
reshard and reduce-scatter. One forward serves both: the model's own forward with `logits_to_keep`
an empty index (transformers' public argument: the LM head runs on no token), while a forward hook
on the backbone (`_backbone`) keeps its last hidden state, the very tensor the LM head would read.
(Not `output_hidden_states`: it would hold every layer's hidden state through the forward.) The
empty logits still depend on the hidden state, so DDP's search for unused parameters (VLMs) finds
every parameter the loss uses. The LM head's weight then goes into the chunked cross-entropy
outside the forward. Under FSDP2 the head lives in the root module's parameter group, which
`reshard_after_forward: true` shards again when the forward ends, so the root is unsharded
(`FSDPModule.unshard`, public; a no-op when the forward kept it whole) before the weight is read.
The chunked loss then saves the whole weight for its backward, and FSDP's own post-backward
reduce-scatters the head's gradient and reshards the root, as it does after the plain loss. Without
a backward (evaluation) the root is resharded here.

The empty logits' sum (exactly 0) is added to the loss, so the backward enters the model's output as
the plain loss's does. FSDP2 hooks the root's pre-backward (which prefetches the last decoder layer,
an all-gather) on every tensor of the root's output that requires grad: the logits, and in a VLM
whose pack holds images the vision tower's outputs (`image_outputs`). Without the logits in the loss,
only a rank with a real image would fire it, late, when the gradient reaches the tower's output, and
its all-gather would meet the tower's on a rank that ran the zero-weight dummy image
(parallel.sharding.VisionCalls): the collectives out of order. With them, every rank fires it
first. The empty logits' backward adds a zero [V, H] gradient to the head's weight (autograd runs it
after the chunked backward, whose fp32 accumulator is then freed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from zeropad.config import MemoryConfig
from zeropad.pack.collate import IGNORE_INDEX
from zeropad.parallel.sharding import unwrap


def token_loss_sum(logits_TV: torch.Tensor, target_ids_T: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the targets, computed in fp32."""
    return F.cross_entropy(logits_TV.float(), target_ids_T, ignore_index=IGNORE_INDEX, reduction="sum")


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    # The plain path runs the LM head under the caller's autocast; do the same matmuls in that dtype.
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _chunk_logits(hidden_CH, weight_VH, bias_V) -> torch.Tensor:
    # F.linear, as the LM head itself: the same kernel, so the same rounding of the logits
    return F.linear(hidden_CH, weight_VH, bias_V).float()


def _targets(target_ids_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(column index [C, 1], fp32 mask [C]) of a chunk's targets; ignored tokens point at column 0
    and are masked out. Masks, not `nonzero`: no host sync, and no shape that depends on the data."""
    valid_C = target_ids_C != IGNORE_INDEX
    return target_ids_C.clamp(min=0)[:, None], valid_C.float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden_t @ W^T + b, target_t) over targets != IGNORE_INDEX, without the [T, V] logits.

    Matches `token_loss_sum(lm_head(hidden), targets)`: logits in the compute dtype (the autocast
    dtype when autocast is on, else the inputs'), softmax and loss in fp32, logit gradients cast
    back to the compute dtype before the two matmuls of the gradient, as autograd does in the plain path.

    The loss is a sum whose backward multiplies by one scalar, so the gradients are computed in the
    forward, chunk by chunk while each chunk's logits are at hand (as Liger's fused linear cross-entropy
    does): three matmuls per chunk, as the plain loss, instead of recomputing the logits in backward.
    The forward then keeps the hidden state's gradient ([T, H]) and the head's ([V, H] fp32) for the
    backward, which only scales them; without gradients wanted (evaluation) it computes the loss alone.
    """

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, bias_V, target_ids_T, chunk_tokens: int, want_grads: bool):
        dtype = _compute_dtype(hidden_TH.device, hidden_TH.dtype)
        want_hidden, want_weight, want_bias = (want_grads and w for w in ctx.needs_input_grad[:3])
        with torch.autocast(hidden_TH.device.type, enabled=False):
            h_TH, w_VH = hidden_TH.to(dtype), weight_VH.to(dtype)
            b_V = None if bias_V is None else bias_V.to(dtype)
            loss = hidden_TH.new_zeros((), dtype=torch.float32)
            grad_hidden_TH = torch.empty_like(hidden_TH) if want_hidden else None
            # fp32 accumulators: the chunks' weight (and bias) gradients are summed across chunks
            grad_weight_VH = torch.zeros_like(weight_VH, dtype=torch.float32) if want_weight else None
            grad_bias_V = torch.zeros_like(bias_V, dtype=torch.float32) if want_bias else None
            for start in range(0, h_TH.shape[0], chunk_tokens):
                end = start + chunk_tokens
                logits_CV = _chunk_logits(h_TH[start:end], w_VH, b_V)
                column_C1, valid_C = _targets(target_ids_T[start:end])
                target_logit_C = logits_CV.gather(1, column_C1)[:, 0]
                # logsumexp = max + log(sum(exp(logits - max))), in place: one [C, V] buffer, not three
                max_C = logits_CV.amax(dim=-1)
                exp_CV = logits_CV.sub_(max_C[:, None]).exp_()
                sum_C = exp_CV.sum(-1)
                # CE_t = logsumexp(logits_t) - logits_t[target_t]
                loss += ((sum_C.log() + max_C - target_logit_C) * valid_C).sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                # d(CE_t)/d(logits_t) = softmax(logits_t) - onehot(target_t); zero for ignored tokens.
                grad_CV = exp_CV.div_(sum_C[:, None])
                grad_CV.scatter_add_(1, column_C1, torch.full_like(column_C1, -1, dtype=grad_CV.dtype))
                grad_CV = grad_CV.mul_(valid_C[:, None]).to(dtype)
                if want_hidden:
                    grad_hidden_TH[start:end] = grad_CV @ w_VH
                if want_weight and dtype == torch.float32:
                    grad_weight_VH.addmm_(grad_CV.T, h_TH[start:end])  # in place: no [V, H] temporary
                elif want_weight:
                    grad_weight_VH += grad_CV.T @ h_TH[start:end]  # a bf16 product, summed in fp32
                if want_bias:
                    grad_bias_V += grad_CV.sum(0)
                del logits_CV, exp_CV, grad_CV  # free this chunk's buffers before the next one is allocated
        ctx.save_for_backward(grad_hidden_TH, grad_weight_VH, grad_bias_V)
        ctx.dtypes = weight_VH.dtype, None if bias_V is None else bias_V.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_TH, grad_weight_VH, grad_bias_V = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = lambda grad, dtype: None if grad is None else (grad * grad_loss).to(dtype)  # noqa: E731
        return (scale(grad_hidden_TH, grad_hidden_TH.dtype if grad_hidden_TH is not None else None),
                scale(grad_weight_VH, weight_dtype), scale(grad_bias_V, bias_dtype), None, None, None)


def chunked_cross_entropy_sum(
    hidden_TH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None,
    target_ids_T: torch.Tensor, chunk_tokens: int,
) -> torch.Tensor:
    """Summed cross-entropy of the LM head (hidden @ weight^T + bias) over the targets, in chunks."""
    assert chunk_tokens > 0
    # Read here: inside an autograd.Function's forward, gradient mode is always off.
    return _ChunkedLinearCrossEntropy.apply(hidden_TH, weight_VH, bias_V, target_ids_T, chunk_tokens,
                                            torch.is_grad_enabled())


def chunked_loss_unsupported(model: torch.nn.Module) -> str | None:
    """Why the chunked loss would not equal the model's own logits, or None when it does.

    The chunked loss applies the output embedding as a plain linear map to the decoder's last
    hidden state; models that transform logits after that map are left to the plain loss."""
    config = model.config.get_text_config()
    if model.config.model_type == "chameleon":
        return "the model masks its image-code logits after the LM head (image codes are never predicted)"
    if getattr(config, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits (final_logit_softcapping)"
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return "the model scales its logits (logit_scale)"
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        return "the model scales its logits (logits_scaling)"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output embedding is a {type(head).__name__}, not a plain Linear (e.g. adapted by LoRA)"
    if any(module is head for module in _backbone(model).modules()):
        # ModernBERT-decoder: get_decoder() is the output embedding itself, and a prediction head (dense, activation,
        # norm) runs between the decoder's last hidden state and it
        return "get_decoder() returns the output embedding, not the decoder whose last hidden state the LM head reads"
    return None


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """What turns the forward's inputs into the last hidden state: the decoder of a causal LM; for a VLM the
    multimodal model (vision tower, feature scatter and decoder), since its decoder alone ignores the pixels."""
    if getattr(model.config, "vision_config", None) is None:
        return model.get_decoder()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    return base.model


def _forward(model: torch.nn.Module, model_inputs: dict, no_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the backbone's last hidden state [T, H], the empty logits [1, 0, V]) from the forward of `model` as given
    (its wrapper included); `no_logits`, an empty index, keeps the LM head from building any logits."""
    captured = []
    hook = _backbone(unwrap(model)).register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        logits = model(**model_inputs, logits_to_keep=no_logits).logits
    finally:
        hook.remove()
    return captured[0][0], logits


def lm_loss_sum(model: torch.nn.Module, model_inputs: dict, target_ids_T: torch.Tensor,
                chunk_tokens: int | None = None, target_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Summed token loss of a causal LM on one pack: the plain way (the model's logits), or with
    `chunk_tokens`, the last hidden state through the chunked LM-head loss. `model` may be wrapped
    (DDP, FSDP2). Run it under the forward's autocast; both ways give the same loss and gradients.

    `target_rows` (Pack.target_rows), the positions with a target: the LM head runs on those rows only (a
    prompt's logits have no loss; with assistant-only targets that skips the head on every prompt token), through
    transformers' public `logits_to_keep` in the plain way, by selecting hidden states in the chunked one."""
    if target_rows is not None:
        target_ids_T = target_ids_T[target_rows]
    if chunk_tokens is None:
        rows = {} if target_rows is None else {"logits_to_keep": target_rows}
        # flatten, not [0]: a view, whose backward is free; select's backward writes a zero [1, T, V] first
        return token_loss_sum(model(**model_inputs, **rows).logits.flatten(0, 1), target_ids_T)
    hidden_TH, no_logits = _forward(model, model_inputs, target_ids_T.new_empty(0))
    if target_rows is not None:
        hidden_TH = hidden_TH[target_rows]
    fsdp = isinstance(model, FSDPModule)
    if fsdp:
        model.unshard()  # the root holds the LM head; reshard_after_forward=true sharded it after the forward
    head = unwrap(model).get_output_embeddings()
    loss = chunked_cross_entropy_sum(hidden_TH, head.weight, head.bias, target_ids_T, chunk_tokens)
    # + 0 exactly (an empty sum): the backward enters the forward's output first, as the plain loss's does
    loss = loss + no_logits.float().sum()
    if fsdp and not torch.is_grad_enabled():
        model.reshard()  # no backward follows to reshard the root (FSDP's post-backward does in training)
    return loss


def loss_chunking(memory: MemoryConfig, model: torch.nn.Module) -> tuple[int | None, str | None]:
    """(memory.loss_chunk_tokens or None, why chunking is off although asked for, or None)."""
    if not memory.chunked_loss:
        return None, None
    reason = chunked_loss_unsupported(model)
    return (None, reason) if reason else (memory.loss_chunk_tokens, None)
