"""Ulysses sequence parallelism (parallel/ulysses.py): 2 gloo ranks sharing each pack (sp_size=2, FSDP) equal one
process over the same packs (losses, grad norms, eval loss, final weights within 1e-5, fp32), with documents
crossing the split, for text models and Qwen2.5-VL with an image crossing it; 4 ranks as 2 data-parallel groups of
2 (DP 2 x SP 2) equal one process too; the pack split and the refusals without torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_distributed import _torchrun  # noqa: E402
from test_vlm_training import conversation, write_images_data  # noqa: E402
from tinyvlm import vlm_run  # noqa: E402
from tinymodels import TINY  # noqa: E402
from tinyrun import read_metrics, run_config, step_records, train_as_one_rank  # noqa: E402
from zeropad.config import build_config  # noqa: E402
from zeropad.data.chat import Sample  # noqa: E402
from zeropad.data.dataset import SampleReport  # noqa: E402
from zeropad.data.multimodal import MultimodalCollator, load_image_processor  # noqa: E402
from zeropad.errors import ConfigError  # noqa: E402
from zeropad.model.load import build_model, load_tokenizer  # noqa: E402
from zeropad.model.vlm import position_rule  # noqa: E402
from zeropad.pack.collate import IGNORE_INDEX, collate  # noqa: E402
from zeropad.pack.loader import step_packs  # noqa: E402
from zeropad.parallel import ulysses  # noqa: E402
from zeropad.train.loop import _check_sequence_parallel, _prepare_data  # noqa: E402

STEPS, GRAD_ACCUM = 3, 2
MOE = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "decoder_sparse_step": 1, "output_router_logits": True}
CASES = {
    # the chunked loss on each rank's tokens, and evaluation (each rank a token range of the same eval packs)
    # and a checkpoint at step 2, resumed in one process
    "qwen3": {"memory": {"chunked_loss": True, "loss_chunk_tokens": 16}, "eval": {"split": 0.1, "every_steps": 2},
              "checkpoint": {"every_steps": 2, "keep": 3}},
    # one KV head for 2 ranks (repeated), the router's aux loss over the whole pack, and activation
    # checkpointing (the recomputed attention runs its all-to-alls again, in backward)
    "qwen3_moe": {"memory": {"chunked_loss": False, "checkpointing": "full"},
                  "model": {**MOE, "num_key_value_heads": 1}},
}


def _config(root: Path, case: str, name: str, **parallel) -> dict:
    extra = CASES[case]
    cfg = run_config(root, root / name, train={"steps": STEPS, "grad_accum": GRAD_ACCUM}, parallel=parallel,
                     **{k: v for k, v in extra.items() if k != "model"})
    cfg["model"] = {**cfg["model"], "config": {**cfg["model"]["config"], **extra.get("model", {})}}
    return cfg


def _final_weights(output_dir: Path, auto=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    # through transformers: final/ may be one file or sharded safetensors, and a VLM's final/ written under FSDP
    # names its weights as the model does (model.language_model.*), one process's as save_pretrained (model.*)
    return auto.from_pretrained(output_dir / "final").state_dict()


def _split_points_inside_documents(cfg: dict, packs_per_step: int = GRAD_ACCUM) -> int:
    """How many of the run's packs have the sp_size=2 split point inside a document."""
    built = build_config(cfg)
    loader = _prepare_data(built, load_tokenizer(built.model))[0]
    inside = 0
    for _, step in zip(range(STEPS), step_packs(loader, packs_per_step)):
        for pack in step.packs:
            inside += ulysses.token_sizes(pack.num_tokens, 2)[0] not in pack.cu_seqlens.tolist()
    return inside


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_two_ranks_equal_one_process(tmp_path, capsys, case):
    # one process, the same grad_accum: with 2 ranks in one SP group there is one data-parallel group
    train_as_one_rank(_config(tmp_path, case, "one"))
    cfg = _config(tmp_path, case, "sp", strategy="fsdp", sp_size=2)
    assert _split_points_inside_documents(cfg) >= 2  # of the run's 6 packs: documents cross the split
    (tmp_path / "sp.yaml").write_text(yaml.safe_dump(cfg))
    done = _torchrun(["-m", "zeropad", "train", str(tmp_path / "sp.yaml")], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    expected, got = step_records(tmp_path / "one"), step_records(tmp_path / "sp")
    assert len(got) == STEPS
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5, (e["step"], e["grad_norm"], g["grad_norm"])
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])  # each counted once
        assert abs(e["budget_fill"] - g["budget_fill"]) <= 1e-12
        if case == "qwen3_moe":
            assert abs(e["aux_loss"] - g["aux_loss"]) <= 1e-5 and e["aux_loss"] > 0
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / name) if "eval_loss" in r] for name in ("one", "sp")]
    assert len(evals[0]) == (2 if case == "qwen3" else 0) and len(evals[1]) == len(evals[0])
    assert all(abs(e - g) <= 1e-5 for e, g in zip(*evals))
    _assert_same_weights(tmp_path / "one", tmp_path / "sp")
    if case == "qwen3":  # the SP run's checkpoint holds the whole state: one process continues it exactly
        resumed = _config(tmp_path, case, "resumed") | {"resume": str(tmp_path / "sp/checkpoints/step_000002")}
        capsys.readouterr()
        train_as_one_rank(resumed)
        assert ("saved with 2 rank(s) in SP groups of 2 x grad_accum 2, now 1 rank(s) x 2: the same 2 packs per "
                "optimizer step") in capsys.readouterr().out
        _assert_same_training(tmp_path / "one", tmp_path / "resumed", from_step=2)


