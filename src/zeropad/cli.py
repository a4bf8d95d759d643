"""The zeropad command line: train, plan, pack-stats, verify, export, chat, generate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from zeropad.config import describe_keys, load_config
from zeropad.errors import ConfigError, RunStopped, ZeropadError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Padding-free, exact packed training.")

_TRAIN_HELP = (
    "Train from CONFIG.yaml (or the built-in default when no config is given), with dotted overrides "
    "such as train.steps=10 pack.max_tokens=4096.\n\nConfig keys:\n\n" + describe_keys().replace("\n", "\n\n")
)


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest are key=value overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


@app.command(help=_TRAIN_HELP)
def train(
    args: list[str] = typer.Argument(None, metavar="[CONFIG.yaml] [key.sub=value ...]"),
    default: str = typer.Option("text", "--default", help="The built-in run when no CONFIG is given: text "
                                "(a tiny LM learns 2-digit addition), vlm (a tiny VLM learns to answer questions "
                                "about generated images), dpo (DPO teaches the tiny LM an answer format) or draw "
                                "(a tiny LM learns to draw digits)."),
) -> None:
    from zeropad.train.loop import train as run_training

    path, overrides = _split_args(args or [])
    if path is not None:
        run_training(load_config(path, overrides))
    elif default == "text":
        _default_text(overrides)
    elif default == "vlm":
        _default_vlm(overrides)
    elif default == "dpo":
        _default_dpo(overrides)
    elif default == "draw":
        _default_draw(overrides)
    else:
        raise ZeropadError(f"--default {default!r}: choose text, vlm, dpo or draw")


def _default_text(overrides: list[str]) -> None:
    from zeropad.demo.task import HELDOUT_FILE, default_config, exact_match, load_heldout
    from zeropad.train.loop import train as run_training

    output_dir = load_config(None, overrides).output_dir
    cfg = load_config(None, overrides, base=default_config(output_dir))
    result = run_training(cfg)
    heldout = load_heldout(Path(cfg.output_dir) / "demo" / HELDOUT_FILE)
    score = exact_match(result.model, result.tokenizer, heldout)
    _add_to_summary(cfg.output_dir, {"heldout_exact_match": score})
    print(f"held-out exact match: {score:.1%} on {len(heldout)} unseen additions (chance is ~1%)")


def _default_dpo(overrides: list[str]) -> None:
    from zeropad.demo.preference_task import default_config
    from zeropad.train.loop import train as run_training

    chosen = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides)
    output_dir = load_config(None, overrides).output_dir if chosen else "runs/zeropad-dpo"
    cfg = load_config(None, overrides, base=default_config(output_dir))
    run_training(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval_rewards/accuracy"] for r in records if "eval_rewards/accuracy" in r]
    _add_to_summary(cfg.output_dir, {"heldout_rewards_accuracy": accuracy[-1]})
    print(f"held-out rewards/accuracy: {accuracy[-1]:.1%} of unseen pairs ranked chosen over rejected (chance 50%)")


def _default_vlm(overrides: list[str]) -> None:
    from zeropad.data.multimodal import load_image_processor
    from zeropad.demo.vlm_task import HELDOUT_FILE, TRAIN_FILE, answer_accuracy, blind_baseline, default_config, \
        load_records
    from zeropad.train.loop import train as run_training

    chosen = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides)
    output_dir = load_config(None, overrides).output_dir if chosen else "runs/zeropad-vlm"
    cfg = load_config(None, overrides, base=default_config(output_dir))
    result = run_training(cfg)
    data_dir = Path(cfg.output_dir) / "demo_vlm"
    heldout = load_records(data_dir / HELDOUT_FILE)
    processor = load_image_processor(cfg, result.model.config)
    score = answer_accuracy(result.model, result.tokenizer, processor, heldout, data_dir)
    chance = blind_baseline(load_records(data_dir / TRAIN_FILE), heldout)
    _add_to_summary(cfg.output_dir, {"heldout_answer_accuracy": score, "blind_baseline": chance})
    print(f"held-out answer accuracy: {score:.1%} on {len(heldout)} questions about unseen images "
          f"(answering without the image: {chance:.1%})")


def _default_draw(overrides: list[str]) -> None:
    from zeropad.demo.draw_task import SPEC, default_config, draw_report
    from zeropad.train.loop import train as run_training

    chosen = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides)
    output_dir = load_config(None, overrides).output_dir if chosen else "runs/zeropad-draw"
    cfg = load_config(None, overrides, base=default_config(output_dir))
    result = run_training(cfg)
    SPEC.save(Path(cfg.output_dir) / "final")  # so `zeropad generate OUTPUT_DIR/final --prompt ...` knows the image shape
    report = draw_report(result.model, result.tokenizer, Path(cfg.output_dir) / "demo_draw", cfg.output_dir)
    _add_to_summary(cfg.output_dir, report)
    print(f"generated digits recognised as the requested digit: {report['draw_recognised']:.1%} of "
          f"{report['draw_samples']} (chance {report['draw_chance']:.0%}; the classifier on real digits it was "
          f"not fitted on: {report['classifier_real_accuracy']:.1%}); "
          f"samples: {Path(cfg.output_dir) / 'samples' / 'grid.png'}")


def _add_to_summary(output_dir: str, values: dict) -> None:
    summary_path = Path(output_dir) / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), **values}, indent=2))


@app.command("pack-stats")
def pack_stats(
    config: Path = typer.Argument(..., help="Training config YAML."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
    show: int = typer.Option(0, min=0, help="Also print N samples as text with the trained tokens in ⟦ ⟧."),
) -> None:
    """Print packing utilization, number of packs and the lower bound ceil(total/budget)."""
    from zeropad.data.chat import ensure_chat_template
    from zeropad.data.dataset import load_samples
    from zeropad.data.image_targets import image_target_setup, load_target_samples
    from zeropad.data.multimodal import load_image_processor, load_vision_samples
    from zeropad.family import is_multimodal
    from zeropad.model.load import build_model_config, load_tokenizer
    from zeropad.pack.planner import pack_stats as compute_stats
    from zeropad.pack.planner import plan_packs

    cfg = load_config(config, overrides or [])
    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    model_config = build_model_config(cfg.model)
    target_processor = image_target_setup(cfg, model_config)  # Emu3: images as targets, lengths from headers
    if target_processor is not None:
        samples, report = load_target_samples(cfg, cfg.data.sources, tokenizer, target_processor, model_config)
    elif is_multimodal(model_config):  # exact lengths from image headers and video metadata, no pixels
        processor = load_image_processor(cfg, model_config)
        samples, report = load_vision_samples(cfg, cfg.data.sources, tokenizer, processor, model_config)
    elif cfg.train.objective != "sft":  # preference pairs, each planned as one unit
        from zeropad.data.preference import load_pairs

        samples, report = load_pairs(cfg.data.sources, cfg.data, tokenizer, max_tokens=cfg.pack.max_tokens,
                                     seed=cfg.train.seed)
    else:
        samples, report = load_samples(cfg.data.sources, cfg.data, tokenizer, max_tokens=cfg.pack.max_tokens,
                                       overlong=cfg.pack.overlong, seed=cfg.train.seed)
    lengths = [len(s) for s in samples]
    stats = compute_stats(lengths, plan_packs(lengths, cfg.pack.max_tokens), cfg.pack.max_tokens)
    print(f"data: {report.summary()}")
    print(stats.table())
    if show:
        from zeropad.data.preview import preview

        print(preview(samples, tokenizer, show, color=sys.stdout.isatty()))


@app.command()
def verify(
    model_dir: Path = typer.Argument(..., help="Local Hugging Face model directory."),
    lengths: str = typer.Option("7,33,1,64,19", help="Comma-separated document lengths packed together (a "
                                "document longer than every sliding window is added if none is)."),
    seed: int = typer.Option(0),
    tolerance: float = typer.Option(None, help="Max relative error per tensor (default: 1e-6 against an SDPA "
                                    "reference, 1e-4 against eager, whose softmax rounds to float32)."),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Check, in float64 on CPU, that packed forward and backward equal each document's alone, with attention
    logits driven into the trained range, and that a one-token leak across documents (the negative control)
    fails. Exit 0 only when both hold; unsupported families are refused with the reason (exit 2)."""
    import torch

    from zeropad.config import ModelConfig
    from zeropad.model.load import build_model, build_model_config
    from zeropad.model.support import check_packable
    from zeropad.verify import check_exactness

    try:
        doc_lengths = [int(n) for n in lengths.split(",")]
    except ValueError:
        doc_lengths = []
    if not doc_lengths or min(doc_lengths) < 1:
        raise ConfigError(f"--lengths {lengths!r}: give comma-separated document lengths of at least 1 token")
    model_cfg = ModelConfig(path=str(model_dir), trust_remote_code=trust_remote_code)
    check_packable(build_model_config(model_cfg))  # refuse before loading any weights
    model = build_model(model_cfg).to(torch.float64)
    report = check_exactness(model, doc_lengths, seed=seed, tolerance=tolerance)
    print("worst relative errors (max |packed - reference| / max |reference|, per tensor):")
    for name, rel in report.worst_tensors(5):
        print(f"  {rel:.2e}  {name}")
    print(report.summary())
    raise typer.Exit(0 if report.passed else 1)


