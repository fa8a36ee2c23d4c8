"""Run tasks on an existing Ray cluster (``pip install 'moesim[ray]'``).

Workers must be able to import ``moesim`` (install it on the cluster, or run
a local cluster from this environment). Results stream back as tasks finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from moesim.errors import UserError

if TYPE_CHECKING:
    from moesim.explore.runner import Task


BATCH = 16  # results collected per wait
WAIT_S = 0.5  # ...or whatever finished within this time


def run_on_ray(
    tasks: Sequence[Task], address: str, execute: Callable[[Task], dict[str, Any]]
) -> Iterator[tuple[Task, dict[str, Any]]]:
    """Submit every task to the Ray cluster at ``address``; yield ``(task, result)``."""
    ray = _import_ray()
    _connect(ray, address)
    remote = ray.remote(num_cpus=1)(execute)
    pending = {remote.remote(t): t for t in tasks}
    while pending:
        # batches keep the driver's bookkeeping linear in the number of tasks
        batch = min(len(pending), BATCH)
        ready, _ = ray.wait(list(pending), num_returns=batch, timeout=WAIT_S)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs the optional Ray extra: pip install 'moesim[ray]'") from None
    return ray


def _connect(ray: Any, address: str) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except ConnectionError as err:
        raise UserError(f"--ray {address}: cannot connect to a Ray cluster: {err}") from None