def _assert_same_weights(one: Path, sp: Path, auto=AutoModelForCausalLM) -> None:
    expected_w, got_w = _final_weights(one, auto), _final_weights(sp, auto)
    assert expected_w.keys() == got_w.keys()
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key


def _assert_same_training(one: Path, sp: Path, auto=AutoModelForCausalLM, from_step: int = 0) -> None:
    """Losses, grad norms and final weights within 1e-5 (steps after `from_step`: `sp` resumed there)."""
    expected, got = step_records(one)[from_step:], step_records(sp)
    assert [r["step"] for r in got] == [r["step"] for r in expected] and len(got) >= STEPS - from_step
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5, (e["step"], e["grad_norm"], g["grad_norm"])
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
        if "aux_loss" in e:
            assert abs(e["aux_loss"] - g["aux_loss"]) <= 1e-5, (e["step"], e["aux_loss"], g["aux_loss"])
    _assert_same_weights(one, sp, auto)


@pytest.mark.parametrize("case", ["qwen3", "qwen3_moe", "qwen2_5_vl"])
def test_two_data_parallel_groups_of_two_sp_ranks_equal_one_process(tmp_path, case):
    """DP 2 x SP 2 on 4 ranks, GRAD_ACCUM micro-steps per group: one process with 2 x GRAD_ACCUM micro-steps
    (each case's settings as on 2 ranks). Qwen3-MoE's 4 ranks resume from the one process's step-1 checkpoint
    (resume under SP). lr 1e-3: Adam divides each gradient element by its own magnitude, so on the few elements
    whose gradient is near zero, fp32 rounding (the ranks sum in another order) moves the weight by a share of lr;
    at 3e-3 one element of 95k ended 1.2e-5 to 2.1e-5 off while the losses agreed to 4e-7 and every other element
    to 3e-6."""
    vlm = case == "qwen2_5_vl"
    make = (lambda name, **parallel: _vlm_config(tmp_path, name, **parallel)) if vlm else (
        lambda name, **parallel: _config(tmp_path, case, name, **parallel))
    one, cfg = make("one"), make("sp", strategy="fsdp", sp_size=2)
    one["train"]["grad_accum"] = 2 * GRAD_ACCUM
    for run in (one, cfg):
        run["train"]["lr"] = 1e-3
    from_step = 0
    if case == "qwen3_moe":
        one["checkpoint"] = {"every_steps": 1, "keep": STEPS}
        cfg["resume"], from_step = str(tmp_path / "one/checkpoints/step_000001"), 1
    train_as_one_rank(one)
    if vlm:  # of the run's 12 packs
        crossing, with_images = _vlm_packs_split(cfg, 2 * GRAD_ACCUM)
        assert crossing >= 3 and with_images >= 8, (crossing, with_images)
    else:
        assert _split_points_inside_documents(cfg, 2 * GRAD_ACCUM) >= 4
    (tmp_path / "sp.yaml").write_text(yaml.safe_dump(cfg))
    done = _torchrun(["-m", "zeropad", "train", str(tmp_path / "sp.yaml")], cwd=tmp_path, nproc=4)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    if from_step:
        assert "saved with 1 rank(s) x grad_accum 4, now 4 rank(s) in SP groups of 2 x 2" in done.stdout
    _assert_same_training(tmp_path / "one", tmp_path / "sp", AutoModelForImageTextToText if vlm else
                          AutoModelForCausalLM, from_step=from_step)
    if case == "qwen3":
        evals = [[r["eval_loss"] for r in read_metrics(tmp_path / n) if "eval_loss" in r] for n in ("one", "sp")]
        assert len(evals[0]) == len(evals[1]) == 2 and all(abs(e - g) <= 1e-5 for e, g in zip(*evals))


