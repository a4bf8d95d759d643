"""The built-in default (`zeropad train` with no config), shortened through overrides."""

import json

from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from zeropad.cli import app
from zeropad.demo.task import HELDOUT_FILE, exact_match, load_heldout


def test_default_run_shortened_trains_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "train.steps=40", f"output_dir={out}",
                                      f"data.cache_dir={tmp_path / 'cache'}", "log.progress=false"])
    assert result.exit_code == 0, result.output
    assert "held-out exact match" in result.output
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]  # it learns: loss falls well below its start
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] < losses[0]
    # the reported score is the saved model's: re-scored from final/ alone, it is the same number, and printed so
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    rescored = exact_match(model, tokenizer, load_heldout(out / "demo" / HELDOUT_FILE))
    assert summary["heldout_exact_match"] == rescored
    assert f"held-out exact match: {rescored:.1%}" in result.output
    for name in ["loss.png", "final/model.safetensors", "final/tokenizer.json", "final/config.json"]:
        assert (out / name).is_file(), name

    # `zeropad generate` on final/ (KV cache, chat template) scores the held-out additions as the run did...
    heldout = out / "demo" / HELDOUT_FILE
    gen = CliRunner().invoke(app, ["generate", str(out / "final"), "--prompts", str(heldout), "--out",
                                   str(tmp_path / "gen.jsonl"), "--max-new-tokens", "8", "--batch-size", "256",
                                   "--no-progress"])
    assert gen.exit_code == 0, gen.output
    answers = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    matches = sum(a["response"].strip() == a["messages"][-1]["content"] for a in answers)
    assert f"matches the reference reply: {rescored:.1%} ({matches}/200)" in gen.output
    # ... record by record: each reply is the one exact_match's own greedy decoding gives
    as_generated = [{"messages": [*a["messages"][:-1], {"role": "assistant", "content": a["response"]}]}
                    for a in answers]
    assert exact_match(model, tokenizer, as_generated) == 1.0
    # and the run's last checkpoint (not exported) gives the same replies
    (tmp_path / "some.jsonl").write_text("".join(json.dumps({"messages": a["messages"]}) + "\n" for a in answers[:16]))
    ckpt = CliRunner().invoke(app, ["generate", str(out / "checkpoints" / "step_000040"), "--prompts",
                                    str(tmp_path / "some.jsonl"), "--out", str(tmp_path / "ckpt.jsonl"),
                                    "--max-new-tokens", "8", "--no-progress"])
    assert ckpt.exit_code == 0, ckpt.output
    assert [json.loads(line)["response"] for line in (tmp_path / "ckpt.jsonl").read_text().splitlines()] == [
        a["response"] for a in answers[:16]]
