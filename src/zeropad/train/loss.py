"""Token loss with global normalisation (DESIGN.md invariant 5).

Each micro-step contributes sum(token losses) / N, where N is the number of target tokens in the
whole optimizer step (all micro-steps; all ranks once distributed). Summing the micro-step
gradients then gives exactly the gradient of the token mean over the step, however the tokens
were grouped into packs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeropad.pack.collate import IGNORE_INDEX


def token_loss_sum(logits_TV: torch.Tensor, target_ids_T: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the targets, computed in fp32."""
    return F.cross_entropy(logits_TV.float(), target_ids_T, ignore_index=IGNORE_INDEX, reduction="sum")
