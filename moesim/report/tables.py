"""Rich tables for the CLI, laid out for the width they get.

:func:`render` is how every table is printed: at its natural width when that
fits the console (a terminal's width; ``COLUMNS`` or 80 for a pipe), otherwise
split into column groups that each fit and repeat the key columns (the names
a user types), so no cell is ever wrapped or cut. Long notes go below a table
as numbered :class:`Footnotes` instead of into a cell.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from moesim.config.hardware import HardwareProfile


class _Console(Console):
    """A Console whose broken pipe is a ``BrokenPipeError`` for the CLI to handle.

    rich's own handler exits with status 1; ``moesim ... | head -1`` should exit 0.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


console: Console = _Console(highlight=False)
err_console: Console = _Console(stderr=True, highlight=False)


def render(table: Table, *, key_columns: int = 1, out: Console | None = None) -> None:
    """Print ``table`` unwrapped in groups of columns that fit ``out``'s width.

    Each group after the first repeats the first ``key_columns`` columns and is
    titled "(continued)". A group that cannot fit even one column beyond the keys
    is printed wider than the console rather than cut.
    """
    out = out or console
    for part in split_columns(table, out.width, key_columns=key_columns, measure_on=out):
        width = max(out.width, natural_width(part, out))
        if width > out.width:
            _Console(file=out.file, width=width, highlight=False).print(part)
        else:
            out.print(part)


def split_columns(
    table: Table, width: int, *, key_columns: int = 1, measure_on: Console | None = None
) -> list[Table]:
    """``table`` as one or more tables of whole, unwrapped columns, each <= ``width``."""
    con = measure_on or console
    for col in table.columns:
        col.no_wrap = True
    if natural_width(table, con) <= width:
        return [table]
    keys = list(range(min(key_columns, len(table.columns))))
    groups: list[list[int]] = []
    current = list(keys)
    for i in range(len(keys), len(table.columns)):
        trial = _subtable(table, [*current, i], continued=bool(groups))
        if len(current) > len(keys) and natural_width(trial, con) > width:
            groups.append(current)
            current = [*keys, i]
        else:
            current.append(i)
    groups.append(current)
    parts = [_subtable(table, g, continued=n > 0) for n, g in enumerate(groups)]
    for part in parts[:-1]:
        part.caption = None  # said once, under the last part
    return parts


def natural_width(table: Table, con: Console | None = None) -> int:
    """Columns the table takes with no cell wrapped."""
    con = con or console
    return Measurement.get(con, con.options.update(max_width=100_000), table).maximum


def _subtable(table: Table, indices: list[int], *, continued: bool) -> Table:
    part = copy.copy(table)
    part.columns = []
    for new_index, i in enumerate(indices):
        col = copy.copy(table.columns[i])
        col._index = new_index
        part.columns.append(col)
    if continued and table.title is not None:
        part.title = f"{table.title} (continued)"
    return part


class Footnotes:
    """Numbered notes printed below a table; a cell carries only the marker ``[n]``."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def ref(self, text: str) -> str:
        """The marker for ``text`` (the same text gets the same number)."""
        if not text:
            return ""
        if text not in self.notes:
            self.notes.append(text)
        return f"[{self.notes.index(text) + 1}]"

    def lines(self, width: int) -> list[str]:
        """Each note wrapped to ``width`` with a hanging indent under its number."""
        out: list[str] = []
        for n, text in enumerate(self.notes, start=1):
            head = f"[{n}] "
            out += textwrap.wrap(
                text,
                width=max(width, 40),
                initial_indent=head,
                subsequent_indent=" " * len(head),
                break_long_words=False,
                break_on_hyphens=False,
            )
        return out

    def render(self, out: Console | None = None) -> None:
        out = out or console
        for line in self.lines(out.width):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


def profiles_table(
    profiles: Sequence[HardwareProfile], names: Sequence[str] | None = None
) -> Table:
    """One row per profile; ``name`` is what ``--hardware`` takes (print with :func:`render`).

    ``names`` are the lookup names (default each profile's own name); ``kind`` says
    whether its figures are measured (imported GPU tables), calibrated here or spec.
    """
    from moesim.report.profile_sources import profile_kind

    table = Table(title="Hardware profiles (--hardware NAME)", title_justify="left")
    for col, just in [
        ("name", "left"),
        ("kind", "left"),
        ("BF16\nTFLOP/s", "right"),
        ("FP8\nTFLOP/s", "right"),
        ("HBM\nGB/s", "right"),
        ("HBM\nGiB", "right"),
        ("GPUs/\nnode", "right"),
        ("scale-up\nGB/s", "right"),
        ("NIC\nGB/s", "right"),
        ("GPU", "left"),
        ("calibrated\non", "left"),
    ]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, p in zip(names or [p.name for p in profiles], profiles, strict=True):
        peaks = p.gpu.peak_tflops
        table.add_row(
            name,
            str(profile_kind(p)["kind"]),
            _num(peaks.get("bf16")),
            _num(peaks.get("fp8")),
            _num(p.gpu.hbm_GBps),
            _num(p.gpu.hbm_GiB),
            str(p.node.gpus_per_node),
            _num(p.node.scaleup.link_GBps),
            _num(p.scaleout.nic_GBps),
            p.gpu.name,
            p.calibration.source.device if p.calibration else "no (spec)",
        )
    return table


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"
