"""The exactness check: a packed forward/backward equals the per-document unpadded forward/backward.

The reference is the same Hugging Face model with transformers' own attention, one document at a
time, no padding. `check_exactness` (used by `zeropad verify MODEL_DIR` and the test suite) makes
the check hard to fool and quiet when nothing is wrong:

- float64 on CPU, so rounding noise is ~1e-15 relative instead of fp32's ~1e-7, and errors are
  RELATIVE per tensor (max |packed - ref| / max |ref|): summed-loss gradients reach tens, where an
  absolute 1e-5 is a few fp32 ulps.
- attention driven into the range trained models reach: random weights give logits of order 1, which
  never reach a softcap; the query side of every attention is scaled so the largest logit is
  `LOGIT_TARGET` (3x the softcap when there is one), and a document longer than every sliding window
  is packed.
- a negative control: the same packed pass with one document boundary moved by one token (a single
  cross-document leak) must FAIL; a harness that cannot see that leak proves nothing.

Tolerances (relative, per tensor). In float64 the math is exact to ~1e-15, except where transformers
keeps float32 islands inside a float64 model: Gemma's RMSNorm and DeepSeek's router compute in float32,
and their weight gradients are float32 sums whose order differs between one pack and one document at
a time (measured up to 2.4e-7). FLOAT64_TOLERANCE = 1e-6 sits above that. The reference attention is
transformers' SDPA where it implements the family's attention, and eager where only eager does
(softcap, sinks); most families' eager rounds attention probabilities to float32 (`softmax(...,
dtype=torch.float32)`), which with the softcap active reaches 5.8e-6 on Gemma2, so an eager reference
gets EAGER_TOLERANCE = 1e-4. Real bugs are far above both: measured on the tiny models, an ignored
softcap 0.45, ignored sinks 0.75 (and no sink gradient at all), a window one token too wide ~1, a
one-token leak ~1, and even a 1% error in the attention scale 6e-3.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

from zeropad.data.chat import Sample
from zeropad.errors import ConfigError
from zeropad.family import image_targets, media_family, random_pixels
from zeropad.model.attention import ATTN_NAME, _no_mask, family, varlen_attention_forward
from zeropad.model.load import emu3_attn_implementation
from zeropad.model.support import check_packable
from zeropad.model.vlm import packed_attn_implementation, position_rule, unpacked_inputs
from zeropad.pack.collate import IGNORE_INDEX, PositionRule, collate, shift_targets, varlen_kwargs, varlen_metadata

TOLERANCE = 1e-5  # relative, for fp32 comparisons (compare_passes' default)
FLOAT64_TOLERANCE = 1e-6
EAGER_TOLERANCE = 1e-4
LOGIT_TARGET = 30.0  # largest attention logit verify drives to (trained LMs reach tens)
_PROBE = "zeropad_probe"

Passes = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class ExactnessReport:
    doc_lengths: list[int]
    max_logit_diff: float  # absolute
    max_grad_diff: float  # absolute, over all gradient tensors
    worst_param: str  # the gradient tensor with the largest relative error
    tolerance: float = TOLERANCE  # on the relative errors
    logit_rel: float = 0.0
    grad_rel: dict[str, float] = field(default_factory=dict)
    reference_attn: str = "eager"
    setup: str = ""  # what verify did to the model to exercise attention
    control: ExactnessReport | None = None  # the negative control (a one-token leak); must fail

    @property
    def max_rel(self) -> float:
        return max([self.logit_rel, *self.grad_rel.values()])

    @property
    def exact(self) -> bool:
        return self.max_rel <= self.tolerance

    @property
    def passed(self) -> bool:
        """Exact, and (when a negative control ran) the control failed as it must."""
        return self.exact and (self.control is None or not self.control.exact)

    def worst_tensors(self, n: int = 5) -> list[tuple[str, float]]:
        ranked = sorted({"logits": self.logit_rel, **self.grad_rel}.items(), key=lambda kv: -kv[1])
        return ranked[:n]

    def _line(self) -> str:
        worst = max(self.grad_rel, key=self.grad_rel.get) if self.grad_rel else "-"
        return (f"max relative error: logits {self.logit_rel:.2e}, gradients {self.grad_rel.get(worst, 0.0):.2e} "
                f"(worst: {worst}); tolerance {self.tolerance:.0e}")

    def summary(self) -> str:
        lines = [f"{'PASS' if self.passed else 'FAIL'}: {len(self.doc_lengths)} documents {self.doc_lengths} in one "
                 f"pack vs each alone ({self.reference_attn} attention); {self._line()}"]
        if self.setup:
            lines.append(f"  attention exercised: {self.setup}")
        if self.control is not None:
            verdict = "failed, as it must" if not self.control.exact else "PASSED: the check cannot see a leak"
            lines.append(f"  negative control (one document boundary moved by one token) {verdict}: "
                         f"{self.control._line()}")
        return "\n".join(lines)


def random_documents(vocab_size: int, doc_lengths: list[int], seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(rng.integers(0, vocab_size, n, dtype=np.int32), np.ones(n, dtype=bool)) for n in doc_lengths
    ]


def parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def leaky_lengths(doc_lengths: list[int]) -> list[int]:
    """The first boundary whose next document has >= 2 tokens, moved one token later: that token
    joins the previous document (one cross-document leak, positions and targets unchanged)."""
    for i in range(1, len(doc_lengths)):
        if doc_lengths[i] >= 2:
            return [*doc_lengths[: i - 1], doc_lengths[i - 1] + 1, doc_lengths[i] - 1, *doc_lengths[i + 1:]]
    raise ConfigError(f"the negative control needs a second document of >= 2 tokens, got lengths {doc_lengths}")


def packed_forward_backward(model, docs: list[Sample], positions: PositionRule | None = None, leak: bool = False
                            ) -> tuple[torch.Tensor, dict]:
    """Logits [T, V] of the one packed sequence (the family's position rule) and the gradients of its summed
    token loss; with `leak`, attention sees the boundaries of `leaky_lengths` (the negative control)."""
    model.zero_grad(set_to_none=True)
    pack = collate(docs, positions).to(next(model.parameters()).device)
    inputs = _cast(pack.model_inputs(), model.dtype)
    if leak:
        cu, max_len = varlen_metadata(leaky_lengths(pack.doc_lengths))
        inputs.update(varlen_kwargs(cu.to(pack.input_ids.device), max_len))
    logits = model(**inputs).logits[0]
    F.cross_entropy(logits.float(), pack.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum").backward()
    return logits.detach(), parameter_grads(model)


def reference_forward_backward(model, docs: list[Sample]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each document alone, unpadded, with its own media and the model's own positions and mask; gradients
    summed over documents."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    all_logits = []
    for doc in docs:
        inputs = {name: t.to(device) for name, t in unpacked_inputs(model, doc).items()}
        inputs = {name: t.to(model.dtype) if t.is_floating_point() else t for name, t in inputs.items()}
        logits = model(**inputs).logits[0]
        targets = torch.from_numpy(shift_targets(doc)).to(device)
        F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
        all_logits.append(logits.detach())
    return torch.cat(all_logits), parameter_grads(model)


def _relative(diff: float, scale: float) -> float:
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0.0 else math.inf


def _report(ref, packed, doc_lengths, tolerance, reference_attn) -> ExactnessReport:
    (ref_logits, ref_grads), (packed_logits, packed_grads) = ref, packed
    abs_diff, rel = {}, {}
    for name in ref_grads.keys() | packed_grads.keys():
        if name not in ref_grads or name not in packed_grads:  # reached by one pass only: no comparison holds
            abs_diff[name], rel[name] = math.inf, math.inf
            continue
        abs_diff[name] = (packed_grads[name] - ref_grads[name]).abs().max().item()
        rel[name] = _relative(abs_diff[name], ref_grads[name].abs().max().item())
    # Logits a model masks to the dtype's minimum (Chameleon's image codes) carry no signal and would make the
    # relative scale ~1e308; they are compared as a mask, the rest as values.
    floor = torch.finfo(ref_logits.dtype).min / 2
    real = ref_logits > floor
    if torch.equal(real, packed_logits > floor):
        logit_diff = (packed_logits - ref_logits)[real].abs().max().item()
        logit_scale = ref_logits[real].abs().max().item()
    else:
        logit_diff, logit_scale = math.inf, 1.0
    worst = max(rel, key=rel.get) if rel else "-"
    return ExactnessReport(
        doc_lengths=list(doc_lengths), max_logit_diff=logit_diff, max_grad_diff=max(abs_diff.values(), default=0.0),
        worst_param=worst, tolerance=tolerance, logit_rel=_relative(logit_diff, logit_scale),
        grad_rel=rel, reference_attn=reference_attn,
    )


def compare_passes(model, reference: Passes, packed: Passes, packed_attn, doc_lengths: list[int],
                   tolerance: float = TOLERANCE, restore_attn=None, reference_attn: str = "eager",
                   control: Passes | None = None) -> ExactnessReport:
    """Runs `reference()` with `reference_attn` and `packed()` (and `control()`, the negative control,
    if given) with `packed_attn` on the same weights, each returning (logits, gradients), and reports
    relative errors per tensor. The attention implementation is then set to `restore_attn`
    (default: what it was)."""
    was_training = model.training
    restore_attn = restore_attn or model.config._attn_implementation
    model.eval()  # no dropout, so both passes see the same function
    try:
        model.set_attn_implementation(reference_attn)
        ref = reference()
        model.set_attn_implementation(packed_attn)
        report = _report(ref, packed(), doc_lengths, tolerance, reference_attn)
        if control is not None:
            report.control = _report(ref, control(), doc_lengths, tolerance, reference_attn)
    finally:
        model.set_attn_implementation(restore_attn)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return report


@dataclass
class _Probe:
    """What the model's attention calls pass, recorded from one packed forward."""

    max_logit: dict[torch.nn.Module, float] = field(default_factory=dict)
    windows: set[int] = field(default_factory=set)
    softcaps: set[float] = field(default_factory=set)
    sinks: bool = False

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        self.max_logit[module] = (query @ k.transpose(2, 3)).abs().max().item() * scaling
        if kwargs.get("sliding_window") is not None:
            self.windows.add(int(kwargs["sliding_window"]))
        if kwargs.get("softcap") is not None:
            self.softcaps.add(float(kwargs["softcap"]))
        self.sinks |= kwargs.get("s_aux") is not None
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)


