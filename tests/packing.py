"""Small helpers over the one Pack for the multimodal tests."""

import numpy as np
import torch

from zeropad.model.vlm import position_rule
from zeropad.pack.collate import collate


def pack_docs(model, docs):
    """The one Pack, with the family's position rule, as training builds it."""
    return collate(docs, position_rule(model))


def n_images(doc) -> int:
    """Images of a document: grid rows (vision towers) or pixel rows (early fusion: one per image)."""
    media = doc.media
    return len(media["image_grid_thw"] if "image_grid_thw" in media else media.get("pixel_values", ()))


def n_videos(doc) -> int:
    return len(doc.media.get("video_grid_thw", ()))


def same_doc(a, b) -> bool:
    """Equal tokens, targets and media, tensor for tensor."""
    return (np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
            and a.media.keys() == b.media.keys() and all(torch.equal(a.media[k], b.media[k]) for k in a.media))
