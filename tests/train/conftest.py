"""Fixtures for the train tests."""

import pytest
import torch

from tinyrun import run_config


@pytest.fixture
def tiny_run(tmp_path):
    """tiny_run(name, **sections) -> config dict of a run writing to tmp_path/name.

    One intra-op thread while the test runs: a 0.1M-parameter model gains nothing from more, and
    on a shared machine extra threads contend (measured 18 s vs 2.8 s for an 8-step run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda name="out", **sections: run_config(tmp_path, tmp_path / name, **sections)
    torch.set_num_threads(threads)
