"""RouterStats: the aux loss equals transformers' on a forward, routing of a pack is the sum of its
documents' routing, expert load on a known routing, gradients reach the router, dense -> None."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from tinymodels import TINY, tiny_model
from zeropad.model.checkpointing import apply_checkpointing
from zeropad.pack.collate import collate
from zeropad.train.moe import RouterStats
from zeropad.verify import random_documents

COEF = 0.25  # not the default 0.001, so that the aux part of HF's loss stands well above rounding


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_qwen3_vl_moe():
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                decoder_sparse_step=1, router_aux_loss_coef=COEF,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                     mrope_interleaved=True))
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0], out_hidden_size=64)
    torch.manual_seed(0)
    return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision)).float()


def tiny_deepseek_v3():
    """8 experts in 2 groups, top-2 from the best group; layer 0 dense, layers 1-2 routed."""
    config = AutoConfig.for_model(
        "deepseek_v3", **{**TINY, "num_hidden_layers": 3, "head_dim": 8}, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def tiny_qwen3_moe(attn_implementation="sdpa"):
    return tiny_model("qwen3_moe", attn_implementation, router_aux_loss_coef=COEF).train()


def tokens(vocab_size: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_aux_loss_equals_transformers_on_an_unpacked_forward():
    model = tiny_qwen3_moe()
    stats = RouterStats.attach(model, coef=None)  # coef from the config
    ids = tokens(model.config.vocab_size, 37)
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    aux = stats.pack_aux_loss()
    assert out.aux_loss.item() > 0
    # HF's `aux_loss` excludes the coef; its `loss` adds coef * aux_loss to the token loss
    torch.testing.assert_close(aux, COEF * out.aux_loss, rtol=1e-6, atol=0)
    token_loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(aux, out.loss - token_loss, rtol=1e-4, atol=0)
    stats.pack_aux_loss()  # the forward just above
    assert stats.pack_aux_loss().item() == 0  # cleared: nothing ran since

    stats.detach()
    override = RouterStats.attach(model, coef=2.0)
    model(input_ids=ids)
    torch.testing.assert_close(override.pack_aux_loss(), 2.0 * out.aux_loss, rtol=1e-6, atol=0)


def test_pack_aux_loss_is_transformers_over_the_packs_rows():
    """A packed forward routes each token as its document's own forward does: the pack's aux loss is
    HF's function over the documents' router logits stacked, and the expert counts are sums."""
    lengths = [13, 29, 6]
    model = tiny_qwen3_moe("zeropad_varlen")
    stats = RouterStats.attach(model, coef=None)
    docs = random_documents(model.config.vocab_size, lengths, seed=1)
    per_doc_logits = [model(**collate([d]).model_inputs(), output_router_logits=True).router_logits for d in docs]
    stats.pack_aux_loss()
    per_doc_load = stats.expert_load()

    model(**collate(docs).model_inputs())
    packed_aux = stats.pack_aux_loss()
    stacked = tuple(torch.cat(layer) for layer in zip(*per_doc_logits))
    expected = COEF * load_balancing_loss_func(stacked, model.config.num_experts, model.config.num_experts_per_tok)
    torch.testing.assert_close(packed_aux, expected, rtol=1e-5, atol=0)
    assert stats.expert_load() == per_doc_load  # exact: counts of the pack == sum of the documents' counts


def _expected_load(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[float]:
    ratios = []
    for logits_TE in router_logits:
        counts = torch.bincount(F.softmax(logits_TE, dim=-1).topk(top_k).indices.flatten(),
                                minlength=logits_TE.shape[-1]).double()
        ratios.append((counts.max() / counts.mean()).item())
    return ratios


@pytest.mark.parametrize("build", [tiny_qwen3_moe, tiny_qwen3_vl_moe], ids=["qwen3_moe", "qwen3_vl_moe"])
def test_expert_load_matches_transformers_router_logits(build):
    model = build().train()
    stats = RouterStats.attach(model, coef=None)
    ids = tokens(model.config.get_text_config().vocab_size, 50, seed=2)
    out = model(input_ids=ids, output_router_logits=True)
    load = stats.expert_load()
    expected = _expected_load(out.router_logits, model.config.get_text_config().num_experts_per_tok)
    assert [load[f"expert_load_max/layer_{i}"] for i in range(2)] == pytest.approx(expected, rel=1e-12)
    assert load["expert_load_max"] == max(expected)
    assert 0 <= load["expert_load_min"] <= 1 < load["expert_load_max"]
    assert stats.expert_load() == {}  # reset


def test_expert_load_on_a_known_routing_deepseek_v3():
    """Zero router weights make every score sigmoid(0); the correction bias alone then picks the
    group and the experts: layer 1 -> experts {1, 3} (group 0), layer 2 -> {5, 6} (group 1)."""
    model = tiny_deepseek_v3().train()
    with pytest.warns(UserWarning, match="coef=0.1 is ignored"):
        stats = RouterStats.attach(model, coef=0.1)
    with torch.no_grad():
        for layer, experts in [(1, [1, 3]), (2, [5, 6])]:
            gate = model.model.layers[layer].mlp.gate
            gate.weight.zero_()
            gate.e_score_correction_bias[experts] = 0.3
    for n in (11, 20):  # counts add up over forwards
        model(input_ids=tokens(model.config.vocab_size, n, seed=n))
        assert stats.pack_aux_loss().item() == 0  # aux-loss-free family
    # every token on 2 of 8 experts: the busiest gets all 31 tokens, the mean is 31 * 2 / 8
    assert stats.expert_load() == {"expert_load_max/layer_1": 4.0, "expert_load_max/layer_2": 4.0,
                                   "expert_load_max": 4.0, "expert_load_min": 0.0}


def test_dense_model_has_no_router_stats():
    assert RouterStats.attach(tiny_model("qwen3"), coef=None) is None


def test_aux_loss_alone_gives_the_routers_a_gradient():
    model = tiny_qwen3_moe()
    stats = RouterStats.attach(model, coef=None)
    model(input_ids=tokens(model.config.vocab_size, 40, seed=3))
    stats.pack_aux_loss().backward()
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad.abs().max() > 0
    assert model.lm_head.weight.grad is None  # the aux loss does not reach past the last router


def _loss_and_load(model, stats, inputs) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Router gradients of (token-ish loss + aux loss), as the loop adds them, and the expert load."""
    (model(**inputs).logits.float().square().mean() + stats.pack_aux_loss()).backward()
    assert stats.pack_aux_loss().item() == 0  # backward's recomputation, if any, recorded nothing
    return [layer.mlp.gate.weight.grad for layer in model.model.layers], stats.expert_load()


