"""Preference objectives on the packed path: DPO (sigmoid), SimPO and ORPO over per-document log-prob sums.

A pair's chosen and rejected answers are two documents of one pack (documents 2i and 2i+1), so one varlen
forward gives every answer's log-probability sum: the per-token log-likelihoods of the targets, summed
per document over cu_seqlens. The objective is a loss per pair; the loop divides each pack's sum by the
step's pair count over all micro-steps and ranks, so the step's gradient is that of the mean over pairs,
however the pairs were packed (the preference counterpart of the global token mean, DESIGN.md invariant 5).

Formulas (TRL's definitions; pc, pr: policy log-prob sums of chosen and rejected; rc, rr: the reference's;
nc, nr: their target counts; beta: train.beta; eps: train.label_smoothing):
  dpo    z = beta * ((pc - rc) - (pr - rr)); loss = -(1 - eps) log σ(z) - eps log σ(-z);
         rewards beta (pc - rc), beta (pr - rr)
  simpo  z = beta * (pc/nc - pr/nr) - gamma (train.simpo_gamma); loss as dpo; rewards beta pc/nc, beta pr/nr
  orpo   a = pc/nc, b = pr/nr; log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b));
         loss = -a - beta log σ(log_odds) (the chosen answer's mean NLL plus the odds-ratio term, per pair);
         rewards beta a, beta b
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zeropad.config import Config
from zeropad.data.cache import DEFAULT_CACHE_DIR, _file_fingerprint
from zeropad.data.dataset import split_eval
from zeropad.data.preference import Pair, load_pairs
from zeropad.errors import ConfigError, ZeropadError
from zeropad.pack.collate import IGNORE_INDEX, Pack, collate
from zeropad.pack.loader import PackLoader
from zeropad.pack.planner import plan_packs
from zeropad.parallel import distributed
from zeropad.parallel.sharding import unwrap

OBJECTIVES = ("dpo", "simpo", "orpo")
REFERENCE_CACHE_VERSION = 1
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def collate_pairs(pairs: list[Pair]) -> Pack:
    """The one Pack of these pairs: chosen, rejected, chosen, rejected, ...; their reference log-probs if known."""
    pack = collate([doc for pair in pairs for doc in pair.docs])
    pack.num_pairs = len(pairs)
    if all(pair.ref_logps is not None for pair in pairs):
        pack.ref_logps = torch.tensor([lp for pair in pairs for lp in pair.ref_logps], dtype=torch.float32)
    return pack


def document_logps(logits_TV: torch.Tensor, target_ids_T: torch.Tensor, cu_seqlens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability sum of each document's targets [D] fp32, its target count [D]) from the pack's logits."""
    logp_T = -F.cross_entropy(logits_TV.float(), target_ids_T, ignore_index=IGNORE_INDEX, reduction="none")
    lengths_D = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc_T = torch.repeat_interleave(torch.arange(len(lengths_D), device=logp_T.device), lengths_D,
                                    output_size=logp_T.shape[0])  # known on the host: no device sync
    zeros_D = logp_T.new_zeros(len(lengths_D))
    return zeros_D.index_add(0, doc_T, logp_T), zeros_D.index_add(0, doc_T, (target_ids_T != IGNORE_INDEX).float())


