"""Measurement: timer, benchmark suites, torch.distributed launcher, results store.

- :mod:`moesim.measure.timer`        ``time_fn``: one timer for CPU and CUDA
- :mod:`moesim.measure.bench`        ``run_bench``: suites over grids → one results file
- :mod:`moesim.measure.suites`       roofline, gating, dispatch, experts, alltoall
- :mod:`moesim.measure.grids`        default shape grids and user grid files
- :mod:`moesim.measure.loads`        balanced / Zipf-skewed synthetic loads
- :mod:`moesim.measure.distributed`  ``launch``: N local ranks (or torchrun), results by rank
- :mod:`moesim.measure.results`      ``write_results`` / ``read_results`` (torch-free)

This ``__init__`` imports nothing: the torch-free calibration imports
:mod:`moesim.measure.results` and must not pull torch in with it.
"""