# The first document's image (16 visual tokens) sits late enough that the split of its pack falls inside it.
VLM_RECORDS = [conversation("Here is a picture for you to look at, a plain one, see it now: <image> What colour?",
                            "blue", ["a.png"]),
               conversation("Say hello.", "hello there", []),
               conversation("Look closely at this <image> Size?", "wide", ["b.png"]),
               conversation("Count to three.", "one two three", []),
               conversation("Name a fruit.", "apple", []),
               conversation("Name a colour.", "green", [])]


def _vlm_config(root: Path, name: str, **parallel) -> dict:
    if not (root / "data.json").is_file():
        write_images_data(root, VLM_RECORDS, {"a.png": (112, 112), "b.png": (84, 112)})
    # the one process: the plain loss; the SP ranks: the chunked loss (the language model's output is their range)
    return vlm_run(root, root / "data.json", name=name, pack={"max_tokens": 176},
                   train={"steps": STEPS, "grad_accum": GRAD_ACCUM},
                   memory={"chunked_loss": bool(parallel), "loss_chunk_tokens": 16}, parallel=parallel)


def _vlm_packs_split(cfg: dict, packs_per_step: int = GRAD_ACCUM) -> tuple[int, int]:
    """(packs of several documents whose sp_size=2 split falls inside an image, packs holding an image) of the run."""
    built = build_config(cfg)
    model = build_model(built.model)
    processor = load_image_processor(built, model.config)
    loader = _prepare_data(built, load_tokenizer(built.model), processor, model.config)[0]
    collate_fn = MultimodalCollator(model.config, position_rule(model), processor, "error", SampleReport())
    image, crossing, with_images = model.config.image_token_id, 0, 0
    for _, step in zip(range(STEPS), step_packs(loader, packs_per_step, collate_fn=collate_fn)):
        for pack in step.packs:
            ids, cut = pack.input_ids[0], ulysses.token_sizes(pack.num_tokens, 2)[0]
            crossing += len(pack.doc_lengths) > 1 and bool(ids[cut - 1] == image) and bool(ids[cut] == image)
            with_images += "pixel_values" in pack.media
    return crossing, with_images


def test_a_vlm_with_an_image_crossing_the_split_equals_one_process(tmp_path):
    """Qwen2.5-VL (3-axis mRoPE), sp_size=2 under FSDP: every rank runs the vision tower on the pack's images and
    keeps its range of the embeddings and positions; the chunked loss on each rank's range."""
    train_as_one_rank(_vlm_config(tmp_path, "one"))
    cfg = _vlm_config(tmp_path, "sp", strategy="fsdp", sp_size=2)
    crossing, with_images = _vlm_packs_split(cfg)
    assert crossing >= 2 and with_images >= 4  # of the run's 6 packs
    (tmp_path / "sp.yaml").write_text(yaml.safe_dump(cfg))
    done = _torchrun(["-m", "zeropad", "train", str(tmp_path / "sp.yaml")], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "chunked_loss is off" not in done.stdout + done.stderr
    _assert_same_training(tmp_path / "one", tmp_path / "sp", AutoModelForImageTextToText)


def _sample(n: int, start: int) -> Sample:
    return Sample(input_ids=np.arange(start, start + n), loss_mask=np.arange(n) % 2 == 0)


def test_token_ranges_are_tensor_split_sizes():
    for tokens, size in [(7, 2), (96, 4), (5, 3), (10, 1)]:
        assert ulysses.token_sizes(tokens, size) == [len(p) for p in torch.arange(tokens).tensor_split(size)]


def test_a_pack_splits_into_contiguous_ranges_with_the_whole_pack_metadata():
    pack = collate([_sample(5, 3), _sample(8, 20), _sample(4, 40)])  # 17 tokens: ranges 9 + 8, the cut inside doc 2
    parts = [ulysses.split_pack(pack, rank, 2) for rank in range(2)]
    assert [p.input_ids.shape[1] for p in parts] == [9, 8]
    for name in ("input_ids", "position_ids", "target_ids"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts], dim=-1), getattr(pack, name))
    assert parts[1].position_ids[0, 0].item() == 4  # the second range starts inside a document, at its position 4
    for part in parts:
        assert torch.equal(part.cu_seqlens, pack.cu_seqlens) and part.max_seqlen == pack.max_seqlen
        assert part.num_tokens == pack.num_tokens == 17
        assert part.num_targets == int((part.target_ids != IGNORE_INDEX).sum())
    assert sum(p.num_targets for p in parts) == pack.num_targets
    with pytest.raises(Exception, match="a pack of 17 tokens cannot be split over parallel.sp_size=32 ranks"):
        ulysses.split_pack(pack, 0, 32)
    # a VLM's pack: only the targets are cut; the model embeds the whole pack, its language model keeps the range
    pack.media = {"pixel_values": torch.zeros(4, 3)}
    with pytest.raises(Exception, match="a pack with media keeps its inputs whole"):
        ulysses.split_pack(pack, 0, 2)
    whole = ulysses.split_pack(pack, 1, 2, whole_inputs=True)
    assert torch.equal(whole.target_ids, parts[1].target_ids) and whole.num_targets == parts[1].num_targets
    assert whole.input_ids is pack.input_ids and whole.position_ids is pack.position_ids and whole.media is pack.media


