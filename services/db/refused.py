"""Postgres refusing what a statement holds, as opposed to failing to run it.

A value out of range or of the wrong shape (SQLSTATE class 22, or asyncpg's own
check of an argument, a ValueError), or a violated constraint (class 23): trying
the same thing again changes nothing, unlike a lost connection or a restart.
"""

from __future__ import annotations

import asyncpg

REFUSED: tuple[type[Exception], ...] = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError)
