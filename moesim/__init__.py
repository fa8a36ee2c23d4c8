"""moesim: measure, calibrate and simulate Mixture-of-Experts layers.

The Python API (see README "Python API") is :mod:`moesim.api`:
``from moesim import api`` then ``api.load_scenario``, ``api.simulate``,
``api.compare``, ``api.sweep``. ``moesim.api`` is imported on first use, so
``import moesim`` (and the CLI's start-up) stays light. (``moesim.simulate``
is the simulator package, hence no top-level ``simulate`` function.)
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("moesim")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

_API = ("Comparison", "compare", "load_scenario", "sweep")

__all__ = ["__version__", "api", *_API]


def __getattr__(name: str) -> Any:
    if name in _API or name == "api":
        import importlib

        api = importlib.import_module("moesim.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'moesim' has no attribute {name!r}")
