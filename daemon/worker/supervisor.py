"""The daemon's side of the worker process: start, watch, restart, unload when idle.

A worker that exits on its own has crashed: every request it held fails at
once (its queue receives `WorkerLost`), the daemon reports no room while it
restarts the worker, and the next request is served by the new one. A worker
that is alive but makes no progress while it holds requests (a wedged kernel, a
stopped process) for `stall_s` is killed and handled as a crash. A worker
that has had nothing to do for `idle_unload_s` is stopped, which returns all
of the model's memory to the system; the next request starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog

from daemon.child import log_args
from daemon.machine import process_rss
from daemon.worker import protocol as p

log = structlog.get_logger("daemon.worker")


class WorkerLost:
    """Put in a request's queue when the worker died under it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class WorkerStartError(Exception):
    pass


Item = p.Started | p.Token | p.Ended | WorkerLost


@dataclass(frozen=True)
class WorkerConfig:
    slots: int = 4
    prefill_step: int = 512
    prefill_gather: float = 0.05
    cache_entries: int = 16
    cache_bytes: int = 1 << 30
    start_timeout_s: float = 120.0
    # 0 disables idle unloading.
    idle_unload_s: float = 600.0
    # After Shutdown, how long the worker gets before SIGKILL.
    stop_grace_s: float = 3.0
    # Crash restarts back off up to this long when the worker keeps dying.
    max_restart_delay_s: float = 30.0
    # A worker holding requests that makes no progress (no frame, no new batch step) for
    # this long is hung: it is killed and restarted. One step is a decode or a prefill chunk
    # (at most prefill_step tokens), seconds even for a large model on a small Mac. 0: never.
    stall_s: float = 60.0
    # The daemon's log settings, handed to the worker (it reads no environment of its own).
    log_json: bool = False
    log_level: str = "info"


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    model_path: Path
    ready: asyncio.Future[p.Ready]
    started_at: float = field(default_factory=time.monotonic)
    expected_exit: bool = False
    reader: asyncio.Task[None] | None = None
    info: p.Ready | None = None
    # When the worker last showed progress (any frame, or a pong with a new step count).
    progress_at: float = field(default_factory=time.monotonic)
    steps: int = -1
    hung: str | None = None
    watch: asyncio.Task[None] | None = None


# The supervisor's own states; heartbeats report them as schemas.codes.WorkerState (daemon/engine/worker_engine.py).
State = Literal["no_worker", "starting", "healthy", "idle", "restarting", "dead", "stopping"]


