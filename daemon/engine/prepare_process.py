"""`python -m daemon.engine.prepare_process`: a prepare helper, killable, off the daemon's event loop.

It loads the model's tokenizer, says Ready, then does one job at a time: the
chat template and tokenization of a request (`Render`), or the llguidance
grammar of a JSON schema (`Compile`). Both run the buyer's input through
code whose cost the input decides (a Jinja template, a schema compiler), so
the daemon gives each job a time limit and kills this process when a job
overruns (daemon/engine/prepare_pool.py). Messages are length-prefixed
msgpack on its stdin/stdout, framed as the worker's are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

from daemon.child import add_log_args, become_child
from daemon.engine import prompt, structured
from daemon.engine.base import EngineError
from daemon.worker import protocol as p
from schemas import bus
from schemas.codes import FailCode

log = structlog.get_logger("daemon.prepare")


class Render(msgspec.Struct, frozen=True, tag="render"):
    request: bus.InferenceRequest


class Compile(msgspec.Struct, frozen=True, tag="compile"):
    schema: dict[str, Any]


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    pid: int


class LoadFailed(msgspec.Struct, frozen=True, tag="load_failed"):
    message: str


class Rendered(msgspec.Struct, frozen=True, tag="rendered"):
    tokens: list[int]


class Compiled(msgspec.Struct, frozen=True, tag="compiled"):
    grammar: str


class Refused(msgspec.Struct, frozen=True, tag="refused"):
    """The job's input is wrong (an EngineError in this process)."""

    code: FailCode
    message: str
    param: str | None = None


Job = Render | Compile
Reply = Ready | LoadFailed | Rendered | Compiled | Refused

JOBS = msgspec.msgpack.Decoder(Job)
REPLIES = msgspec.msgpack.Decoder(Reply)


def run(tokenizer: Any, job: Job) -> Reply:
    try:
        if isinstance(job, Compile):
            return Compiled(grammar=structured.compile_schema(job.schema))
        return Rendered(tokens=prompt.render(tokenizer, job.request))
    except EngineError as exc:
        return Refused(code=exc.code, message=exc.message, param=exc.param)
    except Exception as exc:  # RecursionError and MemoryError included
        # Whatever the template or the compiler choked on came from the request.
        if isinstance(job, Compile):
            return Refused("invalid_value", f"the JSON schema is not usable: {exc}", structured.SCHEMA_PARAM)
        param = "prompt" if job.request.prompt is not None else "messages"
        return Refused("invalid_messages", f"the prompt could not be built: {type(exc).__name__}: {exc}", param)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.engine.prepare_process")
    parser.add_argument("--model-path", type=Path, required=True)
    add_log_args(parser)
    args = parser.parse_args(argv)
    # Replies go to a private stdout; the daemon stops us by closing our stdin, or SIGKILL when a job overruns.
    out = become_child(args)
    try:
        tokenizer = prompt.load_tokenizer(args.model_path)
    except Exception as exc:
        log.exception("prepare_helper_load_failed", model_path=str(args.model_path))
        out.write(p.frame(LoadFailed(message=f"{type(exc).__name__}: {exc}")))
        return 1
    out.write(p.frame(Ready(pid=os.getpid())))
    stdin = sys.stdin.buffer
    while (body := p.read_frame(stdin)) is not None:
        out.write(p.frame(run(tokenizer, JOBS.decode(body))))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # No interpreter teardown: the tokenizer and the libraries' state go with the process.
    os._exit(code)
