"""How much of this machine's CPU time the hypervisor took (steal), over a span of work.

On a virtual machine whose host is busy, the guest's virtual CPUs wait while
other guests run: Linux counts that wait as *steal* time in ``/proc/stat``. A
bench or validation run that lost a tenth of its CPU time this way is timed on
a slower, noisier machine than one that lost none, so its results say so.
Torch-free; on a system without ``/proc/stat`` every reading is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuTimes:
    """Aggregate CPU jiffies since boot: all of them, and the stolen ones."""

    total: int
    steal: int


def cpu_times(path: Path = PROC_STAT) -> CpuTimes | None:
    """The ``cpu`` line of ``/proc/stat`` (user nice system idle iowait irq softirq steal ...)."""
    try:
        with path.open(encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    jiffies = [int(v) for v in fields[1:9]]  # guest time is already counted in user
    return CpuTimes(total=sum(jiffies), steal=jiffies[7])


def steal_fraction(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """Share of the CPU time between two readings that the hypervisor took (None: unknown)."""
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.steal - before.steal) / (after.total - before.total)


def steal_since(before: CpuTimes | None) -> float | None:
    """:func:`steal_fraction` from ``before`` to now."""
    return steal_fraction(before, cpu_times())


def steal_note(fraction: float | None) -> str:
    """``"the hypervisor took 12% of this machine's CPU time (...)"``, or "" below 1 %."""
    if fraction is None or fraction < 0.01:
        return ""
    return f"the hypervisor took {fraction:.0%} of this machine's CPU time (timings are noisy)"
