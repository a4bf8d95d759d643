"""Samples -> the one Pack: one flat sequence of documents with per-document positions and targets.

The packing contract (DESIGN.md invariants 1-2), for text, images, videos and VQ images alike: position_ids
restart at 0 in each document, targets are shifted inside each document (`shift_targets`, the one place: the last
token of a document predicts nothing), `varlen_metadata` is the one function that turns document lengths into
cu_seqlens/max_seqlen, and each document's media tensors are concatenated in document order. What differs per
model family is only the position rule (`positions`: Qwen's 3-axis mRoPE, from zeropad.model.vlm.position_rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from zeropad.data.chat import Sample

IGNORE_INDEX = -100

# One document -> its positions, [1, n] or [3, 1, n], starting at 0; None means 1-D 0..n-1.
PositionRule = Callable[[Sample], torch.Tensor]


def varlen_metadata(doc_lengths: list[int]) -> tuple[torch.Tensor, int]:
    """Document lengths -> (cu_seqlens int32 [n_docs+1], max_seqlen), computed on the host once per pack."""
    cu = np.zeros(len(doc_lengths) + 1, dtype=np.int32)
    np.cumsum(doc_lengths, out=cu[1:])
    return torch.from_numpy(cu), int(max(doc_lengths))


def varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int, cu_seqlens_cpu: torch.Tensor | None = None) -> dict:
    """The varlen keyword arguments transformers forwards to the registered attention function. `cu_seq_lens_cpu`:
    the same boundaries on the host (default: `cu_seqlens` itself when it is there), for the per-document attention
    paths, which loop over them in Python: read from a GPU tensor, that would be a device sync in every layer."""
    if cu_seqlens_cpu is None and cu_seqlens.device.type == "cpu":
        cu_seqlens_cpu = cu_seqlens
    return dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen,
                cu_seq_lens_cpu=cu_seqlens_cpu)


def shift_targets(sample: Sample) -> np.ndarray:
    """int64 [n]: token t predicts token t+1 of the same document where that token is a target."""
    ids = np.asarray(sample.input_ids).astype(np.int64)
    targets = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = np.where(np.asarray(sample.loss_mask)[1:], ids[1:], IGNORE_INDEX)
    return targets


@dataclass
class Pack:
    input_ids: torch.Tensor  # int64 [1, T]
    position_ids: torch.Tensor  # int64 [1, T] or [3, 1, T] (mRoPE), restarting at 0 per document
    target_ids: torch.Tensor  # int64 [1, T]: next token inside the document, or IGNORE_INDEX
    cu_seqlens: torch.Tensor  # int32 [n_docs+1]
    max_seqlen: int
    doc_lengths: list[int]  # host data, like max_seqlen: what the step needs of the pack's shape never reads the device
    num_targets: int
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # all documents' media, in document order
    # Preference training (train/preference.py): documents 2i and 2i+1 are pair i's chosen and rejected answers.
    num_pairs: int = 0
    ref_logps: torch.Tensor | None = None  # float32 [n_docs]: the reference model's log-probability sums (DPO)
    # cu_seqlens as collated, on the host; it stays there when the pack moves to a device (varlen_kwargs)
    cu_seqlens_cpu: torch.Tensor | None = None
    # int64 [num_targets]: the positions whose next token is a target, where the loss runs the LM head. Derived
    # from target_ids whenever they are on the host (so `dataclasses.replace` of the targets renews it); a pack
    # on a device carries the moved copy, so the loss never finds them with a device sync.
    target_rows: torch.Tensor | None = None

    def __post_init__(self):
        if self.cu_seqlens_cpu is None and self.cu_seqlens.device.type == "cpu":
            self.cu_seqlens_cpu = self.cu_seqlens
        if self.target_ids.device.type == "cpu":
            self.target_rows = (self.target_ids[0] != IGNORE_INDEX).nonzero()[:, 0]

    @property
    def num_tokens(self) -> int:
        return sum(self.doc_lengths)

    def to(self, device: torch.device | str) -> Pack:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Pack:
        """The pack in page-locked host memory, so that `to(cuda)` copies it without blocking the host."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Pack:
        # the host copy of the boundaries stays where it is (varlen_kwargs)
        return Pack(fn(self.input_ids), fn(self.position_ids), fn(self.target_ids), fn(self.cu_seqlens),
                    self.max_seqlen, self.doc_lengths, self.num_targets,
                    {name: fn(t) for name, t in self.media.items()}, self.num_pairs,
                    None if self.ref_logps is None else fn(self.ref_logps), self.cu_seqlens_cpu,
                    fn(self.target_rows))

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face model's forward: no attention mask, varlen kwargs instead."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    **varlen_kwargs(self.cu_seqlens, self.max_seqlen, self.cu_seqlens_cpu), **self.media)


def collate(samples: list[Sample], positions: PositionRule | None = None) -> Pack:
    assert samples, "a pack holds at least one document"
    lengths = [len(s) for s in samples]
    ids = np.concatenate([np.asarray(s.input_ids) for s in samples]).astype(np.int64)
    targets = np.concatenate([shift_targets(s) for s in samples])
    if positions is None:
        position_ids = torch.from_numpy(np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]))[None]
    else:
        position_ids = torch.cat([positions(s) for s in samples], dim=-1)
    names = dict.fromkeys(name for s in samples for name in s.media)  # first-seen order
    media = {name: torch.cat([s.media[name] for s in samples if name in s.media]) for name in names}
    cu_seqlens, max_seqlen = varlen_metadata(lengths)
    return Pack(
        input_ids=torch.from_numpy(ids)[None],
        position_ids=position_ids,
        target_ids=torch.from_numpy(targets)[None],
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        doc_lengths=lengths,
        num_targets=int((targets != IGNORE_INDEX).sum()),
        media=media,
    )
