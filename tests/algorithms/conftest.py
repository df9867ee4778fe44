"""Per-directory fixtures for the algorithm tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_intra_op_thread() -> Iterator[None]:
    """Tiny tensors: thread hand-off costs more than it saves. On a loaded 2-core machine the
    default pool made an 8-step local round of a 1x8x8 CNN take ~0.8 s instead of ~7 ms.
    Restored afterwards so other test directories are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
