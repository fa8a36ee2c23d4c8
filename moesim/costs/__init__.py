"""Torch-free cost arithmetic shared by measure, calibrate and simulate.

``work``: bytes and FLOPs each op moves or computes (one definition for the
benchmark's achieved-bandwidth columns, the fits and the simulator).
``curves``: evaluation of fitted curves. ``model``: :class:`CostModel`, the
lookup the simulator calls, over a spec or a calibrated hardware profile.
"""

from moesim.costs.curves import eval_curve
from moesim.costs.model import CostModel

__all__ = ["CostModel", "eval_curve"]
