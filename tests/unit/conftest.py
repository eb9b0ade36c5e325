"""Fixtures shared by the unit tests."""
from __future__ import annotations

from dataclasses import dataclass

import pytest


@pytest.fixture
def one_torch_thread():
    """One torch thread: multi-threaded CPU kernels may sum in another order run to run, and
    the learner tests compare numbers (and the machine's cores are shared with benchmarks)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Msg:
    """A consumed record as the agents' handlers read it (stream/decide.py ``Message``)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None
