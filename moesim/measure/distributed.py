"""Run a function on N torch.distributed ranks and gather what each returns.

Two ways in, one call: ``launch(fn, world_size)``

* **local** (the default): N new processes (forkserver with torch preloaded,
  else spawn) on loopback, gloo on CPU
  (``GLOO_SOCKET_IFNAME=lo`` unless set) or NCCL on CUDA (rank r uses
  ``cuda:r``), a free TCP port, ``threads_per_rank`` torch threads each;
* **under torchrun** (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` already set): this
  process is one rank; the process group is set up from the environment and
  every rank gets the same gathered list back.

A rank that raises or dies, or a launch that runs past ``timeout_s``, ends the
whole launch within about a second with a one-line :class:`DistributedError`
naming the rank and the cause; the other ranks are terminated, never left
hanging. ``fn`` must be picklable (a module-level function) and so must its
arguments and return value.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from moesim.errors import UserError

BACKENDS = ("gloo", "nccl")
_POLL_S = 0.1
_GRACE_S = 0.5  # how long a dead rank's last message may take to arrive


class DistributedError(UserError):
    """A distributed launch failed: a rank raised or died, or it timed out."""


def under_torchrun() -> bool:
    """True when the environment already describes this process as one rank."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_backend() -> str:
    """NCCL when CUDA is available, else gloo."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    backend: str | None = None,
    timeout_s: float = 120.0,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Run ``fn(*args)`` on every rank of a new process group; return the results by rank.

    Inside ``fn``, ``torch.distributed`` is initialised (``get_rank()``,
    ``get_world_size()``) and, for NCCL, the current CUDA device is the rank's.
    Raises :class:`DistributedError` (one line) when a rank fails or the launch
    takes longer than ``timeout_s`` seconds, and for bad arguments.
    """
    backend = _check_args(world_size, backend, timeout_s, threads_per_rank)
    if under_torchrun():
        return _run_under_torchrun(fn, world_size, args, backend, timeout_s, threads_per_rank)
    return _spawn(fn, world_size, tuple(args), backend, timeout_s, threads_per_rank)


def _check_args(world_size: int, backend: str | None, timeout_s: float, threads: int) -> str:
    if int(world_size) < 1:
        raise DistributedError(f"world_size = {world_size}: must be an int >= 1")
    if timeout_s <= 0:
        raise DistributedError(f"timeout_s = {timeout_s}: must be > 0")
    if threads < 1:
        raise DistributedError(f"threads_per_rank = {threads}: must be >= 1")
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise DistributedError(f"backend = {backend!r}: allowed: {', '.join(BACKENDS)}")
    if backend == "nccl":
        _check_cuda(world_size)
    return backend


def _check_cuda(world_size: int) -> None:
    import torch

    if not torch.cuda.is_available():
        raise DistributedError("backend = 'nccl': needs CUDA, and no CUDA device is available")
    if not under_torchrun() and torch.cuda.device_count() < world_size:
        raise DistributedError(
            f"world_size = {world_size}: NCCL needs one GPU per rank, "
            f"found {torch.cuda.device_count()}"
        )


# --------------------------------------------------------------------- torchrun


def _run_under_torchrun(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any],
    backend: str,
    timeout_s: float,
    threads: int,
) -> list[Any]:
    import torch
    import torch.distributed as dist

    env_world = int(os.environ["WORLD_SIZE"])
    if world_size != env_world:
        raise DistributedError(
            f"world_size = {world_size}: torchrun started {env_world} ranks; pass {env_world}"
        )
    torch.set_num_threads(threads)
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(*args)
    except Exception as err:
        raise DistributedError(f"rank {rank} raised {_one_line(err)}") from err
    gathered: list[Any] = [None] * env_world
    dist.all_gather_object(gathered, result)
    return gathered


# ---------------------------------------------------------------------- spawned


def _spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    backend: str,
    timeout_s: float,
    threads: int,
) -> list[Any]:
    ctx = _mp_context()
    results: Any = ctx.Queue()
    port = free_port()
    env = _child_env(backend)
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, backend, timeout_s, threads, fn, args, results, env),
            daemon=True,
            name=f"moesim-rank{rank}",
        )
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            _start(proc)
        return _collect(procs, results, world_size, timeout_s)
    finally:
        _stop(procs)
        results.close()


def _start(proc: Any) -> None:
    try:
        proc.start()
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise DistributedError(
            f"cannot send the function or its arguments to the ranks ({_one_line(err)}); "
            "use a module-level function and picklable arguments"
        ) from err


