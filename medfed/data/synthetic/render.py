"""Small numeric pieces shared by the synthetic generators (in-place where it saves memory)."""

from __future__ import annotations

import numpy as np


def sigmoid_(x: np.ndarray) -> np.ndarray:
    """Logistic function, in place on the (temporary) argument: 1/2 + tanh(x/2)/2."""
    x *= 0.5
    np.tanh(x, out=x)
    x *= 0.5
    x += 0.5
    return x


def blend(a: np.ndarray, b: np.ndarray | float, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t
