"""Evaluate :class:`moesim.config.hardware.Curve` points: linear in log(x), flat outside."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moesim.config.hardware import Curve


def eval_curve(curve: Curve, x: ArrayLike) -> NDArray[np.float64]:
    """``curve.y`` interpolated at ``x`` (same shape), linear in ``log x``, clamped."""
    xs = np.log(np.asarray(curve.x, dtype=np.float64))
    ys = np.asarray(curve.y, dtype=np.float64)
    xq = np.log(np.maximum(np.asarray(x, dtype=np.float64), 1e-30))
    return np.interp(xq, xs, ys)
