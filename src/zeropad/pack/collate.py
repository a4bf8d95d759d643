"""Samples -> Pack: one flat sequence of documents with per-document positions and targets.

The packing contract (DESIGN.md invariants 1-2): position_ids restart at 0 in each document,
targets are shifted inside each document (the last token of a document predicts nothing), and
`varlen_metadata` is the one function that turns document lengths into cu_seqlens/max_seqlen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zeropad.data.chat import Sample

IGNORE_INDEX = -100


def varlen_metadata(doc_lengths: list[int]) -> tuple[torch.Tensor, int]:
    """Document lengths -> (cu_seqlens int32 [n_docs+1], max_seqlen), computed on the host once per pack."""
    cu = np.zeros(len(doc_lengths) + 1, dtype=np.int32)
    np.cumsum(doc_lengths, out=cu[1:])
    return torch.from_numpy(cu), int(max(doc_lengths))


def varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """The varlen keyword arguments transformers forwards to the registered attention function."""
    return dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)


@dataclass
class Pack:
    input_ids: torch.Tensor  # int64 [1, T]
    position_ids: torch.Tensor  # int64 [1, T], restarting at 0 per document
    target_ids: torch.Tensor  # int64 [1, T]: next token inside the document, or IGNORE_INDEX
    cu_seqlens: torch.Tensor  # int32 [n_docs+1]
    max_seqlen: int
    doc_lengths: list[int]
    num_targets: int

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def to(self, device: torch.device | str) -> Pack:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Pack(move(self.input_ids), move(self.position_ids), move(self.target_ids), move(self.cu_seqlens),
                    self.max_seqlen, self.doc_lengths, self.num_targets)

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face causal LM: no attention mask, varlen kwargs instead."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    **varlen_kwargs(self.cu_seqlens, self.max_seqlen))


def collate(samples: list[Sample]) -> Pack:
    assert samples, "a pack holds at least one document"
    lengths = [len(s) for s in samples]
    ids = np.concatenate([s.input_ids for s in samples]).astype(np.int64)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    targets = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    offset = 0
    for s, n in zip(samples, lengths):
        # token t predicts token t+1 of the same document, where that token is a training target
        nxt = s.input_ids[1:].astype(np.int64)
        targets[offset : offset + n - 1] = np.where(s.loss_mask[1:], nxt, IGNORE_INDEX)
        offset += n
    cu_seqlens, max_seqlen = varlen_metadata(lengths)
    return Pack(
        input_ids=torch.from_numpy(ids)[None],
        position_ids=torch.from_numpy(positions)[None],
        target_ids=torch.from_numpy(targets)[None],
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        doc_lengths=lengths,
        num_targets=int((targets != IGNORE_INDEX).sum()),
    )