def dpo_losses(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """(loss, chosen reward, rejected reward) per pair: DPO's sigmoid loss, optionally label-smoothed."""
    z = beta * ((pc - rc) - (pr - rr))
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def simpo_losses(pc, pr, nc, nr, beta: float, gamma: float, label_smoothing: float = 0.0):
    a, b = pc / nc, pr / nr
    z = beta * (a - b) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * a.detach(), beta * b.detach()


def orpo_losses(pc, pr, nc, nr, beta: float):
    a, b = pc / nc, pr / nr
    # log(1 - e^x) as log(-expm1(x)): exact where x is close to 0 (a confident answer), where log1p(-exp) is not
    log_odds = (a - b) - (torch.log(-torch.expm1(a)) - torch.log(-torch.expm1(b)))
    return -a - beta * F.logsigmoid(log_odds), beta * a.detach(), beta * b.detach()


@dataclass
class PreferenceObjective:
    kind: str  # one of OBJECTIVES
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    # Summed over the pairs seen since the last `metrics` call: chosen reward, rejected reward, correct, pairs; kept
    # on the device (None: nothing yet), read once per `metrics` call, not once per pack.
    _stats: torch.Tensor | None = None

    @property
    def needs_reference(self) -> bool:
        return self.kind == "dpo"

    def pair_losses(self, logps_D: torch.Tensor, counts_D: torch.Tensor, ref_D: torch.Tensor | None):
        pc, pr, nc, nr = logps_D[0::2], logps_D[1::2], counts_D[0::2], counts_D[1::2]
        if self.kind == "dpo":
            if ref_D is None:
                raise ZeropadError("DPO needs the reference log-probabilities; none were computed for this pack")
            return dpo_losses(pc, pr, ref_D[0::2], ref_D[1::2], self.beta, self.label_smoothing)
        if self.kind == "simpo":
            return simpo_losses(pc, pr, nc, nr, self.beta, self.simpo_gamma, self.label_smoothing)
        return orpo_losses(pc, pr, nc, nr, self.beta)

    def loss_sum(self, model, pack: Pack, autocast) -> torch.Tensor:
        """Sum over the pack's pairs of the pair loss, from one varlen forward; the rewards are tallied."""
        with autocast:
            logits_TV = model(**pack.model_inputs()).logits.flatten(0, 1)  # a view: a free backward
        logps_D, counts_D = document_logps(logits_TV, pack.target_ids[0], pack.cu_seqlens)
        losses, chosen, rejected = self.pair_losses(logps_D, counts_D, pack.ref_logps)
        tally = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                             chosen.new_full((), pack.num_pairs)]).detach().double()  # a fill: no host copy
        self._stats = tally if self._stats is None else self._stats + tally
        return losses.sum()

    def metrics(self, device: torch.device, prefix: str = "") -> dict[str, float]:
        """Mean rewards, margin and accuracy over the pairs since the last call, all ranks; then reset."""
        stats = torch.zeros(4, dtype=torch.float64, device=device) if self._stats is None else self._stats
        chosen, rejected, correct, pairs = distributed.sum_over_ranks(stats).tolist()  # one collective, one read
        self._stats = None
        pairs = max(pairs, 1.0)
        values = (chosen / pairs, rejected / pairs, (chosen - rejected) / pairs, correct / pairs)
        return {prefix + name: value for name, value in zip(METRICS, values)}


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn the model's dropout off, as TRL's preference trainers do by default: the policy is then compared with its
    reference (computed in eval mode) on the same forward, and DPO starts at ln 2. Every nn.Dropout (LoRA's
    included) and the attention dropout transformers' attention modules keep as a float; how many were on."""
    turned_off = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, turned_off = 0.0, turned_off + 1
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            module.attention_dropout, turned_off = 0.0, turned_off + 1
    return turned_off


def build_objective(cfg: Config) -> PreferenceObjective | None:
    if cfg.train.objective == "sft":
        return None
    return PreferenceObjective(cfg.train.objective, cfg.train.beta, cfg.train.label_smoothing, cfg.train.simpo_gamma)


def check_preference(cfg: Config, multimodal: bool) -> None:
    """What the preference objectives do not support (yet), refused before any data is read."""
    objective = cfg.train.objective
    if objective == "sft":
        return
    if multimodal:
        raise ConfigError(f"train.objective={objective} supports text models only for now")
    if cfg.pack.streaming:
        raise ConfigError(f"train.objective={objective}: pack.streaming is not supported; set pack.streaming=false")
    if cfg.parallel.sp_size > 1:
        raise ConfigError(f"train.objective={objective}: parallel.sp_size > 1 is not supported (a pair's documents "
                          "must stay on one rank); use sp_size=1")
    if any(source.format != "auto" for source in cfg.data.sources + cfg.eval.sources):
        raise ConfigError(f"train.objective={objective}: preference records are detected from their keys; "
                          "leave the sources' format at auto")