def test_checkpoint_recompute_and_evaluation_are_not_counted():
    inputs = collate(random_documents(TINY["vocab_size"], [17, 9], seed=4)).model_inputs()
    plain = tiny_qwen3_moe("zeropad_varlen")
    grads, load = _loss_and_load(plain, RouterStats.attach(plain, coef=None), inputs)

    model = tiny_qwen3_moe("zeropad_varlen")
    apply_checkpointing(model, "full")  # backward re-runs every decoder layer, routers included
    stats = RouterStats.attach(model, coef=None)
    checkpointed_grads, checkpointed_load = _loss_and_load(model, stats, inputs)
    assert checkpointed_load == load  # each token counted once
    for expected, got in zip(grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)

    model.eval()
    with torch.no_grad():
        model(**inputs)
    assert stats.expert_load() == {}


def test_attach_through_a_lora_model():
    from zeropad.config import LoraConfig
    from zeropad.model.lora import apply_lora

    model = apply_lora(tiny_qwen3_moe(), LoraConfig())
    stats = RouterStats.attach(model, coef=None)
    model(input_ids=tokens(TINY["vocab_size"], 20, seed=5))
    assert stats.pack_aux_loss().requires_grad  # through the adapters: the router weights are frozen
    assert set(stats.expert_load()) == {"expert_load_max/layer_0", "expert_load_max/layer_1",
                                        "expert_load_max", "expert_load_min"}


def test_training_run_adds_and_logs_the_aux_loss_and_expert_load(tiny_run):
    from tinymodels import FAMILIES
    from tinyrun import step_records
    from zeropad.config import build_config
    from zeropad.train.loop import train

    moe = {"model_type": "qwen3_moe", **TINY, **FAMILIES["qwen3_moe"], "vocab_size": 259}
    runs = {}
    for coef in (0.0, 0.5):
        cfg = tiny_run(f"coef{coef}", model={"config": moe}, train={"steps": 3, "router_aux_loss_coef": coef})
        train(build_config(cfg))
        runs[coef] = step_records(cfg["output_dir"])
    assert all(r["aux_loss"] == 0.0 for r in runs[0.0])
    assert all(r["aux_loss"] > 0.1 for r in runs[0.5])  # uniform routing would give 0.5 x K = 1
    # same first forward, so the same token loss; the aux gradient then changes the weights
    assert runs[0.5][0]["loss"] == runs[0.0][0]["loss"]
    assert runs[0.5][-1]["loss"] != runs[0.0][-1]["loss"]
    for record in runs[0.5]:
        assert record["expert_load_max"] >= 1.0 and 0.0 <= record["expert_load_min"] <= 1.0
        assert {"expert_load_max/layer_0", "expert_load_max/layer_1"} <= record.keys()
