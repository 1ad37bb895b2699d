"""Group commit: the items submitted while one statement runs go together in the next one.

No timer: a lone request's statement goes out at once, and under load every
round trip carries everything that queued meanwhile, so statements per second
stay bounded by round trips however many requests there are.

A batch refused for what one of its items holds (`split_on`) is written again
item by item: one bad item fails alone, not every request that queued with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int = 512,
        split_on: tuple[type[Exception], ...] = (),
    ) -> None:
        self._flush = flush
        self._split_on = split_on
        self._max = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: T) -> asyncio.Future[R]:
        """The item's result once its batch is written (the batch's exception if that failed).

        The batch runs whether or not anyone still awaits the future (shield it where a caller
        may be cancelled and needs to undo what was written).
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="group-commit")
        return future

    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max], self._pending[self._max :]
                await self._write(batch)
        finally:
            self._task = None

    async def _write(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and isinstance(exc, self._split_on):
                for one in batch:
                    await self._write([one])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    # Read by the caller if it still waits; never "exception was never retrieved".
                    future.add_done_callback(_consume)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def drain(self) -> None:
        """Wait until everything submitted so far is written (or failed)."""
        while self._task is not None:
            await asyncio.shield(self._task)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