def packed_attn(model, name: str = ATTN_NAME):
    """The attention the packed path sets: `name` for the language model, a stock backend for a vision tower."""
    family_ = media_family(model.config)
    if image_targets(model.config) is not None:  # Emu3: its VQ model keeps a stock (bidirectional) attention
        return emu3_attn_implementation(name)
    if family_ is None or family_.fixed_image_tokens is not None:
        return name
    return {**packed_attn_implementation(), "text_config": name}


def _probe(model, docs: list[Sample], positions: PositionRule | None) -> _Probe:
    probe = _Probe()
    AttentionInterface.register(_PROBE, probe)
    AttentionMaskInterface.register(_PROBE, _no_mask)
    model.set_attn_implementation(packed_attn(model, _PROBE))
    try:
        with torch.no_grad():
            model(**_cast(collate(docs, positions).to(next(model.parameters()).device).model_inputs(), model.dtype))
    finally:
        model.set_attn_implementation(packed_attn(model))
    return probe


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    """Pixel values in the model's dtype (float64 under verify)."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _query_side(attn: torch.nn.Module) -> torch.nn.Module:
    """The last module on the query path before RoPE: scaling its output scales every logit
    (a q_norm would undo a scaled q_proj)."""
    for name in ("q_norm", "q_b_proj", "q_proj"):
        if isinstance(getattr(attn, name, None), torch.nn.Module):
            return getattr(attn, name)
    raise ConfigError(f"verify cannot drive the attention logits of {family(attn)}: no q_norm, q_b_proj or q_proj")


def _drive_logits(probe: _Probe, target: float) -> list:
    """Forward hooks (removed by the caller) scaling each attention's queries so its largest logit
    reaches `target`; attention already beyond it is left alone."""
    handles = []
    for attn, peak in probe.max_logit.items():
        factor = max(1.0, target / max(peak, 1e-6))
        handles.append(_query_side(attn).register_forward_hook(lambda m, i, out, f=factor: out * f))
    return handles


def check_documents(model, docs: list[Sample], tolerance: float | None = None, dtype: torch.dtype = torch.float64,
                    logit_target: float | None = None, control: bool = True, attn_name: str = ATTN_NAME,
                    window_doc: Callable[[int], Sample] | None = None) -> ExactnessReport:
    """The one harness, for every family: `docs` packed with the family's position rule and attention
    (`attn_name` for the language model: a registered variant, e.g. a deliberately broken one in the tests)
    against each document alone on the same weights, in `dtype` (a copy unless the model already is), with
    attention logits driven to `logit_target` (default LOGIT_TARGET, or 3x the softcap), a document longer than
    every sliding window (`window_doc(n)` makes one of n tokens) and the negative control. `tolerance` defaults
    by reference (see the module docstring)."""
    check_packable(model.config)
    if any(p.dtype != dtype for p in model.parameters()):
        model = copy.deepcopy(model).to(dtype)
    if {getattr(c, "_experts_implementation", None) for c in (model.config, model.config.get_text_config())} - {
            None, "eager"}:
        model.set_experts_implementation("eager")  # grouped_mm kernels take no float64
    model.eval()
    positions = position_rule(model)
    probe = _probe(model, docs, positions)
    doc_lengths = [len(d) for d in docs]
    if probe.windows and max(doc_lengths) <= max(probe.windows) and window_doc is not None:
        docs = [*docs, window_doc(max(probe.windows) + 5)]
        doc_lengths = [len(d) for d in docs]
    # HF's sdpa refuses softcap and drops sinks: only eager computes those families' attention
    reference_attn = "eager" if probe.softcaps or probe.sinks else "sdpa"
    if tolerance is None:
        tolerance = EAGER_TOLERANCE if reference_attn == "eager" else FLOAT64_TOLERANCE
    target = logit_target or (3 * max(probe.softcaps) if probe.softcaps else LOGIT_TARGET)
    handles = _drive_logits(probe, target)
    attn = packed_attn(model, attn_name)
    try:
        report = compare_passes(
            model, lambda: reference_forward_backward(model, docs),
            lambda: packed_forward_backward(model, docs, positions), attn, doc_lengths, tolerance,
            restore_attn=packed_attn(model), reference_attn=reference_attn,
            control=(lambda: packed_forward_backward(model, docs, positions, leak=True)) if control else None)
    finally:
        for handle in handles:
            handle.remove()
    features = [f"largest logit driven to {target:g} in {len(probe.max_logit)} attention layers"]
    if probe.softcaps:
        features.append(f"softcap {sorted(probe.softcaps)}")
    if probe.windows:
        features.append(f"sliding windows {sorted(probe.windows)} < longest document {max(doc_lengths)}")
    if probe.sinks:
        features.append("attention sinks")
    report.setup = f"{', '.join(features)}; {str(dtype).removeprefix('torch.')}"
    return report


def check_exactness(model, doc_lengths: list[int], seed: int = 0, tolerance: float | None = None,
                    dtype: torch.dtype = torch.float64, logit_target: float | None = None,
                    control: bool = True, packed_attn: str = ATTN_NAME) -> ExactnessReport:
    """`check_documents` on random documents of `doc_lengths`; for a multimodal model every other document
    carries images (`media_documents`)."""
    vocab = model.config.get_text_config().vocab_size
    rng = np.random.default_rng(seed)
    docs = (media_documents(model, doc_lengths, rng) if media_family(model.config) is not None
            else random_documents(vocab, doc_lengths, seed))
    return check_documents(model, docs, tolerance, dtype, logit_target, control, packed_attn,
                           window_doc=lambda n: random_documents(vocab, [n], seed + 1)[0])


def media_documents(model, doc_lengths: list[int], rng: np.random.Generator) -> list[Sample]:
    """Random documents of `doc_lengths` text tokens for a multimodal model; every even-numbered one has an image
    (random pixels in the layout the family's vision side takes) in the middle, of a different grid each time.
    The image's tokens are not targets."""
    config = model.config
    family = media_family(config)
    special = [family.image_token_id, family.vision_start_token_id, family.vision_end_token_id,
               family.video_token_id]
    docs = []
    for i, n in enumerate(doc_lengths):
        text = rng.integers(0, config.get_text_config().vocab_size, max(n, 2), dtype=np.int64)
        text[np.isin(text, special)] = min(set(range(len(special) + 1)) - set(special))  # plain text only
        if i % 2:
            docs.append(Sample(text, np.ones(len(text), dtype=bool)))
            continue
        grid = (1, 2 * family.merge_size, 2 * family.merge_size * (1 + i // 2 % 3))
        pixels = random_pixels(config, family, grid, rng)
        n_image = family.num_image_tokens(grid)
        marker = [family.vision_start_token_id, *[family.image_token_id] * n_image, family.vision_end_token_id]
        half = len(text) // 2
        ids = np.concatenate([text[:half], marker, text[half:]])
        is_target = np.ones(len(ids), dtype=bool)
        is_target[half:half + len(marker)] = False
        media = {"pixel_values": pixels}
        if family.fixed_image_tokens is None:
            media["image_grid_thw"] = torch.tensor([grid])
        docs.append(Sample(ids, is_target, media))
    return docs
