"""Every attention argument that changes the result is implemented or refused by name, and the
verify harness would catch each one being dropped."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

from tinymodels import tiny_config, tiny_model
from zeropad.errors import ConfigError
from zeropad.model.attention import _no_mask, varlen_attention_forward
from zeropad.model.support import check_packable
from zeropad.pack.collate import varlen_kwargs, varlen_metadata
from zeropad.verify import check_exactness

LENGTHS = [7, 23, 1, 40, 12, 2]


def _variant(name: str, **change) -> str:
    """A registered copy of zeropad_varlen that drops or alters one argument: the bug under test."""
    def forward(module, query, key, value, attention_mask, **kwargs):
        kwargs.update({k: fn(kwargs.get(k)) for k, fn in change.items()})
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, _no_mask)
    return name


@pytest.mark.parametrize("model_type, bug, change", [
    ("gemma2", "softcap ignored", dict(softcap=lambda cap: None)),
    ("gpt_oss", "sinks ignored", dict(s_aux=lambda sinks: None)),
    ("gemma3_text", "window one token too wide", dict(sliding_window=lambda w: None if w is None else w + 1)),
    ("llama", "scale 1% off", dict(scaling=lambda s: s * 1.01)),
])
def test_verify_catches_a_dropped_feature(model_type, bug, change):
    broken = _variant(f"broken_{model_type}", **change)
    report = check_exactness(tiny_model(model_type), LENGTHS, seed=1, packed_attn=broken)
    assert not report.passed, f"{bug} went unnoticed: {report.summary()}"
    assert report.max_rel > 1e2 * report.tolerance, report.summary()


def test_softcap_ignored_is_invisible_at_random_init_logits():
    """Why verify drives the logits: at random-init magnitudes the cap (50) is never reached, so the
    same bug passes; driven to 3x the cap it fails (previous test)."""
    broken = _variant("broken_nocap", softcap=lambda cap: None)
    report = check_exactness(tiny_model("gemma2"), LENGTHS, seed=1, packed_attn=broken, logit_target=1.0)
    assert report.max_rel < 1e-3, report.summary()


def test_sinks_get_their_gradient():
    model = tiny_model("gpt_oss").train()
    cu, max_len = varlen_metadata([6, 10])
    ids = torch.randint(3, 101, (1, 16))
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    model(input_ids=ids, position_ids=positions, **varlen_kwargs(cu, max_len)).logits.sum().backward()
    for layer in model.model.layers:
        assert layer.self_attn.sinks.grad is not None and layer.self_attn.sinks.grad.abs().max() > 0


def _attn_module():
    return tiny_model("llama").model.layers[0].self_attn


def _qkv(T=6, H=4, D=16):
    torch.manual_seed(0)
    return (torch.randn(1, H, T, D, dtype=torch.float64) for _ in range(3))


def test_unknown_keyword_is_refused_naming_it_and_the_family():
    q, k, v = _qkv()
    with pytest.raises(ConfigError, match=r"llama \(LlamaAttention\).*'position_bias'"):
        varlen_attention_forward(_attn_module(), q, k, v, None, position_bias=torch.zeros(1))


def test_harmless_keywords_pass():
    q, k, v = _qkv()
    out, _ = varlen_attention_forward(_attn_module(), q, k, v, None, scaling=0.25, position_ids=None,
                                      use_cache=False, output_attentions=False)
    assert out.shape == (1, 6, 4, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(is_causal=False), "bidirectional"),
    (dict(attention_mask=torch.zeros(1, 1, 6, 6)), "attention mask"),
])
def test_semantics_the_attention_cannot_keep_are_refused(kwargs, message):
    q, k, v = _qkv()
    mask = kwargs.pop("attention_mask", None)
    with pytest.raises(ConfigError, match=message):
        varlen_attention_forward(_attn_module(), q, k, v, mask, **kwargs)


def test_keys_from_a_kv_cache_are_refused():
    q, _, _ = _qkv(T=6)
    _, k, v = _qkv(T=13)  # 7 cached tokens before the 6 new ones
    with pytest.raises(ConfigError, match=r"llama \(LlamaAttention\): 13 keys for 6 queries: a KV cache"):
        varlen_attention_forward(_attn_module(), q, k, v, None)


def test_dropout_applies_in_training_only():
    module = _attn_module()
    q, k, v = _qkv(T=12)
    cu = dict(cu_seq_lens_q=torch.tensor([0, 5, 12], dtype=torch.int32))
    module.eval()
    a, _ = varlen_attention_forward(module, q, k, v, None, dropout=0.5, **cu)
    b, _ = varlen_attention_forward(module, q, k, v, None, dropout=0.0, **cu)
    assert torch.equal(a, b)
    module.train()
    torch.manual_seed(1)
    c, _ = varlen_attention_forward(module, q, k, v, None, dropout=0.5, **cu)
    assert (c - b).abs().max() > 1e-3


@pytest.mark.parametrize("model_type, overrides, reason", [
    ("qwen3_next", {}, "linear-attention"),
    ("mamba", {}, "state-space"),
    ("lfm2", {}, "convolution"),
    ("qwen2", dict(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"]), "linear_attention"),
    ("llama4_text", dict(attention_chunk_size=8), "chunked"),
])
def test_stateful_and_mask_only_families_are_refused_at_start_up(model_type, overrides, reason):
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match=reason):
        check_packable(AutoConfig.for_model(model_type, **overrides))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text", "gpt_oss", "deepseek_v3"])
def test_supported_families_are_packable(model_type):
    assert check_packable(tiny_config(model_type)) is None


@pytest.mark.parametrize("window", [None, 4])
def test_runs_of_equal_length_documents_batch_exactly(window):
    """Runs of equal-length documents go to SDPA as one batch; forward and gradients equal the scores written out
    per document (another code path), windows included."""
    from zeropad.model.attention import _explicit_per_doc, _Features, _sdpa_per_doc

    feats = _Features(scaling=0.25, sliding_window=window, softcap=None, sinks=None, dropout=0.0)
    bounds = [0, 5, 10, 15, 24, 27, 30]  # runs: 3 x 5, 1 x 9, 2 x 3
    torch.manual_seed(0)
    q = torch.randn(1, 30, 4, 16).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, 30, 2, 16).transpose(1, 2).requires_grad_() for _ in range(2))
    grad_out = torch.randn(1, 4, 30, 16)
    results = []
    for per_doc in (_sdpa_per_doc, _explicit_per_doc):
        out = per_doc(q, k, v, bounds, feats)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for got, want in zip(*results):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _per_document_sdpa(q, k, v, bounds):
    outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=2).transpose(1, 2)


def test_a_strided_head_dim_is_attended_exactly():
    """The CPU kernel reads head_dim rows as contiguous memory: views whose head dim is strided (x[..., ::2]) give the
    per-document SDPA result, forward and gradients, as contiguous ones do (before: wrong by ~1, silently)."""
    torch.manual_seed(0)
    bounds = [0, 5, 12]
    cu = torch.tensor(bounds, dtype=torch.int32)
    wide = [torch.randn(1, h, 12, 32, dtype=torch.float64) for h in (4, 2, 2)]
    q, k, v = (x[..., ::2].requires_grad_() for x in (w.requires_grad_() for w in wide))
    assert q.stride(-1) == 2
    grad_out = torch.randn(1, 12, 4, 16, dtype=torch.float64)
    got, _ = varlen_attention_forward(_attn_module(), q, k, v, None, cu_seq_lens_q=cu)
    got_grads = torch.autograd.grad(got, wide, grad_out)
    want = _per_document_sdpa(q, k, v, bounds)
    want_grads = torch.autograd.grad(want, wide, grad_out)
    assert (got - want).abs().max() <= 1e-12
    for a, b in zip(got_grads, want_grads):
        assert (a - b).abs().max() <= 1e-12


def test_an_empty_document_is_skipped():
    """A repeated boundary (a document of no token) changes nothing; the CPU kernel would divide by its length."""
    q, k, v = (x.requires_grad_() for x in _qkv(T=9))
    for bounds in ([0, 4, 4, 9], [0, 0, 4, 9], [0, 4, 9, 9]):
        got, _ = varlen_attention_forward(_attn_module(), q, k, v, None,
                                          cu_seq_lens_q=torch.tensor(bounds, dtype=torch.int32))
        assert (got - _per_document_sdpa(q, k, v, bounds)).abs().max() <= 1e-12, bounds
