"""K-fold cross-validation: fit on part of the measured shapes, price the rest.

Folds are the shapes (rows after strategy selection) stratified by measured
time, so every reported error is on shapes the fit never saw, spread over the
measured range.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from moesim.calibrate.families import Family, Parts
from moesim.config.hardware import FamilyError, HardwareProfile
from moesim.costs import CostModel

#: fewest shapes a family needs to be fitted and cross-validated
MIN_ROWS = 2
#: folds (fewer when there are fewer shapes: leave-one-out)
FOLDS = 5

CostModelFor = Callable[[Parts], CostModel]


def fold_ids(order_key: NDArray[np.float64], folds: int = FOLDS) -> NDArray[np.int64]:
    """Fold of each row: rows sorted by ``order_key`` (the measured time) dealt round-robin.

    Every fold then holds shapes spread over the whole measured range, each with
    neighbours on both sides in the training part (the two ends excepted), so
    the error is that of predicting between and just beyond measured shapes.
    """
    n = order_key.size
    k = max(2, min(folds, n))
    ids = np.empty(n, dtype=np.int64)
    ids[np.argsort(order_key, kind="stable")] = np.arange(n) % k
    return ids


def heldout_predictions(
    family: Family,
    rows: pd.DataFrame,
    noise: float,
    base: HardwareProfile,
    cost_model: CostModelFor,
    *,
    folds: int = FOLDS,
) -> NDArray[np.float64]:
    """Seconds predicted for each row by a fit that did not see it (NaN: never held out).

    With ``family.group`` set, folds are dealt within each group and a group's
    only row is never held out (a router kind measured once has no other shape
    of its kind to be predicted from).
    """
    ids = grouped_fold_ids(rows, family.group, folds)
    pred = np.full(len(rows), np.nan)
    for f in np.unique(ids[ids >= 0]):
        test = ids == f
        parts = family.fit(rows[~test].reset_index(drop=True), noise, base)
        pred[test] = family.predict(cost_model(parts), rows[test], base)
    return pred


def grouped_fold_ids(rows: pd.DataFrame, group: str | None, folds: int) -> NDArray[np.int64]:
    """:func:`fold_ids` over all rows, or within each ``group``; -1 = always trained on."""
    t = rows["median_s"].to_numpy(dtype=np.float64)
    if group is None:
        return fold_ids(t, folds)
    ids = np.full(len(rows), -1, dtype=np.int64)
    for members in rows.groupby(group).indices.values():
        idx = np.asarray(members, dtype=np.int64)
        if idx.size >= MIN_ROWS:
            ids[idx] = fold_ids(t[idx], folds)
    return ids


def family_error(pred_s: NDArray[np.float64], measured_s: NDArray[np.float64]) -> FamilyError:
    """Mean and worst absolute percentage error (fractions) over rows with a prediction."""
    held = np.isfinite(pred_s)
    ape = np.abs(pred_s[held] / measured_s[held] - 1.0)
    if ape.size == 0:
        return FamilyError(mape=0.0, max_ape=0.0, n=0)
    return FamilyError(
        mape=float(f"{ape.mean():.4g}"), max_ape=float(f"{ape.max():.4g}"), n=int(ape.size)
    )
