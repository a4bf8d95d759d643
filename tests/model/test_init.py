"""A model from model.config is initialised module by module (model/init.py): Hugging Face's own init (the same
constant tensors, random ones of the same spread as `from_config`), and streamed into a meta copy's slots it
gives the very same weights as built in place; so a sharded build starts where one process starts."""

from __future__ import annotations

import pytest
import torch

from tinymodels import EXACT_FAMILIES, TINY
from tinyvlm import vlm_run
from zeropad.config import ModelConfig
from zeropad.model.load import auto_class, build_model, build_model_config
from zeropad.parallel.materialize import _init_from_config, weight_slots

CASES = {**{f"{fam}-tied": {"model_type": fam, **TINY, **extra, "tie_word_embeddings": True}
            for fam, extra in EXACT_FAMILIES.items()},
         "qwen3": {"model_type": "qwen3", **TINY}}
VLMS = ["qwen2_5_vl", "qwen3_vl_moe", "kimi_k25", "chameleon"]


def _tensors(model) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _model_config(case: str, tmp_path) -> ModelConfig:
    if case in CASES:
        return ModelConfig(config=CASES[case], attn_implementation="eager")
    cfg = vlm_run(tmp_path, tmp_path / "unused.jsonl", family=case)["model"]
    return ModelConfig(config=cfg["config"], attn_implementation="eager")


@pytest.mark.parametrize("case", [*CASES, *VLMS])
def test_streamed_init_equals_in_place_and_matches_hugging_face(case, tmp_path):
    cfg = _model_config(case, tmp_path)
    built = _tensors(build_model(cfg, seed=5))

    meta = build_model(cfg, device="meta")
    slots = weight_slots(meta)
    meta.to_empty(device="cpu")
    meta.tie_weights()
    _init_from_config(cfg, 5, slots)
    streamed = _tensors(meta)
    assert built.keys() == streamed.keys()
    assert [k for k in built if not torch.equal(built[k], streamed[k])] == []

    config = build_model_config(cfg)
    reference = _tensors(auto_class(config).from_config(config))
    assert reference.keys() == built.keys()
    for name, ref in reference.items():
        got = built[name].float()
        if torch.all(ref == ref.flatten()[0]):  # ones, zeros, constants: exactly
            assert torch.equal(ref.float(), got), name
        elif ref.numel() >= 256 and ref.is_floating_point():  # random: the same spread
            assert abs(got.std().item() / ref.float().std().item() - 1) < 0.2, name
    if case.endswith("-tied"):
        model = build_model(cfg, seed=5)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_different_seed_gives_different_weights():
    cfg = ModelConfig(config=CASES["qwen3"], attn_implementation="eager")
    a, b = build_model(cfg, seed=0), build_model(cfg, seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert torch.equal(a.model.norm.weight, b.model.norm.weight)
