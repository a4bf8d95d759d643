import numpy as np
import torch

from zeropad.data.chat import Sample
from zeropad.pack.collate import IGNORE_INDEX, collate, varlen_metadata


def test_varlen_metadata():
    cu, max_len = varlen_metadata([3, 1, 5])
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 9]
    assert max_len == 5


def test_collate_positions_restart_and_targets_stay_inside_documents():
    a = Sample(np.array([10, 11, 12], dtype=np.int32), np.array([False, True, True]))
    b = Sample(np.array([20, 21, 22, 23], dtype=np.int32), np.array([False, False, True, True]))
    pack = collate([a, b])
    assert pack.input_ids.tolist() == [[10, 11, 12, 20, 21, 22, 23]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    ignore = IGNORE_INDEX
    # the last token of a document never predicts the next document's first token
    assert pack.target_ids.tolist() == [[11, 12, ignore, ignore, 22, 23, ignore]]
    assert pack.num_targets == 4
    assert pack.num_tokens == 7
    assert pack.cu_seqlens.tolist() == [0, 3, 7]
    inputs = pack.model_inputs()
    assert "attention_mask" not in inputs
    assert inputs["max_length_q"] == 4
