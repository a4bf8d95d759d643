"""Activation checkpointing policies and offload: the same losses and gradients as `none`, and less
saved activation memory, measured with saved-tensor hooks."""

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinymodels import FAMILIES, tiny_model
from zeropad.config import MemoryConfig, build_config
from zeropad.errors import ConfigError
from zeropad.model.checkpointing import activation_context, apply_checkpointing, saved_activation_bytes
from zeropad.pack.collate import collate
from zeropad.train.step import StepSetup, accumulate_gradients
from zeropad.train.loss import lm_loss_sum
from zeropad.verify import random_documents

POLICIES = ["full", "every:2", "selective"]
DOC_LENGTHS = [37, 5, 60, 21]


def _model(family="qwen3", policy="none"):
    # 4 layers, so that every:2 recomputes some layers and not others
    model = tiny_model(family, num_hidden_layers=4)
    apply_checkpointing(model, policy)
    return model.train()


def _pack(model):
    return collate(random_documents(model.config.vocab_size, DOC_LENGTHS, seed=3))


def _loss_and_grads(model, activations=contextlib.nullcontext()):
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(StepSetup(model, activations=activations), [_pack(model)])
    # the wrapper's name prefix is not part of the parameter's identity
    return loss, {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}


def _assert_same(result, reference, tol=1e-6):
    loss, grads = result
    ref_loss, ref_grads = reference
    assert abs(loss - ref_loss) <= tol
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= tol, name


def _saved_bytes(model, activations=contextlib.nullcontext()):
    pack = _pack(model)

    def forward():
        with activations:
            return lm_loss_sum(model, pack.model_inputs(), pack.target_ids[0])

    return saved_activation_bytes(forward, params=model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_gives_the_same_loss_and_gradients(family, policy):
    _assert_same(_loss_and_grads(_model(family, policy)), _loss_and_grads(_model(family)))


# Families with windowed layers (8 tokens, shorter than the documents), alternating with full ones.
WINDOWED_FAMILIES = {
    "gemma2": {},
    "gemma3_text": {},
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"] * 2),
}


def _windowed_model(family, policy):
    # use_cache on, as transformers' configs default it: each forward then fills a KV cache
    model = tiny_model(family, num_hidden_layers=4, use_cache=True, **WINDOWED_FAMILIES[family])
    with torch.no_grad():
        for layer in model.model.layers:
            # logits ~50 instead of ~0.1, so Gemma2's softcap (tanh at 50) bends them
            layer.self_attn.q_proj.weight.mul_(400.0)
    apply_checkpointing(model, policy)
    return model.train()


@pytest.mark.parametrize("family", list(WINDOWED_FAMILIES))
def test_recomputed_windowed_layers_give_the_same_gradients(family):
    """A layer recomputed against the KV cache its first pass filled attended over the window's last
    tokens followed by the pack (keys shifted): same loss, gradients off by up to ~0.1. The policies
    turn the cache off."""
    loss, grads = _loss_and_grads(_windowed_model(family, "full"))
    ref_loss, ref_grads = _loss_and_grads(_windowed_model(family, "none"))
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5 * ref_grads[name].abs().max().item(), name


def test_recompute_policies_turn_the_kv_cache_off():
    for policy, use_cache in [("none", True), ("full", False), ("every:2", False), ("selective", False)]:
        model = tiny_model("qwen3", num_hidden_layers=4, use_cache=True)
        apply_checkpointing(model, policy)
        assert model.config.use_cache is use_cache, policy


def test_policies_wrap_the_expected_modules():
    def wrapped(policy):
        return [n.removesuffix("._checkpoint_wrapped_module") for n, _ in _model(policy=policy).named_modules()
                if n.endswith("._checkpoint_wrapped_module")]

    assert wrapped("none") == []
    assert wrapped("full") == [f"model.layers.{i}" for i in range(4)]
    assert wrapped("every:2") == ["model.layers.0", "model.layers.2"]
    assert wrapped("selective") == [f"model.layers.{i}.mlp" for i in range(4)]


def test_saved_activation_bytes_fall_with_recompute():
    saved = {policy: _saved_bytes(_model(policy=policy)) for policy in ["none", *POLICIES]}
    assert saved["none"] > saved["every:2"] > saved["full"] > 0, saved
    assert saved["none"] > saved["selective"] > saved["full"], saved


def test_saved_activation_bytes_counts_storages_once_and_skips_params():
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    # x is saved by both matmuls and w by the first's backward: x counts once, w (a param) not at all
    assert saved_activation_bytes(lambda: ((x @ w) + (x @ x.T).sum()).sum(), params=[w]) == x.nbytes


def test_offload_routes_every_saved_tensor_through_save_on_cpu():
    """On CPU, offload cannot lower memory (host and device are one); what this checks is the
    mechanism: under the offload context no tensor saved for backward reaches the outer hooks
    (save_on_cpu packed them all into host copies), and the results are unchanged."""
    context = activation_context(MemoryConfig(offload_activations=True), torch.device("cpu"))
    assert isinstance(context, torch.autograd.graph.save_on_cpu)
    for policy in ["none", "full"]:
        model = _model(policy=policy)
        assert _saved_bytes(model) > 0
        assert _saved_bytes(model, context) == 0
        _assert_same(_loss_and_grads(model, context), _loss_and_grads(model))


def test_checkpointed_model_saves_plain_weights(tmp_path):
    model = _model(policy="full").eval()
    pack = _pack(model)
    model.save_pretrained(tmp_path)
    assert not any("_checkpoint_wrapped_module" in key for key in model.state_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="zeropad_varlen")
    with torch.no_grad():
        assert torch.equal(model(**pack.model_inputs()).logits, loaded(**pack.model_inputs()).logits)


def test_checkpointing_config_is_validated():
    assert build_config({}).memory.checkpointing == "none"
    assert build_config({}, ["memory.checkpointing=every:3"]).memory.checkpointing == "every:3"
    for bad in ["every:0", "every", "sometimes"]:
        with pytest.raises(ConfigError, match="memory.checkpointing"):
            build_config({}, [f"memory.checkpointing={bad}"])


def test_model_without_decoder_layers_is_a_clear_error():
    with pytest.raises(ConfigError, match="DecoderLayer"):
        apply_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), "full")