@app.command()
def export(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint (OUTPUT_DIR/checkpoints/step_N), or an output dir: its newest."),
    out_dir: Path = typer.Argument(..., help="Where to write the Hugging Face model directory."),
    max_shard_size: str = typer.Option(None, help="Largest safetensors file, e.g. 5GB, 2GiB or bytes (default: "
                                       "the run's checkpoint.max_shard_size); a bigger model is written in shards."),
) -> None:
    """Write a checkpoint as a Hugging Face model directory (safetensors, config, generation config, tokenizer;
    for a vision-language model also its image processor), one weight shard at a time."""
    from zeropad.config import parse_shard_size
    from zeropad.train.export import export_checkpoint

    try:
        shard_bytes = None if max_shard_size is None else parse_shard_size(max_shard_size)
    except ValueError as err:
        raise ConfigError(f"--max-shard-size: {err}") from None
    done = export_checkpoint(checkpoint, out_dir, shard_bytes)
    print(f"exported {done.checkpoint} to {out_dir} as {len(done.weight_files)} safetensors file(s) "
          f"({done.auto_class}.from_pretrained loads it)")


@app.command()
def plan(
    args: list[str] = typer.Argument(None, metavar="[CONFIG.yaml] [key.sub=value ...]"),
    devices: int = typer.Option(1, min=1, help="Data-parallel devices the model states are sharded over."),
    device_memory: str = typer.Option(None, help="Memory per device, e.g. 80GB or 24GiB (default: "
                                      "memory.device_gb, else this machine's GPU)."),
    strategy: str = typer.Option(None, help="none, zero1, zero2, zero3 (FSDP) or offload (FSDP + CPU offload); "
                                 "default none on one device, zero3 on more."),
    precision: str = typer.Option(None, help="fp32, bf16 (autocast, fp32 weights) or mixed (bf16 weights, "
                                  "fp32 master, as in the ZeRO paper); default train.dtype."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd (momentum)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Predict memory per device by component from the config alone (no weights are loaded), and
    recommend the least recompute and the largest pack.max_tokens that fit."""
    from zeropad.plan.report import run

    path, overrides = _split_args(args or [])
    print(run(load_config(path, overrides), num_devices=devices, device_memory=device_memory, strategy=strategy,
              precision=precision, optimizer=optimizer, as_json=as_json))


_MODEL_DIR_HELP = "final/, an exported directory, a checkpoint (LoRA merged) or an output directory."
_TEMPLATE_KWARGS_HELP = ("JSON object of chat template variables, e.g. '{\"enable_thinking\": false}' "
                         "(default: the run's data.chat_template_kwargs).")


def _json_object(option: str, text: str | None) -> dict | None:
    try:
        value = None if text is None else json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option}: not valid JSON: {err}") from None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{option}: must be a JSON object")
    return value


@app.command()
def chat(
    model_dir: Path = typer.Argument(..., help=_MODEL_DIR_HELP),
    system: str = typer.Option(None, help="A system message opening the conversation."),
    image: list[str] = typer.Option(None, help="An image for the first turn (vision-language models); repeatable."),
    video: list[str] = typer.Option(None, help="A video for the first turn (vision-language models); repeatable."),
    max_new_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy; above 0: sampling."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0, help="Sampling seed: the same turns give the same replies."),
    device: str = typer.Option("auto", help="auto (cuda if available), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on GPU, else float32), float32, bfloat16, float16."),
    chat_template_kwargs: str = typer.Option(None, help=_TEMPLATE_KWARGS_HELP),
) -> None:
    """Talk to a model in the terminal: replies stream as they are generated; /reset clears the history, /exit
    quits."""
    import torch

    from zeropad.generate import Settings, chat_loop, load_chatter

    kwargs = _json_object("--chat-template-kwargs", chat_template_kwargs)
    chatter = load_chatter(model_dir, device, dtype, kwargs)
    torch.manual_seed(seed)
    chat_loop(chatter, Settings(max_new_tokens, temperature, top_p), system, image, video)


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help=_MODEL_DIR_HELP),
    prompts: Path = typer.Option(None, help="Text: JSON/JSONL of {\"prompt\": ...} or training-format records (a "
                                 "final assistant turn is the reference, not the prompt); images/videos as in training."),
    prompt: str = typer.Option(None, help='Images: what a pixel-token model (the draw default\'s final/) draws, '
                               'e.g. "draw a 3"; --num PNG files and a contact sheet grid.png go to --out.'),
    out: Path = typer.Option(..., help="Text: the JSONL written, each record with its \"response\". Images: a "
                             "directory."),
    num: int = typer.Option(10, min=1, help="Images: how many."),
    max_new_tokens: int = typer.Option(256, min=1, help="Text: the longest reply."),
    temperature: float = typer.Option(None, min=0.0, help="0: greedy; above 0: sampling. Default 0 for text, 1 for "
                                      "images."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Text: nucleus sampling."),
    top_k: int = typer.Option(None, "--top-k", help="Images: sample among the k most likely pixel levels (visual "
                              "tokens for Emu3)."),
    guidance_scale: float = typer.Option(None, help="Images (Emu3): classifier-free guidance scale; above 1 turns "
                                         "it on."),
    negative_prompt: str = typer.Option(None, help="Images (Emu3, with --guidance-scale): what to steer away from "
                                        "(default: an empty prompt)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    batch_size: int = typer.Option(32, min=1, help="Prompts of equal length generated together (no padding)."),
    device: str = typer.Option("auto", help="auto (cuda if available), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on GPU, else float32), float32, bfloat16, float16."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    chat_template_kwargs: str = typer.Option(None, help=_TEMPLATE_KWARGS_HELP),
) -> None:
    """Generate a reply to every prompt of a file (--prompts) with the chat template applied, and where records
    carry a reference reply, print how many replies match it exactly; or draw images (--prompt)."""
    import torch

    if (prompts is None) == (prompt is None):
        raise ZeropadError("generate: give --prompts FILE (text replies) or --prompt TEXT (images), not both")
    if prompt is not None:
        from zeropad.images import generate_images

        from zeropad.model.emu3 import generate_emu3_images, is_emu3_dir

        temperature = 1.0 if temperature is None else temperature
        if is_emu3_dir(model_dir):
            paths = generate_emu3_images(model_dir, prompt, num, out, temperature, top_k, seed, guidance_scale,
                                         negative_prompt, device=device)
        elif guidance_scale is not None or negative_prompt is not None:
            raise ZeropadError("--guidance-scale/--negative-prompt: classifier-free guidance is for Emu3 models")
        else:
            paths = generate_images(model_dir, prompt, num, out, temperature=temperature, top_k=top_k, seed=seed)
        print(f"wrote {len(paths)} images and {out / 'grid.png'}")
        return
    from zeropad.generate import Settings, generate_file, load_chatter

    torch.manual_seed(seed)
    chatter = load_chatter(model_dir, device, dtype, _json_object("--chat-template-kwargs", chat_template_kwargs))
    settings = Settings(max_new_tokens, temperature or 0.0, top_p)
    matches, total = generate_file(chatter, prompts, out, settings, batch_size, progress)
    print(f"wrote {out}")
    if total:
        print(f"matches the reference reply: {matches / total:.1%} ({matches}/{total})")


def main() -> None:
    try:
        app()
    except RunStopped as err:  # a checkpoint was saved: say how to continue, exit with the documented code
        from zeropad.train.guard import resume_command

        print(f"stopped: {err}\nto resume: {resume_command(sys.argv[1:])}", file=sys.stderr)
        sys.exit(err.exit_code)
    except ZeropadError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
