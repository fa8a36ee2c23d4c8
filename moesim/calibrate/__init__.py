"""Calibration: fit cost models to ``moesim bench`` results (torch-free).

``calibrate(paths, base=profile)`` reads results files, fits one cost line per
op family, reports each family's held-out error and returns a calibrated
:class:`~moesim.config.hardware.HardwareProfile`; ``write_profile`` saves it
as YAML (atomically). :class:`moesim.costs.CostModel` prices the profile, and
the held-out errors are computed through that same CostModel.

Families (see :mod:`moesim.calibrate.families`):

* ``gating`` (per router kind, ``gating.<kind>``), ``permute``, ``unpermute``,
  ``regroup`` (EP chunk sort), ``copy``: ``latency + bytes / bandwidth(bytes)``;
  gating adds the router GEMM's FLOPs at a fitted rate (``MemoryOpFit.tflops``).
* ``experts``: ``latency + sum over experts with tokens of (per_expert +
  flops_e / tflops(flops_e))``, so skew, padding and empty experts are priced
  from any tokens-per-expert vector; ``gemm`` (dense, roofline suite):
  ``latency + flops / tflops(flops)``.
* ``alltoall`` per tier: ``latency + bytes / bandwidth(bytes)`` with bytes a
  rank sends to the other ranks (CPU loopback ranks are the scaleup tier).

Choices: each curve prices the fastest measured dropless strategy per shape
(``calibration.strategies`` counts the winners). Knots are log-spaced, at
most two per decade, and their number (and whether latency is fitted or
left at the base profile's spec latency) is picked by the small-sample
Akaike criterion; the fit minimises relative error with a soft-L1 loss at the
measured timing noise (:mod:`moesim.calibrate.fit`). Errors are K-fold
(5, or leave-one-out) over shapes stratified by measured time
(:mod:`moesim.calibrate.crossval`). A family with fewer than 2 shapes is not
fitted: it falls back to spec values and ``calibration.fallbacks`` says so
(``strict=True`` makes that an error naming the suites to run).
"""

from moesim.calibrate.families import FAMILIES
from moesim.calibrate.profile import CalibrationReport, calibrate, write_profile

__all__ = ["FAMILIES", "CalibrationReport", "calibrate", "write_profile"]
