"""Chrome trace (Perfetto / chrome://tracing) export of a simulation."""

from __future__ import annotations

import json
from typing import Any


def chrome_trace(result: Any) -> dict[str, Any]:
    """``{"traceEvents": [...]}``: one process per GPU, threads ``compute`` and ``comm``.

    ``result`` is a :class:`moesim.simulate.SimResult` simulated with ``trace=True``.
    """
    events = list(result.trace_events or [])
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "scenario": result.scenario,
            "hardware": result.hardware,
            "seed": result.seed,
            "step_time_s": result.step_time_s,
        },
    }


def chrome_trace_json(result: Any) -> str:
    return json.dumps(chrome_trace(result)) + "\n"
