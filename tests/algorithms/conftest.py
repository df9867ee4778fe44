"""Per-directory fixtures for the algorithm tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_intra_op_thread(one_thread: None) -> None:
    """Tiny tensors: thread hand-off costs more than it saves. On a loaded 2-core machine the
    default pool made an 8-step local round of a 1x8x8 CNN take ~0.8 s instead of ~7 ms.
    The session's count comes back after each test (``tests/conftest.py``)."""
