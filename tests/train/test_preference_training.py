"""Preference objectives on the packed path: the packed pair losses and gradients equal a per-pair unpadded
reference with TRL's formulas written out here independently; DPO starts at ln 2; the reference cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import yaml
from typer.testing import CliRunner

from tinymodels import tiny_model
from zeropad.cli import app
from zeropad.pack.loader import PackLoader, step_packs
from zeropad.config import build_config
from zeropad.data.chat import Sample
from zeropad.data.preference import Pair
from zeropad.train.loop import train
from zeropad.train.step import StepSetup, accumulate_gradients
from zeropad.train.preference import PreferenceObjective, attach_reference, collate_pairs, compute_reference, \
    reference_cache_file
from tinyrun import read_metrics, step_records

BETA, SMOOTHING, GAMMA = 0.7, 0.1, 0.3


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model gains nothing from more threads, and on a shared machine they contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pairs(seed: int, n: int = 5) -> list[Pair]:
    rng = np.random.default_rng(seed)

    def side(prompt):
        answer = rng.integers(3, 101, rng.integers(2, 9))
        ids = np.concatenate([prompt, answer]).astype(np.int32)
        return Sample(ids, np.arange(len(ids)) >= len(prompt))

    pairs = []
    for _ in range(n):
        prompt = rng.integers(3, 101, rng.integers(3, 12))
        pairs.append(Pair(side(prompt), side(prompt)))
    return pairs


def _sequence_logp(model, sample: Sample) -> tuple[torch.Tensor, int]:
    """One unpadded sequence through the model alone: the sum of its targets' log-probs, and their count."""
    ids = torch.as_tensor(np.asarray(sample.input_ids), dtype=torch.long)[None]
    logp_TV = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    picked = logp_TV.gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.as_tensor(sample.loss_mask[1:])
    return picked[mask].sum(), int(mask.sum())


def _trl_losses(kind: str, pc, pr, nc, nr, rc, rr) -> torch.Tensor:
    """TRL's definitions (DPOTrainer sigmoid loss with label smoothing; CPOTrainer simpo; ORPOTrainer), per pair."""
    if kind == "dpo":
        logits = (pc - pr) - (rc - rr)  # pi_logratios - ref_logratios
        return (-torch.log(torch.sigmoid(BETA * logits)) * (1 - SMOOTHING)
                - torch.log(torch.sigmoid(-BETA * logits)) * SMOOTHING)
    a, b = pc / nc, pr / nr  # average log-probs
    if kind == "simpo":
        logits = (a - b) - GAMMA / BETA
        return -torch.log(torch.sigmoid(BETA * logits)) * (1 - SMOOTHING) - torch.log(torch.sigmoid(-BETA * logits)) \
            * SMOOTHING
    log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
    return -a - BETA * torch.log(torch.sigmoid(log_odds))


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", ["dpo", "simpo", "orpo"])
def test_packed_loss_and_gradients_equal_the_per_pair_reference(kind):
    packed = tiny_model("qwen3", seed=0)
    single = tiny_model("qwen3", attn_implementation="eager", seed=0)
    single.load_state_dict(packed.state_dict())
    reference_model = tiny_model("qwen3", attn_implementation="eager", seed=1)  # the frozen start, not the policy
    pairs = _pairs(seed=2)
    with torch.no_grad():
        for pair in pairs:
            pair.ref_logps = tuple(_sequence_logp(reference_model, doc)[0].item() for doc in pair.docs)

    # Per pair, unpadded, TRL's formula; mean over pairs.
    terms = []
    for pair in pairs:
        (pc, nc), (pr, nr) = (_sequence_logp(single, doc) for doc in pair.docs)
        rc, rr = (torch.tensor(v) for v in pair.ref_logps)
        terms.append(_trl_losses(kind, pc, pr, nc, nr, rc, rr))
    expected = torch.stack(terms).mean()
    expected.backward()
    expected_grads = _grads(single)

    # Packed: two micro-steps of unequal pair counts (2 + 3), normalised by the step's 5 pairs.
    objective = PreferenceObjective(kind, BETA, label_smoothing=SMOOTHING, simpo_gamma=GAMMA)
    packs = [collate_pairs(pairs[:2]), collate_pairs(pairs[2:])]
    assert [p.num_pairs for p in packs] == [2, 3] and packs[1].doc_lengths[0] == len(pairs[2].chosen)
    loss, _ = accumulate_gradients(StepSetup(packed, objective=objective), packs)
    assert abs(loss - expected.item()) <= 1e-5
    grads = _grads(packed)
    assert max((grads[n] - g).abs().max().item() for n, g in expected_grads.items()) <= 1e-5
    # Negative control: a mean per pack instead of over the step's pairs gives another gradient.
    for pack in packs:
        (objective.loss_sum(packed, pack, torch.autocast("cpu", enabled=False)) / pack.num_pairs / 2).backward()
    wrong = _grads(packed)
    assert max((wrong[n] - g).abs().max().item() for n, g in expected_grads.items()) > 1e-4
    metrics = objective.metrics(torch.device("cpu"))
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}
    assert metrics["rewards/margin"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])


