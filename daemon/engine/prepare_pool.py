"""Chat templates and schema compilation off the event loop, each under a time limit.

Why helper processes and not threads. Rendering a chat template (Jinja) and
compiling a JSON schema (llguidance) take as long as their input makes them:
the template is a program whose input the buyer writes, and llguidance's own
limits (grammar size, lexer fuel) still let a 22 KB schema of 600
`patternProperties` compile for 65 s. On the event loop either stops the
heartbeats. A thread would keep the loop alive (Jinja holds the GIL but yields
it every 5 ms; llguidance releases it), but a Python thread cannot be stopped:
after its time limit the work would go on burning a core, and a few such
requests would hold every thread for minutes. A process can be killed. So each
job goes to one of a few helper processes (daemon/engine/prepare_process.py)
holding the tokenizer; one that overruns `timeout_s` is killed (its request
alone fails, with a 400 naming the field) and replaced, in about a second.

At most `helpers` jobs run at once and at most `max_waiting` wait for a
helper, each no longer than `timeout_s`: a flood is refused with
`provider_busy` (retryable: the gateway tries another provider) rather than
queued without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.engine import prepare_process as pp
from daemon.engine.base import EngineError
from daemon.worker import protocol as p
from schemas import bus

log = structlog.get_logger("daemon.prepare")

# A request whose preparation overran the time limit or killed its helper: the buyer's input is
# at fault (a 400 naming the field), and another provider would fare no better (not retryable).
TOO_COMPLEX = "request_too_complex"


@dataclass(eq=False)
class _Helper:
    proc: asyncio.subprocess.Process
    generation: int

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def read(self) -> pp.Reply:
        stdout = self.proc.stdout
        assert stdout is not None
        header = await stdout.readexactly(p.HEADER_SIZE)
        return pp.REPLIES.decode(await stdout.readexactly(p.frame_size(header)))

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class PreparePool:
    def __init__(
        self, *, helpers: int = 2, timeout_s: float = 1.5, max_waiting: int = 32, start_timeout_s: float = 120.0
    ) -> None:
        self.size = max(1, helpers)
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.start_timeout_s = start_timeout_s
        self._path: Path | None = None
        # Bumped by every start and stop: helpers and jobs of an older generation are stale.
        self._generation = 0
        self._idle: asyncio.Queue[_Helper] = asyncio.Queue()
        self._helpers: set[_Helper] = set()
        self._replacing: set[asyncio.Task[None]] = set()
        self._waiting = 0
        # Set once a helper of the current generation is up: until then requests wait for it.
        self._up = asyncio.Event()
        # For status and tests: jobs that overran their time limit, helpers that died under a job.
        self.timeouts = 0
        self.crashes = 0

    @property
    def ready(self) -> int:
        return self._idle.qsize()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, path: Path) -> None:
        """(Re)start the helpers on the tokenizer at `path`; raises EngineError("load_failed") if none starts."""
        await self.stop()
        self._path = path
        self._up = asyncio.Event()
        generation = self._generation
        results = await asyncio.gather(*(self._spawn(generation) for _ in range(self.size)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if len(failures) == self.size:
            await self.stop()
            raise EngineError("load_failed", f"no prepare helper could start: {failures[0]}")
        for _ in failures:
            self._replace(generation)

    async def stop(self) -> None:
        """Kill every helper (a job they hold fails with model_not_loaded, retryable)."""
        self._generation += 1
        self._path = None
        for task in self._replacing:
            task.cancel()
        self._replacing.clear()
        helpers, self._helpers = self._helpers, set()
        while not self._idle.empty():
            self._idle.get_nowait()
        for helper in helpers:
            helper.kill()
        for helper in helpers:
            with contextlib.suppress(Exception):
                await helper.proc.wait()

    async def _spawn(self, generation: int) -> None:
        assert self._path is not None
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon.engine.prepare_process",
            "--model-path",
            str(self._path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        helper = _Helper(proc, generation)
        self._helpers.add(helper)
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(helper.read(), self.start_timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, p.ProtocolError) as exc:
            self._drop(helper)
            raise EngineError("load_failed", f"the prepare helper did not start ({type(exc).__name__})") from None
        except BaseException:
            self._drop(helper)
            raise
        if not isinstance(reply, pp.Ready):
            self._drop(helper)
            message = reply.message if isinstance(reply, pp.LoadFailed) else type(reply).__name__
            raise EngineError("load_failed", f"the prepare helper could not load the tokenizer: {message}")
        if generation != self._generation:
            self._drop(helper)
            return
        log.info("prepare_helper_ready", pid=proc.pid, seconds=round(time.monotonic() - started, 2))
        self._up.set()
        self._idle.put_nowait(helper)

    def _drop(self, helper: _Helper) -> None:
        helper.kill()
        self._helpers.discard(helper)
        if helper.proc.stdin is not None:
            helper.proc.stdin.close()

    def _replace(self, generation: int) -> None:
        """Start a helper in the background, retrying with a back-off, until this generation ends."""

        async def replace() -> None:
            delay = 0.5
            while generation == self._generation:
                try:
                    await self._spawn(generation)
                    return
                except EngineError as exc:
                    log.error("prepare_helper_start_failed", error=exc.message, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

        task = asyncio.create_task(replace(), name="prepare-helper-start")
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    # ---- jobs ----------------------------------------------------------------------------

    async def render(self, request: bus.InferenceRequest) -> list[int]:
        """The prompt's tokens (chat template and tokenizer), without a continuation's."""
        param = "prompt" if request.prompt is not None else "messages"
        reply = await self._run(pp.Render(request=request), what="building the prompt", param=param)
        assert isinstance(reply, pp.Rendered)
        return reply.tokens

    async def compile_schema(self, schema: dict[str, Any], *, param: str) -> str:
        """The checked llguidance grammar of a JSON schema."""
        reply = await self._run(pp.Compile(schema=schema), what="compiling the JSON schema", param=param)
        assert isinstance(reply, pp.Compiled)
        return reply.grammar

    async def _acquire(self) -> _Helper:
        if self._path is None:
            raise EngineError("model_not_loaded", "no model is loaded here", retryable=True)
        if self._waiting >= self.max_waiting:
            raise EngineError("provider_busy", "too many requests are being prepared here", retryable=True)
        self._waiting += 1
        try:
            if not self._up.is_set():
                # Just loaded: the helpers are still importing the tokenizer (a second or two).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._up.wait(), self.start_timeout_s)
            deadline = time.monotonic() + self.timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                # Not asyncio.wait_for: on Python 3.11 a cancellation arriving as a helper frees up
                # is lost (gh-86296), and the helper with it.
                async with asyncio.timeout(remaining):
                    helper = await self._idle.get()
                if helper.alive and helper.generation == self._generation:
                    return helper
                # It died idle (or belongs to a model gone since): not this request's doing.
                self._drop(helper)
                if helper.generation == self._generation:
                    self._replace(helper.generation)
        except TimeoutError:
            raise EngineError("provider_busy", "every prepare helper here is busy", retryable=True) from None
        finally:
            self._waiting -= 1

    async def _run(self, job: pp.Job, *, what: str, param: str) -> pp.Reply:
        helper = await self._acquire()
        healthy = False
        try:
            assert helper.proc.stdin is not None
            helper.proc.stdin.write(p.frame(job))
            # Not wait_for: on Python 3.11 it loses a cancel arriving with the reply (gh-86296).
            async with asyncio.timeout(self.timeout_s):
                reply = await helper.read()
            healthy = True
        except TimeoutError:
            self.timeouts += 1
            log.warning("prepare_timeout", pid=helper.proc.pid, job=type(job).__name__, limit_s=self.timeout_s)
            raise EngineError(
                TOO_COMPLEX,
                f"{what} took longer than {self.timeout_s:g} s, this provider's limit: simplify the request",
                param=param,
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError, p.ProtocolError):
            if helper.generation != self._generation:
                raise EngineError("model_not_loaded", "the model was unloaded meanwhile", retryable=True) from None
            self.crashes += 1
            helper.kill()  # a reply it could not frame leaves it running
            code = await helper.proc.wait()
            log.warning("prepare_helper_died", pid=helper.proc.pid, returncode=code, job=type(job).__name__)
            message = f"{what} stopped its helper process (exit code {code})"
            raise EngineError(TOO_COMPLEX, message, param=param) from None
        finally:
            if healthy and helper.generation == self._generation:
                self._idle.put_nowait(helper)
            else:
                # Overran, died, cancelled mid-job or stale: its state is unknown, so it goes.
                self._drop(helper)
                if helper.generation == self._generation:
                    self._replace(helper.generation)
        if isinstance(reply, pp.Refused):
            raise EngineError(reply.code, reply.message, param=reply.param)
        return reply