class Supervisor:
    """States: no_worker, starting, healthy, idle (unloaded, reloads on demand), restarting, dead, stopping."""

    def __init__(self, config: WorkerConfig, *, on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.state: State = "no_worker"
        self.model_path: Path | None = None
        self.info: p.Ready | None = None
        self.restarts = 0
        # Set by a crash, cleared when a worker runs again: while set, the daemon takes no work.
        self.crashed = False
        self.last_crash: str | None = None
        self.last_active = time.monotonic()
        self._worker: _Worker | None = None
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._pongs: dict[int, asyncio.Future[p.Stats]] = {}
        self._nonce = 0
        self._lock = asyncio.Lock()
        self._starting: asyncio.Task[None] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._idle: asyncio.Task[None] | None = None
        self._crash_times: list[float] = []
        self._on_change = on_change or (lambda: None)
        self.closed = False

    # ---- public state ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        w = self._worker
        return w.proc.pid if w is not None and w.proc.returncode is None else None

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    @property
    def health(self) -> State:
        """The state, except that a worker coming back from a crash is "restarting" throughout."""
        if self.crashed and self.state in ("starting", "dead", "restarting"):
            return "restarting"
        return self.state

    def rss(self) -> int:
        pid = self.pid
        return process_rss(pid) if pid is not None else 0

    # ---- load / unload ---------------------------------------------------------------

    async def load(self, model_path: Path) -> p.Ready:
        """(Re)start the worker on `model_path`, replacing any running worker."""
        async with self._lock:
            self.model_path = model_path
            await self._stop_worker("replaced")
            return await self._start_locked()

    async def unload(self) -> int:
        """Stop the worker and forget the model; returns the worker's resident bytes before."""
        async with self._lock:
            freed = self.rss()
            await self._stop_worker("unloaded")
            self.crashed = False
            self.model_path = None
            self.info = None
            self._set_state("no_worker")
            return freed

    async def ensure(self) -> None:
        """Make sure a worker is serving the model (reload after an idle unload)."""
        if self.state == "healthy" and self._worker is not None:
            return
        if self.model_path is None:
            raise WorkerStartError("no model is loaded")
        if self.health == "restarting":
            # Fail fast: the caller's client can go to another provider meanwhile.
            raise WorkerStartError(f"the worker is restarting after a crash ({self.last_crash})")
        async with self._lock:
            if self.state == "healthy" and self._worker is not None:
                return
            if self.model_path is None:
                raise WorkerStartError("no model is loaded")
            log.info("worker_reload_on_demand", model_path=str(self.model_path), was=self.state)
            await self._start_locked()

    async def close(self) -> None:
        self.closed = True
        for task in (self._restart, self._idle):
            if task is not None:
                task.cancel()
        async with self._lock:
            await self._stop_worker("daemon_stopping")
            self._set_state("stopping")

    # ---- requests --------------------------------------------------------------------

    def submit(self, job: p.Generate) -> asyncio.Queue[Item]:
        if self._worker is None or self.state != "healthy":
            raise WorkerStartError(f"the worker is {self.state}")
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._queues[job.id] = queue
        self._touch()
        self._send(job)
        return queue

    def cancel(self, request_id: str) -> None:
        if request_id in self._queues:
            self._send(p.Cancel(id=request_id))

    def release(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is not None:
            self._touch()

    async def ping(self, timeout: float = 5.0) -> p.Stats | None:  # noqa: ASYNC109 - a health probe's own limit
        """The worker's stats if it answers within `timeout`, else None."""
        if self._worker is None or self.state != "healthy":
            return None
        self._nonce += 1
        nonce = self._nonce
        future: asyncio.Future[p.Stats] = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = future
        self._send(p.Ping(nonce=nonce))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._pongs.pop(nonce, None)

    # ---- internals: process lifecycle ------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self._on_change()

    def _touch(self) -> None:
        self.last_active = time.monotonic()

    def _send(self, message: p.ToWorker) -> None:
        w = self._worker
        if w is None or w.proc.stdin is None or w.proc.returncode is not None:
            return
        # A dead pipe shows up as EOF on the reader, which handles the crash.
        with contextlib.suppress(ConnectionError, RuntimeError):
            w.proc.stdin.write(p.frame(message))

    async def _start_locked(self) -> p.Ready:
        assert self.model_path is not None
        self._set_state("starting")
        c = self.config
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon.worker",
            "--model-path",
            str(self.model_path),
            "--slots",
            str(c.slots),
            "--prefill-step",
            str(c.prefill_step),
            "--prefill-gather",
            str(c.prefill_gather),
            "--cache-entries",
            str(c.cache_entries),
            "--cache-bytes",
            str(c.cache_bytes),
            *log_args(json=c.log_json, level=c.log_level),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # The worker inherits our environment (LD_PRELOAD of a faster BLAS) and our stderr (the log).
            env=dict(os.environ),
        )
        worker = _Worker(proc=proc, model_path=self.model_path, ready=asyncio.get_running_loop().create_future())
        worker.reader = asyncio.create_task(self._read(worker), name=f"worker-reader-{proc.pid}")
        self._worker = worker
        try:
            info = await asyncio.wait_for(asyncio.shield(worker.ready), c.start_timeout_s)
        except (TimeoutError, WorkerStartError) as exc:
            reason = str(exc) or f"not ready after {c.start_timeout_s:.0f}s"
            await self._stop_worker("start_failed")
            self._set_state("dead")
            self.last_crash = reason
            raise WorkerStartError(f"the worker could not load {self.model_path}: {reason}") from None
        worker.info = self.info = info
        self.crashed = False
        self._set_state("healthy")
        self._touch()
        self._ensure_idle_watch()
        if c.stall_s > 0:
            worker.watch = asyncio.create_task(self._stall_watch(worker), name=f"worker-stall-watch-{proc.pid}")
        log.info(
            "worker_started",
            pid=proc.pid,
            model_path=str(self.model_path),
            seconds=round(time.monotonic() - started, 2),
            weights_mb=round(info.weights_bytes / 1e6, 1),
        )
        return info

    async def _stop_worker(self, reason: str) -> None:
        w = self._worker
        if w is None:
            return
        w.expected_exit = True
        if w.watch is not None:
            w.watch.cancel()
        self._fail_all(f"worker stopped ({reason})")
        if w.proc.returncode is None:
            self._send(p.Shutdown())
            if w.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    w.proc.stdin.close()
            # The worker ignores SIGTERM (see daemon/worker/__main__.py): Shutdown, then SIGKILL.
            if not await self._wait_exit(w, self.config.stop_grace_s):
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        if w.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w.reader
        self._worker = None
        log.info("worker_stopped", pid=w.proc.pid, reason=reason, returncode=w.proc.returncode)

    @staticmethod
    async def _wait_exit(w: _Worker, timeout: float) -> bool:  # noqa: ASYNC109 - bounded wait, then escalate
        try:
            await asyncio.wait_for(w.proc.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _read(self, w: _Worker) -> None:
        stdout = w.proc.stdout
        assert stdout is not None
        try:
            while True:
                header = await stdout.readexactly(p.HEADER_SIZE)
                body = await stdout.readexactly(p.frame_size(header))
                message = p.FROM_WORKER.decode(body)
                if not isinstance(message, p.Pong):
                    w.progress_at = time.monotonic()
                elif message.stats.steps != w.steps:
                    w.steps = message.stats.steps
                    w.progress_at = time.monotonic()
                self._dispatch(w, message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("worker_protocol_error", pid=w.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
        code = await w.proc.wait()
        was_ready = w.ready.done() and w.ready.exception() is None
        if not w.ready.done():
            w.ready.set_exception(WorkerStartError(f"the worker exited with code {code} while loading"))
            # Retrieved by whoever awaits the start; mark it so an abandoned start does not warn.
            w.ready.exception()
        # A worker that dies while loading is a failed start (the starter reports it), not a crash.
        if was_ready and not w.expected_exit and self._worker is w:
            self._on_crash(w, code)

    def _dispatch(self, w: _Worker, message: p.FromWorker) -> None:
        if isinstance(message, p.Tokens):
            for item in message.items:
                queue = self._queues.get(item.id)
                if queue is not None:
                    queue.put_nowait(item)
        elif isinstance(message, p.Started | p.Ended):
            queue = self._queues.get(message.id)
            if queue is not None:
                queue.put_nowait(message)
        elif isinstance(message, p.Pong):
            future = self._pongs.get(message.nonce)
            if future is not None and not future.done():
                future.set_result(message.stats)
        elif isinstance(message, p.Ready):
            if not w.ready.done():
                w.ready.set_result(message)
        elif isinstance(message, p.LoadFailed) and not w.ready.done():
            w.ready.set_exception(WorkerStartError(message.message))
            w.ready.exception()

    def _fail_all(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put_nowait(WorkerLost(reason))

    # ---- internals: crashes and idleness ---------------------------------------------

    def _on_crash(self, w: _Worker, code: int) -> None:
        if w.watch is not None:
            w.watch.cancel()
        reason = f"the worker exited unexpectedly (code {code})"
        if w.hung is not None:
            reason = w.hung
        elif code < 0:
            with contextlib.suppress(ValueError):
                reason = f"the worker was killed by {signal.Signals(-code).name}"
        self.last_crash = reason
        self.restarts += 1
        self.crashed = True
        log.error("worker_crashed", pid=w.proc.pid, returncode=code, in_flight=len(self._queues))
        self._worker = None
        self._fail_all(reason)
        if self.closed:
            return
        self._set_state("restarting")
        self._restart = asyncio.create_task(self._restart_after_crash(), name="worker-restart")

    async def _restart_after_crash(self) -> None:
        """Until a worker runs again: the first crash in a minute restarts at once, a crash loop backs off."""
        while not self.closed:
            now = time.monotonic()
            self._crash_times = [t for t in self._crash_times if now - t < 60] + [now]
            delay = min(self.config.max_restart_delay_s, 0.5 * 2 ** (len(self._crash_times) - 1) - 0.5)
            if delay > 0:
                log.warning("worker_restart_backoff", seconds=delay)
                await asyncio.sleep(delay)
            async with self._lock:
                # Unloaded, replaced or stopped meanwhile: nothing to restart.
                if self.state not in ("restarting", "dead") or self.model_path is None:
                    return
                try:
                    await self._start_locked()
                    return
                except WorkerStartError as exc:
                    log.error("worker_restart_failed", error=str(exc))
                    self.last_crash = str(exc)
                    # Keep telling the pool "restarting" (no room) and try again after the backoff.
                    self._set_state("restarting")

    async def _stall_watch(self, w: _Worker) -> None:
        """Kill a worker that holds requests but has stopped making progress.

        The worker's pipe reader answers pings with its step count even while its loop runs,
        so a busy worker shows progress and a wedged loop does not; a stopped process answers
        nothing at all.
        """
        limit = self.config.stall_s
        tick = max(0.05, min(5.0, limit / 4))
        while self._worker is w and w.proc.returncode is None:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not self._queues:
                w.progress_at = now
                continue
            if now - w.progress_at < limit:
                self._nonce += 1
                self._send(p.Ping(nonce=self._nonce))
                continue
            w.hung = f"the worker stopped making progress ({now - w.progress_at:.0f}s without a step)"
            log.error(
                "worker_hung", pid=w.proc.pid, in_flight=len(self._queues), stalled_s=round(now - w.progress_at, 1)
            )
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            return

    def _ensure_idle_watch(self) -> None:
        if self.config.idle_unload_s > 0 and (self._idle is None or self._idle.done()):
            self._idle = asyncio.create_task(self._idle_watch(), name="worker-idle-watch")

    async def _idle_watch(self) -> None:
        limit = self.config.idle_unload_s
        tick = max(0.05, min(5.0, limit / 10))
        while not self.closed:
            await asyncio.sleep(tick)
            if self.state != "healthy" or self._queues:
                continue
            idle_for = time.monotonic() - self.last_active
            if idle_for < limit:
                continue
            async with self._lock:
                if self.state != "healthy" or self._queues or time.monotonic() - self.last_active < limit:
                    continue
                freed = self.rss()
                await self._stop_worker("idle")
                self._set_state("idle")
                log.info("worker_idle_unloaded", idle_s=round(idle_for, 1), freed_mb=round(freed / 1e6, 1))
            return