def test_dpo_formula_on_known_numbers_and_ln2_when_the_policy_is_the_reference():
    objective = PreferenceObjective("dpo", beta=0.5)
    # z = 0.5 * ((-1 - -2) - (-3 - -2)) = 1: loss log(1 + e^-1)
    loss, chosen, rejected = objective.pair_losses(torch.tensor([-1.0, -3.0]), torch.ones(2), torch.tensor([-2.0, -2.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-7)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)

    model = tiny_model("qwen3", seed=0)
    pairs = _pairs(seed=3, n=6)
    for pair, logps in zip(pairs, compute_reference(model, pairs, max_tokens=64, seed=0, device=torch.device("cpu"),
                                                    autocast=torch.autocast("cpu", enabled=False))):
        pair.ref_logps = tuple(logps.tolist())
    pack = collate_pairs(pairs)
    loss = objective.loss_sum(model, pack, torch.autocast("cpu", enabled=False)) / pack.num_pairs
    assert abs(loss.item() - math.log(2)) <= 1e-6


def test_reference_cache_is_read_back_and_keyed_by_model_and_pairs(tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = build_config({"model": {"config": {"model_type": "qwen3"}}, "data": {"cache_dir": str(tmp_path)},
                        "pack": {"max_tokens": 64}})
    base = tiny_model("qwen3", seed=0)
    pairs = _pairs(seed=4)
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    expected = compute_reference(base, pairs, 64, 0, cpu, off)
    # LoRA: the reference is the base model, the adapters disabled, however far the adapters have moved.
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    np.testing.assert_array_equal(compute_reference(model, pairs, 64, 0, cpu, off), expected)
    with torch.no_grad():  # ... which moved the policy away from it
        inputs = collate_pairs(pairs[:1]).model_inputs()
        adapted = model(**inputs).logits
        with model.disable_adapter():
            assert (adapted - model(**inputs).logits).abs().max().item() > 1e-3

    path = attach_reference(cfg, model, pairs, cpu, off)
    assert path.is_file() and path == reference_cache_file(cfg, pairs)
    np.testing.assert_array_equal(np.asarray([p.ref_logps for p in pairs], dtype=np.float32), expected)
    with torch.no_grad():  # a changed model: the cached values (the starting model's) are read back, not recomputed
        for p in model.parameters():
            p.add_(0.1)
    for pair in pairs:
        pair.ref_logps = None
    attach_reference(cfg, model, pairs, cpu, off)
    np.testing.assert_array_equal(np.asarray([p.ref_logps for p in pairs], dtype=np.float32), expected)
    other = build_config({**cfg.model_dump(), "train": {"seed": 1}})
    assert reference_cache_file(other, pairs) != path
    assert reference_cache_file(cfg, pairs[:-1]) != path


def test_train_dpo_on_llama_factory_pairs(tiny_run, tmp_path, capsys):
    data = tmp_path / "dpo_en_demo.json"
    data.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": f"Name {i}"}], "chosen": {"from": "gpt", "value": f"{i}"},
         "rejected": {"from": "gpt", "value": f"not {i + 7}"}} for i in range(24)]))
    cfg = tiny_run(data={"sources": [{"path": str(data)}]}, pack={"max_tokens": 160},
                   train={"objective": "dpo", "steps": 4, "grad_accum": 2, "beta": 0.2}, eval={"split": 0.2})
    cfg["model"]["config"]["attention_dropout"] = 0.1  # turned off, as TRL does: else step 1 was not ln 2
    train(build_config(cfg))
    assert "dropout off in 2 module(s) for train.objective=dpo" in capsys.readouterr().out  # the 2 layers
    records = step_records(tmp_path / "out")
    assert abs(records[0]["loss"] - math.log(2)) <= 1e-6  # step 1: the policy is the reference
    assert records[0]["rewards/accuracy"] == 0.0 and records[0]["rewards/margin"] == 0.0
    assert all(r["pad_fraction"] == 0.0 and r["pairs"] >= 2 for r in records)
    assert records[-1]["rewards/margin"] > 0 and records[-1]["loss"] < math.log(2)
    final = read_metrics(tmp_path / "out")[-1]
    assert {"eval_loss", "eval_rewards/accuracy", "eval_rewards/margin"} <= set(final)
    assert len(list((tmp_path / "cache" / "reference").glob("*.npy"))) == 2  # train and eval pairs
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0

    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    stats = CliRunner().invoke(app, ["pack-stats", str(tmp_path / "dpo.yaml")])
    assert stats.exit_code == 0 and "24 records -> 24 samples" in stats.output, stats.output


def test_step_packs_count_each_document_of_a_pair():
    pairs = _pairs(seed=5, n=6)
    step = next(step_packs(PackLoader(pairs, 64, seed=0), micro_steps=2, collate_fn=collate_pairs))
    assert sorted(step.doc_lengths) == sorted(n for pack in step.packs for n in pack.doc_lengths)
    assert step.num_tokens == sum(pack.num_tokens for pack in step.packs)
