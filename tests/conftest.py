"""Shared fixtures."""

import os
import sys
from pathlib import Path

import pytest

# test modules import helpers such as tinymodels.py from this folder
sys.path.insert(0, str(Path(__file__).parent))
# nothing is downloaded in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread: toy models gain nothing from more, and on a shared machine extra threads contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