def _mp_context() -> Any:
    """forkserver with torch preloaded (a launch then starts in well under a second;
    the server is started once per process), else spawn. Never plain fork: the
    parent may hold OpenMP or CUDA state that a forked child must not inherit."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        return ctx
    return mp.get_context("spawn")


def _child_env(backend: str) -> dict[str, str]:
    """Environment the ranks inherit: loopback for gloo, no oversubscribed OpenMP pools."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if (
        backend == "gloo"
        and "GLOO_SOCKET_IFNAME" not in os.environ
        and Path("/sys/class/net/lo").exists()
    ):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    env: dict[str, str],
) -> None:
    """One rank: set up the process group, run ``fn``, report ``(rank, ok, payload)``."""
    os.environ.update(env)
    try:
        value = _run_rank(rank, world_size, port, backend, timeout_s, threads, fn, args)
        # pickle here, not in the queue's feeder thread, so a bad return value is reported
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as err:  # report everything, including SystemExit
        results.put((rank, False, _one_line(err) + _where(err)))
    finally:
        _destroy_group()


def _run_rank(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> Any:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    return fn(*args)


def _destroy_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # the launch result is already reported; teardown is best effort
        pass


def _collect(procs: list[Any], results: Any, world_size: int, timeout_s: float) -> list[Any]:
    """Wait for one message per rank; raise at the first failure, death or the deadline."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    dead_since: dict[int, float] = {}
    while len(got) < world_size:
        try:
            rank, ok, payload = results.get(timeout=_POLL_S)
        except queue.Empty:
            _check_alive(procs, got, dead_since, deadline, timeout_s)
            continue
        if not ok:
            raise _root_cause(procs, results, got, rank, payload)
        got[rank] = pickle.loads(payload)
    return [got[r] for r in range(world_size)]


#: failures that are usually a consequence of another rank failing or dying
_KNOCK_ON = ("DistNetworkError", "DistBackendError", "DistStoreError", "Connection reset",
             "Connection closed", "Broken pipe")  # fmt: skip


def _root_cause(
    procs: list[Any], results: Any, got: dict[int, Any], rank: int, payload: str
) -> DistributedError:
    """Name the likely cause, not the first symptom: a peer's network error often
    arrives before the real failure, or instead of it when that rank died. Gather
    what else arrives within the grace period, then prefer a failure that is not
    a knock-on network error, then a rank that died, then the first failure."""
    failures = {rank: payload}
    end = time.monotonic() + _GRACE_S
    while time.monotonic() < end:
        try:
            other, ok, text = results.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if ok:
            got[other] = None
        else:
            failures.setdefault(other, text)
    n = len(procs)
    for r, text in failures.items():
        if not any(mark in text for mark in _KNOCK_ON):
            return DistributedError(f"rank {r} of {n} failed: {text}")
    for r, proc in enumerate(procs):
        if r not in failures and r not in got and not proc.is_alive():
            return DistributedError(
                f"rank {r} of {n} died with exit code {proc.exitcode} without reporting a "
                f"result (then rank {rank} failed: {payload})"
            )
    return DistributedError(f"rank {rank} of {n} failed: {payload}")


def _check_alive(
    procs: list[Any],
    got: dict[int, Any],
    dead_since: dict[int, float],
    deadline: float,
    timeout_s: float,
) -> None:
    now = time.monotonic()
    for rank, proc in enumerate(procs):
        if rank in got or proc.is_alive():
            continue
        # a rank that exited may still have its message in flight: wait a little for it
        first = dead_since.setdefault(rank, now)
        if now - first > _GRACE_S:
            raise DistributedError(
                f"rank {rank} of {len(procs)} died with exit code {proc.exitcode} "
                "without reporting a result"
            )
    if now > deadline:
        waiting = [r for r in range(len(procs)) if r not in got]
        raise DistributedError(
            f"timed out after {timeout_s:g} s waiting for rank(s) {waiting}; "
            "raise the timeout or check for a hang"
        )


def _stop(procs: list[Any]) -> None:
    """Terminate ranks that are still running, then kill any that ignore it."""
    procs = [p for p in procs if p.pid is not None]  # never started: nothing to stop
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    end = time.monotonic() + 2.0
    for proc in procs:
        proc.join(timeout=max(0.0, end - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=1.0)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _where(err: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame, to find the failing line quickly."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {Path(last.filename).name}:{last.lineno})"
