"""Rich tables for the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from moesim.config.hardware import HardwareProfile

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def render(table: Table) -> None:
    console.print(table)


def profiles_table(profiles: Sequence[HardwareProfile]) -> Table:
    table = Table(title="Hardware profiles", title_justify="left")
    for col, just in [
        ("name", "left"),
        ("GPU", "left"),
        ("BF16 TFLOP/s", "right"),
        ("FP8 TFLOP/s", "right"),
        ("HBM GB/s", "right"),
        ("HBM GiB", "right"),
        ("GPUs/node", "right"),
        ("scale-up GB/s", "right"),
        ("NIC GB/s", "right"),
        ("calibrated", "left"),
    ]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for p in profiles:
        peaks = p.gpu.peak_tflops
        table.add_row(
            p.name,
            p.gpu.name,
            _num(peaks.get("bf16")),
            _num(peaks.get("fp8")),
            _num(p.gpu.hbm_GBps),
            _num(p.gpu.hbm_GiB),
            str(p.node.gpus_per_node),
            _num(p.node.scaleup.link_GBps),
            _num(p.scaleout.nic_GBps),
            p.calibration.source.device if p.calibration else "no (spec)",
        )
    return table


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"