def test_head_counts_the_all_to_all_cannot_split_are_refused():
    config = lambda **kw: AutoConfig.for_model("qwen3", **{**TINY, **kw})  # noqa: E731
    ulysses.check_heads(config(num_attention_heads=8, num_key_value_heads=2), 4)  # KV heads repeated: allowed
    with pytest.raises(ConfigError, match=r"parallel.sp_size=3 must divide the model's 4 attention heads"):
        ulysses.check_heads(config(), 3)
    with pytest.raises(ConfigError, match=r"parallel.sp_size=4 and the model's 3 key/value heads"):
        ulysses.check_heads(config(num_attention_heads=12, num_key_value_heads=3), 4)


def test_sequence_parallel_settings_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.sp_size=2 splits each pack over several processes"):
        build_config({"parallel": {"sp_size": 2}})
    with pytest.raises(ConfigError, match=r"parallel.sp_size=2 must divide the number of processes \(1\)"), \
            ulysses.sequence_parallel(2):
        pass
    cfg = build_config(run_config(tmp_path, tmp_path / "x", parallel={"strategy": "fsdp", "sp_size": 2},
                                  model={"attn_implementation": "sdpa"}))
    with pytest.raises(ConfigError, match=r"model.attn_implementation=sdpa cannot be split"):
        _check_sequence_parallel(cfg, AutoConfig.for_model("qwen3", **TINY))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attn_implementation": "zeropad_varlen"})})
    _check_sequence_parallel(cfg, AutoConfig.for_model("qwen2_5_vl"))
    with pytest.raises(ConfigError, match=r"supports the vision-language models qwen2_5_vl, .*not kimi_k25 yet"):
        _check_sequence_parallel(cfg, AutoConfig.for_model("kimi_k25"))


def test_the_ranks_of_an_sp_group_take_the_same_packs_and_the_groups_take_a_data_parallel_share():
    from zeropad.pack.loader import PackLoader

    samples = [_sample(n, 0) for n in [30, 25, 20, 18, 15, 12, 10, 9, 7, 5, 4, 3]]
    lengths = lambda packs: [[len(s) for s in docs] for docs in packs]  # noqa: E731
    # world 4, sp 2: two data-parallel groups of two ranks, as 2 ranks without SP
    got = [next(step_packs(PackLoader(samples, 32, seed=0), 2, 4, rank, lambda docs: docs, sp_size=2))
           for rank in range(4)]
    want = [next(step_packs(PackLoader(samples, 32, seed=0), 2, 2, rank, lambda docs: docs)) for rank in range(2)]
    for rank, step in enumerate(got):
        assert lengths(step.packs) == lengths(want[rank // 2].packs) and len(step.packs) == 2
        assert step.num_tokens == want[0].num_tokens
    assert lengths(got[0].packs) != lengths(got[2].packs)
