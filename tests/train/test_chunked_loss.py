"""The chunked LM-head cross-entropy equals the plain one (logits, then cross-entropy), with masked
labels, under bf16 autocast, and inside a training step; it never saves the [T, V] logits."""


import pytest
import torch
import torch.nn.functional as F

from tinymodels import FAMILIES, tiny_model
from zeropad.model.checkpointing import saved_activation_bytes
from zeropad.pack.collate import IGNORE_INDEX, collate
from zeropad.parallel.sharding import unwrap
from zeropad.train.step import StepSetup, accumulate_gradients
from zeropad.train.loss import chunked_cross_entropy_sum, chunked_loss_unsupported, lm_loss_sum, token_loss_sum
from zeropad.verify import random_documents

T, H, V = 300, 32, 1000


def _inputs(bias: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    targets[torch.rand(T, generator=g) < 0.3] = IGNORE_INDEX  # prompt tokens and document ends
    return hidden, weight, b, targets


def _loss_and_grads(loss_fn, hidden, weight, bias, targets):
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    for t in tensors:
        t.grad = None
    num_targets = (targets != IGNORE_INDEX).sum()
    loss = loss_fn(hidden, weight, bias, targets) / num_targets  # the token mean, as the loop computes
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]


def _plain(hidden, weight, bias, targets):
    return token_loss_sum(F.linear(hidden, weight, bias), targets)


def _chunked(chunk_tokens):
    return lambda hidden, weight, bias, targets: chunked_cross_entropy_sum(hidden, weight, bias, targets, chunk_tokens)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 128, T, 4096])
def test_chunked_equals_plain_fp32(chunk_tokens, bias):
    inputs = _inputs(bias)
    loss, grads = _loss_and_grads(_chunked(chunk_tokens), *inputs)
    ref_loss, ref_grads = _loss_and_grads(_plain, *inputs)
    assert (loss - ref_loss).abs().item() <= 1e-5
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).abs().max().item() <= 1e-5


def test_chunked_equals_plain_under_bf16_autocast():
    """Both paths do the LM-head matmuls in bf16 and the softmax in fp32. They differ in bf16
    rounding only: the plain path rounds the whole weight gradient (a sum over all T tokens) to
    bf16 once, the chunked path rounds each chunk's part and sums those in fp32. bf16 keeps 8
    significant bits (relative step 2^-8 = 0.4%), so the tolerance is 1% of each tensor's largest
    value; the loss itself (fp32 from bf16 logits) agrees to 1e-5."""
    inputs = _inputs(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(_chunked(64), *inputs)
        ref_loss, ref_grads = _loss_and_grads(_plain, *inputs)
    assert (loss - ref_loss).abs().item() <= 1e-5
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == ref.dtype == torch.float32
        assert (grad - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


def test_all_targets_masked_gives_zero_loss_and_gradients():
    hidden, weight, bias, targets = _inputs(bias=True)
    loss = chunked_cross_entropy_sum(hidden, weight, bias, torch.full_like(targets, IGNORE_INDEX), 64)
    loss.backward()
    assert loss.item() == 0 and not hidden.grad.any() and not weight.grad.any() and not bias.grad.any()


def test_chunked_loss_saves_no_logits():
    hidden, weight, _, targets = _inputs(bias=False)
    plain = saved_activation_bytes(lambda: _plain(hidden, weight, None, targets), params=[weight])
    chunked = saved_activation_bytes(lambda: _chunked(64)(hidden, weight, None, targets), params=[weight])
    assert plain >= T * V * 4  # the fp32 log-softmax of the logits
    # the gradients computed in the forward: the hidden state's and the head's (fp32), no [T, V] tensor
    assert chunked <= hidden.nbytes + weight.numel() * 4


def _step(model, chunk_tokens):
    """(loss, gradients by parameter name) of one step; `model` may be wrapped (DDP)."""
    model.zero_grad(set_to_none=True)
    packs = [collate(random_documents(unwrap(model).config.vocab_size, lengths, seed=i))
             for i, lengths in enumerate([[37, 5, 60], [21, 44]])]
    loss, _ = accumulate_gradients(StepSetup(model, loss_chunk_tokens=chunk_tokens), packs)
    return loss, {n: p.grad.clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_args", [(f, {}) for f in FAMILIES] + [("qwen3", {"tie_word_embeddings": True})],
                         ids=[*FAMILIES, "qwen3-tied"])
def test_training_step_is_unchanged(model_args):
    family, overrides = model_args
    model = tiny_model(family, **overrides).train()
    assert chunked_loss_unsupported(model) is None
    loss, grads = _step(model, 16)
    ref_loss, ref_grads = _step(model, None)
    assert abs(loss - ref_loss) <= 1e-6
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5, name


def test_through_a_ddp_wrapped_lora_model():
    """The chunked loss runs the wrapper's forward (DDP's hooks fire), here around a peft model whose head is
    not adapted: the loss and adapter gradients of the plain loss on the bare model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from zeropad.config import LoraConfig
    from zeropad.model.lora import apply_lora

    model = apply_lora(tiny_model("qwen3"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).train()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at zero; non-zero, so the adapters matter
    assert chunked_loss_unsupported(model) is None
    ref_loss, ref_grads = _step(model, None)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loss, grads = _step(DistributedDataParallel(model), 16)
    finally:
        dist.destroy_process_group()
    assert abs(loss - ref_loss) <= 1e-6
    assert grads.keys() == ref_grads.keys() and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5, name


def test_logit_softcapping_falls_back_with_a_reason():
    model = tiny_model("qwen3")
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in chunked_loss_unsupported(model)


def test_a_head_between_the_decoder_and_the_output_embedding_falls_back_with_a_reason():
    """ModernBERT-decoder's logits are decoder(lm_head(h)), and its get_decoder() is that output Linear: the chunked
    loss (the LM head on the decoder's last hidden state) would skip the prediction head; it used to crash."""
    model = tiny_model("modernbert-decoder", cls_token_id=1, sep_token_id=2)
    assert "get_decoder() returns the output embedding" in chunked_loss_unsupported(model)


@pytest.mark.parametrize("chunk_tokens", [None, 16], ids=["plain", "chunked"])
def test_lm_head_runs_on_target_rows_only(chunk_tokens):
    """The pack's target rows: the LM head sees only positions with a target, and loss and gradients equal the
    head run on every position (prompt positions masked out)."""
    model = tiny_model("qwen3")
    pack = collate(random_documents(model.config.vocab_size, [30, 12, 45], seed=3))
    assert 0 < len(pack.target_rows) == pack.num_targets < pack.num_tokens  # a document's last token has none
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: head_rows.append(args[0].shape[-2]))
    results = []
    for rows in (pack.target_rows, None):
        model.zero_grad(set_to_none=True)
        loss = lm_loss_sum(model, pack.model_inputs(), pack.target_ids[0], chunk_tokens, rows)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    if chunk_tokens is None:  # the chunked loss calls the head's weight directly, not the module
        assert head_rows == [pack.num_targets, pack.num_tokens]
    (loss_rows, grads_rows), (loss_all, grads_all) = results
    torch.testing.assert_close(loss_rows, loss_all, rtol=1e-6, atol=0)
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_rows[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
