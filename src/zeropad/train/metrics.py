"""What the user sees of a run: FLOPs/MFU, the progress bar, metrics.jsonl, TensorBoard, loss.png.

Model FLOPs (FlopCounter), for MFU: the work the model needs for a step's real tokens and images.

Training FLOPs are 3 x the forward's (the backward computes gradients of inputs and of weights, each as costly as
the forward). The forward of a text token runs every matmul weight of the language model once (2 FLOPs per weight):
the decoder's linear layers and the LM head, the input embedding being a lookup; a MoE layer's routed experts count
at num_experts_per_tok / num_experts of their weights (what a token actually runs), its router and shared experts
in full. Causal attention adds, per layer and document of L tokens, 2 x L^2 / 2 x heads x (qk + v head dims): the
scores and the weighted values over the causal half (PaLM, appendix B); a sliding-window layer over its band.
These are the model's FLOPs, as MFU defines them, not the ones a run happens to execute: the LM head counts on every
token although zeropad runs it on target positions only, and a run with frozen weights (LoRA, train.freeze), which
computes no gradient for them, is counted as full training (up to 1.5x the work it does).

A vision-language model's tower runs per image patch: every Linear and Conv weight of the modules outside the
language model (the vision tower and its projector) once per patch, except the patch mergers and projectors
(modules named *merger* or *projector*), which run once per merged token (merge_size^2 patches). Vision attention
is bidirectional within each frame of an image or video (Qwen2.5-VL: within each window, outside its full-attention
blocks): 2 x 2 x L^2 x hidden per layer. Chameleon's images are VQ codes made before the model, and count as text.

tests/train/test_flops.py checks every term against torch.utils.flop_counter on real forwards of tiny models.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from zeropad import storage
from zeropad.family import media_family
from zeropad.plan.arch import arch_of, image_modules

# Dense bf16 peak TFLOP/s of common training GPUs (vendor datasheets, SXM parts), for MFU.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "B200": 2250.0}

Grid = Sequence[int]  # (t, h, w) in patches: an image_grid_thw / video_grid_thw row


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _PEAK_TFLOPS.items():
            if key in name:
                return value
    return None  # CPUs have no meaningful published peak: MFU is left out


def media_grids(media: dict) -> list[list[int]]:
    """The (t, h, w) patch grids of a pack's images and videos (empty for text, and for Chameleon's VQ codes)."""
    return [row for key in ("image_grid_thw", "video_grid_thw") if key in media for row in media[key].tolist()]


class FlopCounter:
    """Training FLOPs of documents and images: `counter(doc_lengths, grids)`. The terms are kept apart
    (`text_forward`, `vision_forward`) for the tests; all are forward FLOPs until `__call__` triples them."""

    def __init__(self, model: torch.nn.Module):
        arch, text = arch_of(model), model.config.get_text_config()
        self.text_matmul_params = arch.num_active_matmul_params
        # MLA (DeepSeek-V3, Kimi): scores over qk_head_dim, values of v_head_dim
        head_dims = (getattr(text, "qk_head_dim", None) or arch.head_dim) + (getattr(text, "v_head_dim", None)
                                                                             or arch.head_dim)
        self.text_attn_width = arch.num_heads * head_dims  # scores and values, per layer
        window = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * \
            arch.num_layers
        self.text_windows = Counter(window if kind == "sliding_attention" else None for kind in types)  # -> layers
        self.per_patch_params = self.per_merged_params = self.vision_layers = self.vision_hidden = 0
        self.merge, self.full_layers, self.window = 1, 0, None
        family = media_family(model.config)
        vision = getattr(model.config, "vision_config", None)
        if family is None or vision is None:  # text, or Chameleon's VQ codes
            return
        self.merge = family.merge_size
        for name, module in image_modules(model):
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                if "merger" in name or "projector" in name:
                    self.per_merged_params += module.weight.numel()
                else:
                    self.per_patch_params += module.weight.numel()
        self.vision_layers = getattr(vision, "depth", None) or vision.num_hidden_layers
        self.vision_hidden = vision.hidden_size
        # Qwen2.5-VL: blocks outside fullatt_block_indexes attend within windows of window_size pixels
        self.full_layers = len(getattr(vision, "fullatt_block_indexes", None) or range(self.vision_layers))
        window = getattr(vision, "window_size", None)
        self.window = window // self.merge // vision.patch_size if window and self.full_layers < \
            self.vision_layers else None  # in merged tokens per side

    def text_forward(self, doc_lengths: Iterable[int]) -> tuple[float, float]:
        """(matmuls, attention) of the language model's forward over these documents."""
        lengths = list(doc_lengths)
        areas = sum(layers * _causal_area(n, window) for window, layers in self.text_windows.items()
                    for n in lengths)
        return 2.0 * self.text_matmul_params * sum(lengths), 2.0 * self.text_attn_width * areas

    def vision_forward(self, grids: Iterable[Grid]) -> tuple[float, float]:
        """(matmuls, attention) of the vision tower and projector's forward over these images and videos."""
        matmuls = attention = 0.0
        for t, h, w in grids:
            patches = t * h * w
            matmuls += 2.0 * (self.per_patch_params * patches + self.per_merged_params * patches / self.merge**2)
            frame = float(h * w) ** 2
            windows = self._window_squares(h, w) if self.window else frame
            attention += 4.0 * self.vision_hidden * t * (self.full_layers * frame
                                                         + (self.vision_layers - self.full_layers) * windows)
        return matmuls, attention

    def _window_squares(self, h: int, w: int) -> float:
        """Σ len² over the windows of one frame: tiles of window x window merged tokens, cut at the edges."""
        rows, cols = h // self.merge, w // self.merge
        edge = lambda n: [min(self.window, n - i) for i in range(0, n, self.window)]  # noqa: E731
        return float(sum((a * b * self.merge**2) ** 2 for a in edge(rows) for b in edge(cols)))

    def __call__(self, doc_lengths: Iterable[int], grids: Iterable[Grid] = ()) -> float:
        return 3.0 * (math.fsum(self.text_forward(doc_lengths)) + math.fsum(self.vision_forward(grids)))


def _causal_area(length: int, window: int | None) -> float:
    """The (query, key) pairs causal attention scores in a document, L^2 / 2; within a sliding window of w keys,
    the band L^2 / 2 - (L - w)^2 / 2."""
    band = max(length - window, 0) if window else 0
    return (length * length - band * band) / 2.0


class MetricsLogger:
    """One JSON object per optimizer step in metrics.jsonl; TensorBoard scalars when asked."""

    def __init__(self, output_dir: Path, tensorboard: bool, enabled: bool = True, start: int = 0):
        self.path = output_dir / "metrics.jsonl"
        with storage.writing("the metrics log", self.path):
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a") if enabled else None  # disabled on ranks other than 0
        self.tb = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            # steps after `start` that tb/ holds from an earlier run or the run before a resume are hidden, as
            # metrics.jsonl drops them
            self.tb = SummaryWriter(str(output_dir / "tb"), purge_step=start + 1)

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
            self.tb.flush()  # a run stopped by a signal, bad steps or OOM never reaches close()

    def logged_loss(self, step: int) -> float:
        """The training loss metrics.jsonl holds for `step` (NaN if none): a run resumed at its last step trains
        no step, and reports the loss that step had."""
        if not self.path.is_file():
            return math.nan
        losses = [record["loss"] for record in map(json.loads, self.path.read_text().splitlines())
                  if record.get("step") == step and "loss" in record]
        return losses[-1] if losses else math.nan

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