def prepare_pairs(cfg: Config, tokenizer) -> tuple[PackLoader, list[Pair], object]:
    """(training loader over pairs, eval pairs, data report): the preference counterpart of the SFT data path."""
    common = dict(max_tokens=cfg.pack.max_tokens, seed=cfg.train.seed)
    eval_pairs = load_pairs(cfg.eval.sources, cfg.data, tokenizer, **common)[0] if cfg.eval.sources else []
    pairs, report = load_pairs(cfg.data.sources, cfg.data, tokenizer, **common)
    if cfg.eval.split > 0:
        pairs, held_out = split_eval(pairs, cfg.eval.split, cfg.train.seed)
        eval_pairs += held_out
    return PackLoader(pairs, cfg.pack.max_tokens, cfg.train.seed), eval_pairs, report


def reference_cache_file(cfg: Config, pairs: list[Pair]) -> Path:
    """Where these pairs' reference log-probs are cached: keyed by the starting model (its files, or its config
    and seed when built from scratch), the numerics of the pass and every token and target of the pairs."""
    model = {"config": cfg.model.config, "dtype": cfg.train.dtype, "attn": cfg.model.attn_implementation}
    if cfg.model.path is not None:
        model["files"] = _file_fingerprint(Path(cfg.model.path).expanduser())  # as the loader reads it
    else:
        model["seed"] = cfg.train.seed  # the random init
    digest = hashlib.sha256(json.dumps({"version": REFERENCE_CACHE_VERSION, "model": model}, sort_keys=True,
                                       default=str).encode())
    for pair in pairs:
        for doc in pair.docs:
            digest.update(np.asarray(doc.input_ids, dtype=np.int64).tobytes())
            digest.update(np.packbits(doc.loss_mask).tobytes())
    root = Path(cfg.data.cache_dir or DEFAULT_CACHE_DIR).expanduser()
    return root / "reference" / f"{digest.hexdigest()[:32]}.npy"


@torch.no_grad()
def compute_reference(model, pairs: list[Pair], max_tokens: int, seed: int, device: torch.device,
                      autocast) -> np.ndarray:
    """float32 [P, 2]: each pair's (chosen, rejected) log-prob sums under `model` as it is now, in eval mode and
    with LoRA adapters disabled (the frozen base). Packed as training packs them (same plan), so at step 1 the
    policy's log-probs equal these bit for bit. Every rank runs every pack (FSDP's collectives need that)."""
    out = np.zeros((len(pairs), 2), dtype=np.float32)
    base = unwrap(model)
    adapters = base.disable_adapter() if hasattr(base, "disable_adapter") else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with adapters:
            for plan in plan_packs([len(pair) for pair in pairs], max_tokens, seed=seed):
                pack = collate_pairs([pairs[i] for i in plan]).to(device)
                with autocast:
                    logits_TV = model(**pack.model_inputs()).logits.flatten(0, 1)  # a view: a free backward
                logps_D = document_logps(logits_TV, pack.target_ids[0], pack.cu_seqlens)[0]
                out[plan] = logps_D.view(-1, 2).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def attach_reference(cfg: Config, model, pairs: list[Pair], device: torch.device, autocast) -> Path | None:
    """Give every pair its reference log-probs: from the on-disk cache, or computed in a first pass and cached.
    Pass the training pairs as the loader holds them (weighted copies included), so the pass packs them as
    training does."""
    if not pairs:
        return None
    say = print if distributed.is_main() else (lambda _message: None)
    path = reference_cache_file(cfg, pairs)
    logps = _read(path, len(pairs))
    if logps is None:
        say(f"zeropad: reference log-probs: first pass over {len(pairs):,} pairs")
        logps = compute_reference(model, pairs, cfg.pack.max_tokens, cfg.train.seed, device, autocast)
        if distributed.is_main():
            _write(path, logps)
    else:
        say(f"zeropad: reference log-probs of {len(pairs):,} pairs from {path}")
    for pair, (chosen, rejected) in zip(pairs, logps.tolist()):
        pair.ref_logps = (chosen, rejected)
    return path


def _read(path: Path, num_pairs: int) -> np.ndarray | None:
    try:
        logps = np.load(path)
    except (OSError, ValueError):
        return None  # absent or damaged: recomputed, never trusted
    return logps if logps.shape == (num_pairs, 2) else None


def _write(path: Path, logps: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, logps)
            os.replace(tmp, path)  # readers never see a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        raise ZeropadError(f"cannot write the reference log-prob cache in {path.parent}: {err}; "
                           "set data.cache_dir to a writable folder") from None
