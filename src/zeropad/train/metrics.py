"""What the user sees of a run: FLOPs/MFU, the progress bar, metrics.jsonl, TensorBoard, loss.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from zeropad import storage

# Dense bf16 peak TFLOP/s of common training GPUs (vendor datasheets, SXM parts), for MFU.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "B200": 2250.0}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _PEAK_TFLOPS.items():
            if key in name:
                return value
    return None  # CPUs have no meaningful published peak: MFU is left out


class FlopCounter:
    """Training FLOPs of a pack: 6·N per token for the matmuls (N = parameters excluding the input
    embedding lookup) plus causal attention, 6·layers·heads·head_dim·Σ len² (forward QKᵀ and PV
    at 2·len²·d each, halved by causality, times 3 for forward + backward). PaLM appendix B."""

    def __init__(self, model: torch.nn.Module):
        config = model.config.get_text_config()
        embed = model.get_input_embeddings().weight
        tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
        num_params = sum(p.numel() for p in model.parameters())
        self.matmul_params = num_params - (0 if tied else embed.numel())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attn_width = config.num_hidden_layers * config.num_attention_heads * head_dim

    def __call__(self, doc_lengths: list[int]) -> float:
        tokens = sum(doc_lengths)
        return 6.0 * self.matmul_params * tokens + 6.0 * self.attn_width * sum(n * n for n in doc_lengths)


class MetricsLogger:
    """One JSON object per optimizer step in metrics.jsonl; TensorBoard scalars when asked."""

    def __init__(self, output_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = output_dir / "metrics.jsonl"
        with storage.writing("the metrics log", self.path):
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a") if enabled else None  # disabled on ranks other than 0
        self.tb = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tb"))

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        line = json.dumps(record) + "\n"
        # a line cut short here is dropped on resume (guard._trim_metrics)
        with storage.writing(f"the metrics record of step {record['step']}", self.path, len(line)):
            storage.inject("metrics", record["step"])
            self.file.write(line)
            self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A progress bar with loss, real tokens/s, padding fraction and ETA (tqdm computes the ETA)."""

    def __init__(self, total_steps: int, enabled: bool, initial: int = 0, quiet: bool = False):
        self.quiet = quiet  # write() prints nothing (ranks other than 0)
        self.bar = tqdm(total=total_steps, initial=initial, disable=not enabled, desc="train", unit="step",
                        dynamic_ncols=True)
        self.start = time.perf_counter()

    def update(self, loss: float, tokens_per_s: float, pad_fraction: float, accuracy: float | None = None) -> None:
        """`accuracy`: a preference objective's rewards/accuracy, shown when given."""
        extra = {} if accuracy is None else {"acc": f"{accuracy:.0%}"}
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", pad=f"{pad_fraction:.1%}", **extra,
                             refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        if not self.quiet:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    accuracy = [(r["step"], r["rewards/accuracy"]) for r in records if "rewards/accuracy" in r]
    if accuracy:  # a preference objective: its loss is a pair mean, and the reward accuracy on a second axis
        ax.set_ylabel("loss (pair mean)")
        right = ax.twinx()
        right.plot(*zip(*accuracy), color="tab:green", alpha=0.6, label="rewards/accuracy")
        evals = [(r["step"], r["eval_rewards/accuracy"]) for r in records if "eval_rewards/accuracy" in r]
        if evals:
            right.plot(*zip(*evals), "s-", color="tab:olive", label="eval rewards/accuracy")
        right.set_ylim(0, 1)
        right.set_ylabel("rewards/accuracy")
        right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
