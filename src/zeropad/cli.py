"""The zeropad command line: train, plan, pack-stats, verify, export, draw."""

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
                                "(a tiny LM learns 2-digit addition), vlm (a tiny VLM learns to answer "
                                "questions about generated images) or draw (a tiny LM learns to draw digits)."),
) -> None:
    from zeropad.train.loop import train as run_training

    path, overrides = _split_args(args or [])
    if path is not None:
        run_training(load_config(path, overrides))
    elif default == "text":
        _default_text(overrides)
    elif default == "vlm":
        _default_vlm(overrides)
    elif default == "draw":
        _default_draw(overrides)
    else:
        raise ZeropadError(f"--default {default!r}: choose text, vlm or draw")


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
    SPEC.save(Path(cfg.output_dir) / "final")  # so `zeropad draw OUTPUT_DIR/final` knows the image shape
    report = draw_report(result.model, result.tokenizer, Path(cfg.output_dir) / "demo_draw", cfg.output_dir)
    _add_to_summary(cfg.output_dir, report)
    print(f"generated digits recognised as the requested digit: {report['draw_recognised']:.1%} of "
          f"{report['draw_samples']} (chance {report['draw_chance']:.0%}; the classifier on real digits it was "
          f"not fitted on: {report['classifier_real_accuracy']:.1%}); "
          f"samples: {Path(cfg.output_dir) / 'samples' / 'grid.png'}")


def _add_to_summary(output_dir: str, values: dict) -> None:
    summary_path = Path(output_dir) / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), **values}, indent=2))


@app.command()
def draw(
    model_dir: Path = typer.Argument(..., help="A pixel-token image model, e.g. the draw default's OUTPUT_DIR/final."),
    prompt: str = typer.Option(..., "--prompt", help='What to draw, e.g. "draw a 3".'),
    num: int = typer.Option(10, "--num", help="How many images."),
    out: Path = typer.Option(..., "--out", help="Directory for 0000.png, 0001.png, ... and the contact sheet "
                             "grid.png."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (lower: more typical pictures)."),
    top_k: int = typer.Option(None, "--top-k", help="Sample among the k most likely pixel levels (default: all)."),
    seed: int = typer.Option(0),
) -> None:
    """Sample images from a model that draws with pixel tokens; write them as PNG files and a contact sheet."""
    from zeropad.images import generate_images

    paths = generate_images(model_dir, prompt, num, out, temperature=temperature, top_k=top_k, seed=seed)
    print(f"wrote {len(paths)} images and {out / 'grid.png'}")


@app.command("pack-stats")
def pack_stats(
    config: Path = typer.Argument(..., help="Training config YAML."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Print packing utilization, number of packs and the lower bound ceil(total/budget)."""
    from zeropad.data.chat import ensure_chat_template
    from zeropad.data.dataset import load_samples
    from zeropad.data.multimodal import load_image_processor, load_vision_samples
    from zeropad.family import is_multimodal
    from zeropad.model.load import build_model_config, load_tokenizer
    from zeropad.pack.planner import pack_stats as compute_stats
    from zeropad.pack.planner import plan_packs

    cfg = load_config(config, overrides or [])
    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    model_config = build_model_config(cfg.model)
    if is_multimodal(model_config):  # exact lengths from image headers and video metadata, no pixels
        processor = load_image_processor(cfg, model_config)
        samples, report = load_vision_samples(cfg, cfg.data.sources, tokenizer, processor, model_config)
    else:
        samples, report = load_samples(cfg.data.sources, cfg.data, tokenizer, max_tokens=cfg.pack.max_tokens,
                                       overlong=cfg.pack.overlong, seed=cfg.train.seed)
    lengths = [len(s) for s in samples]
    stats = compute_stats(lengths, plan_packs(lengths, cfg.pack.max_tokens), cfg.pack.max_tokens)
    print(f"data: {report.summary()}")
    print(stats.table())


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

    model_cfg = ModelConfig(path=str(model_dir), trust_remote_code=trust_remote_code)
    check_packable(build_model_config(model_cfg))  # refuse before loading any weights
    model = build_model(model_cfg).to(torch.float64)
    report = check_exactness(model, [int(n) for n in lengths.split(",")], seed=seed, tolerance=tolerance)
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
