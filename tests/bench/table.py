"""Plain-text tables: a label column, then one right-aligned cell per column, " | " before each; and the number
formats their cells share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def ms(value: float | None) -> str:
    """Milliseconds: three significant places below 100, whole ones above."""
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def counts(counter: Counter[str] | Counter[int]) -> str:
    """`key ×n, ...`, most frequent first."""
    return ", ".join(f"{key} ×{n}" for key, n in counter.most_common()) or "-"


class Table:
    """Lines of text built row by row under a header; `text` adds the footer."""

    def __init__(self, header: list[str], *, label: int, cell: int, columns: int) -> None:
        self.label = label
        self.cell = cell
        self.lines = [*header, ""]
        self._rule = "-" * (label + columns * (cell + 3))

    def row(self, label: str, cells: Iterable[str]) -> None:
        self.lines.append(label.ljust(self.label) + "".join(" | " + c.rjust(self.cell) for c in cells))

    def rule(self) -> None:
        self.lines.append(self._rule)

    def add(self, *lines: str) -> None:
        """Free text: a section's title."""
        self.lines.extend(lines)

    def failures(self, title: str, named: Iterable[tuple[str, Counter[str]]]) -> None:
        """One line per name whose errors are not empty, under `title`; nothing if none failed."""
        listed = [f"  {name}: {counts(errors)}" for name, errors in named if errors]
        if listed:
            self.lines.append(title)
            self.lines.extend(listed)

    def text(self, footer: list[str]) -> str:
        return "\n".join([*self.lines, *footer])


class PairTable(Table):
    """Each column holds two cells side by side, `half` wide each: the two things compared."""

    def __init__(self, header: list[str], *, label: int, half: int, columns: int) -> None:
        super().__init__(header, label=label, cell=2 * half + 1, columns=columns)
        self.half = half

    def pairs(self, label: str, cells: Iterable[tuple[str, str]]) -> None:
        self.row(label, [a.rjust(self.half) + " " + b.rjust(self.half) for a, b in cells])
