"""The benchmark's own parsing, where a wrong reading would print a wrong table without failing."""

from __future__ import annotations

import pytest

from tests.bench.instructions import parse_total

# `callgrind_control -e Ir <pid>` of a process with two threads (valgrind 3.19).
# Its lines end in a space, as callgrind_control prints them.
STATUS = "PID 10217: python -m services serve\n\n  Totals:        Ir \n   Th 1  26,733,686 \n   Th 2       1,204 \n\n"


def test_the_instruction_count_is_every_threads_sum() -> None:
    assert parse_total(STATUS) == 26_734_890


def test_a_status_without_counts_is_an_error_not_zero() -> None:
    # What callgrind_control prints while counting is off: reading it as 0 would halve a ratio silently.
    with pytest.raises(ValueError, match="no instruction count"):
        parse_total("PID 10217: python\n  No information available as instrumentation is switched off.\n")
