"""Pure logic: stop-sequence filtering, subjects, the pool view's routing rule, reply ordering."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import msgspec
import pytest

from daemon.engine.text import StopFilter
from schemas import bus, subjects
from services.gateway.pool import PoolView
from services.gateway.replies import ReplyStream, StreamBroken
from services.keys import format as key_format
from services.responses.convert import surface_param

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit


def _feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    f = StopFilter(stops)
    out = [f.feed(p) for p in pieces]
    return out, f.stopped, f.flush()


def test_stop_spanning_pieces_fires_and_is_never_emitted() -> None:
    out, stopped, tail = _feed(["END"], ["Hello E", "N", "D and more"])
    assert "".join(out) == "Hello "
    assert stopped
    assert tail == ""
    assert all("E" not in piece for piece in out)


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    out, stopped, tail = _feed(["END"], ["Hello E", "X"])
    assert out == ["Hello ", "EX"]
    assert not stopped
    out, stopped, tail = _feed(["END"], ["Hello EN"])
    assert (out, stopped, tail) == (["Hello "], False, "EN")


def test_earliest_of_several_stops_wins() -> None:
    out, stopped, _ = _feed(["b", "xyz"], ["axyzb"])
    assert out == ["a"]
    assert stopped


def test_no_stops_passes_everything() -> None:
    assert _feed([], ["a", "b"]) == (["a", "b"], False, "")


def test_subjects_are_built_and_parsed() -> None:
    subject = subjects.reply("mac-1", "gw-2", "abc")
    assert subject == "mp.v1.reply.mac-1.gw-2.abc"
    assert subjects.parse_reply(subject) == ("mac-1", "gw-2", "abc")
    assert subject.startswith(subjects.reply_prefix("mac-1"))
    assert subjects.work("mac-1") == "mp.v1.work.mac-1"
    for bad in ("a.b", "*", ">", "", "x" * 65, "sp ace", "abc\n", "tab\t", "caf\u00e9", "\u0661", "a/b", "a+b"):
        with pytest.raises(subjects.SubjectError):
            subjects.work(bad)
        assert not subjects.valid_token(bad)
    for good in ("-", "_", "--__", "x" * 64, "Mac-1_b", "0"):
        assert subjects.valid_token(good)
        assert subjects.work(good) == f"mp.v1.work.{good}"


def _hb(
    pid: str, *, slots: int = 1, free: int = 1, queue: int = 0, tps: float = 10.0, model: str = "m"
) -> bus.Heartbeat:
    return bus.Heartbeat(
        provider_id=pid,
        daemon_version="t",
        boot_id="b",
        models=[bus.ModelInfo(id=model)],
        slots=slots,
        slots_free=free,
        queue_depth=queue,
        queue_limit=4,
        decode_tps=tps,
        interval_s=1.0,
        sent_at_ms=0,
    )


def test_routing_prefers_free_slots_then_load_then_measured_speed() -> None:
    pool = PoolView()
    pool.observe(_hb("busy", free=0, queue=1))
    # Speed is what this replica measured; a claim in the heartbeat decides nothing.
    pool.observe(_hb("slow", tps=5000))
    pool.observe(_hb("fast", tps=1))
    pool.observe(_hb("other-model", model="x"))
    pool.note_first_token("slow", 0.5)
    pool.note_decoding("slow", 100, 10.0)
    pool.note_first_token("fast", 0.1)
    pool.note_decoding("fast", 100, 1.0)
    assert [s.provider_id for s in pool.candidates("m")] == ["fast", "slow", "busy"]
    # Requests sent since the last heartbeat count against a provider.
    pool.note_sent("fast")
    assert [s.provider_id for s in pool.candidates("m")] == ["slow", "fast", "busy"]
    assert pool.candidates("nope") == []


def test_a_provider_cannot_hide_load_from_the_replica_that_sent_it_work() -> None:
    pool = PoolView()
    pool.observe(_hb("liar", slots=8, free=8))
    pool.observe(_hb("honest", slots=2, free=2))
    for _ in range(8):
        pool.note_sent("liar")
        # Its next heartbeat claims every slot free again: the requests this replica has there still count.
        pool.observe(_hb("liar", slots=8, free=8))
    liar = pool.providers["liar"]
    assert liar.free_slots() == 0
    assert liar.load() == 1.0
    assert [s.provider_id for s in pool.candidates("m")] == ["honest", "liar"]


def test_a_provider_that_failed_us_goes_behind_the_others() -> None:
    clock = [100.0]
    pool = PoolView(clock=lambda: clock[0])
    pool.observe(_hb("flaky", slots=4, free=4))
    pool.observe(_hb("steady", slots=1, free=1))
    assert pool.candidates("m")[0].provider_id == "flaky"
    pool.note_failure("flaky")
    assert [s.provider_id for s in pool.candidates("m")] == ["steady", "flaky"]
    clock[0] += 61
    pool.observe(_hb("flaky", slots=4, free=4))
    pool.observe(_hb("steady", slots=1, free=1))
    assert pool.candidates("m")[0].provider_id == "flaky"


def test_routing_prefers_the_provider_holding_the_conversation_unless_much_busier() -> None:
    pool = PoolView()
    pool.observe(_hb("idle", slots=2, free=2, tps=50))
    warm = msgspec.structs.replace(_hb("warm", slots=2, free=0, queue=0, tps=10), cached_conversations=["k1"])
    pool.observe(warm)
    # Busy but within one request per slot of the idle one: the cache wins.
    assert next(s.provider_id for s in pool.candidates("m", "k1")) == "warm"
    assert next(s.provider_id for s in pool.candidates("m", "other")) == "idle"
    pool.observe(msgspec.structs.replace(warm, queue_depth=3))
    assert next(s.provider_id for s in pool.candidates("m", "k1")) == "idle"


def test_requests_finished_before_the_next_heartbeat_give_their_place_back() -> None:
    pool = PoolView()
    pool.observe(_hb("a", slots=2, free=2))
    epochs = [pool.note_sent("a") for _ in range(2)]
    assert pool.candidates("m")[0].free_slots() == 0
    pool.note_finished("a", epochs[0])
    assert pool.candidates("m")[0].free_slots() == 1
    # After a new heartbeat, the provider's own numbers count; old tokens change nothing.
    pool.observe(_hb("a", slots=2, free=1))
    pool.note_finished("a", epochs[1])
    assert pool.candidates("m")[0].free_slots() == 1


def test_when_everything_is_busy_more_slots_win_over_a_faster_single_slot() -> None:
    pool = PoolView()
    pool.observe(_hb("one-slot", slots=1, free=0, tps=40))
    pool.observe(_hb("four-slots", slots=4, free=0, tps=10))
    assert next(s.provider_id for s in pool.candidates("m")) == "four-slots"


def test_full_and_draining_providers_are_not_candidates() -> None:
    pool = PoolView()
    pool.observe(_hb("full", free=0, queue=4))
    pool.observe(_hb("ok"))
    pool.observe(bus.Heartbeat(**{**msgspec.structs.asdict(_hb("drain")), "draining": True}))
    assert [s.provider_id for s in pool.candidates("m")] == ["ok"]


def test_json_requests_go_only_to_providers_that_can_constrain() -> None:
    pool = PoolView()
    pool.observe(_hb("free-text", tps=90))
    able = _hb("constrains", tps=10)
    pool.observe(msgspec.structs.replace(able, models=[bus.ModelInfo(id="m", structured_output=True)]))
    assert [s.provider_id for s in pool.candidates("m")] == ["free-text", "constrains"]
    assert [s.provider_id for s in pool.candidates("m", structured=True)] == ["constrains"]
    assert pool.can_structure("m")
    pool.remove("constrains")
    assert pool.candidates("m", structured=True) == []
    assert not pool.can_structure("m")


def test_responses_name_their_own_text_format_field() -> None:
    assert surface_param("response_format.json_schema.schema") == "text.format.schema"
    assert surface_param("response_format") == "text.format"
    assert surface_param("input[0].call_id") == "input[0].call_id"
    assert surface_param(None) is None


def test_missed_heartbeats_expire_and_notify_watchers() -> None:
    now = [100.0]
    pool = PoolView(heartbeat_misses=3, clock=lambda: now[0])
    pool.observe(_hb("a"))
    lost: list[str] = []
    handle = pool.watch("a", lost.append)
    now[0] += 2.9
    assert pool.expire() == []
    now[0] += 0.2
    assert pool.expire() == ["a"]
    assert lost == ["a"]
    pool.unwatch("a", handle)  # harmless after the fact


async def test_reply_stream_detects_gaps_and_drops_duplicates() -> None:
    stream = ReplyStream("r", "p")
    stream.push(bus.Accepted(seq=0, prompt_tokens=3))
    stream.push(bus.Accepted(seq=0, prompt_tokens=3))  # duplicate
    stream.push(bus.Delta(seq=1, text="a", tokens=1))
    stream.push(bus.Delta(seq=3, text="c", tokens=1))  # seq 2 missing
    assert isinstance(await stream.next(1), bus.Accepted)
    assert await stream.next(1) == bus.Delta(seq=1, text="a", tokens=1)
    assert stream.duplicates == 1
    with pytest.raises(StreamBroken) as info:
        await stream.next(1)
    assert info.value.code == "provider_protocol_error"


async def test_reply_stream_hands_over_ready_deltas_in_order_and_takes_back_a_refused_one() -> None:
    """`take_delta` takes only a Delta that is next in sequence and already here; one its taker refuses
    (`untake`) is what `next` returns, so the ordinary path meets it again (and fails over there)."""
    stream = ReplyStream("r", "p")
    assert stream.take_delta() is None  # nothing yet
    stream.push(bus.Accepted(seq=0, prompt_tokens=3))
    assert stream.take_delta() is None, "not a Delta: left for `next`"
    assert isinstance(await stream.next(1), bus.Accepted)
    one, two = bus.Delta(seq=1, text="a", tokens=1), bus.Delta(seq=2, text="b", tokens=1)
    stream.push(bus.Delta(seq=5, text="?", tokens=1))
    assert stream.take_delta() is None, "out of sequence: left for `next` (which reports the gap)"
    stream = ReplyStream("r", "p")
    stream.push(bus.Accepted(seq=0, prompt_tokens=3))
    await stream.next(1)
    stream.push(one)
    stream.push(two)
    assert stream.take_delta() is one
    refused = stream.take_delta()
    assert refused is two
    stream.untake(refused)
    assert await stream.next(1) is two
    stream.push(bus.Done(seq=3, finish_reason="stop", prompt_tokens=3, completion_tokens=2))
    assert stream.take_delta() is None
    assert isinstance(await stream.next(1), bus.Done)


async def test_reply_stream_silence_is_reported_and_loss_is_recoverable() -> None:
    stream = ReplyStream("r", "p")
    assert await stream.next(0.05) is None
    stream.lost("p")
    with pytest.raises(StreamBroken) as info:
        await stream.next(1)
    assert info.value.code == "provider_lost"
    assert info.value.recoverable
    await asyncio.sleep(0)


async def test_reply_stream_waits_exactly_its_own_time_with_one_timer() -> None:
    """`next(timeout)` shares one timer per stream: a wake-up armed for an earlier, shorter wait neither ends
    a longer wait early nor counts as a frame ready; a shorter wait than the timer's is not made longer."""
    loop = asyncio.get_running_loop()
    stream = ReplyStream("r", "p")
    loop.call_later(0.01, stream.push, bus.Accepted(seq=0, prompt_tokens=3))
    assert isinstance(await stream.next(0.05), bus.Accepted)  # its timer (+0.05 s) stays armed
    started = loop.time()
    assert await stream.next(0.3) is None
    assert loop.time() - started >= 0.29, "the earlier wait's wake-up ended this one early"
    loop.call_later(0.01, stream.push, bus.Delta(seq=1, text="a", tokens=1))
    assert await stream.next(5) == bus.Delta(seq=1, text="a", tokens=1)  # a timer armed for +5 s
    started = loop.time()
    assert await stream.next(0.05) is None
    assert loop.time() - started < 1, "a shorter wait than the armed timer's waited for that timer"
    loop.call_later(0.005, stream.push, bus.Delta(seq=2, text="b", tokens=1))
    assert await stream.next(0.02) is not None  # its timer stays armed, and fires with nobody waiting
    await asyncio.sleep(0.05)
    assert not stream.ready(), "a timer's wake-up is not a frame ready to be joined"
    stream.push(bus.Delta(seq=3, text="c", tokens=1))
    assert stream.ready()
    assert await stream.next(1) == bus.Delta(seq=3, text="c", tokens=1)
    stream.release()


def test_frames_round_trip_msgpack() -> None:
    frames: list[bus.Frame] = [
        bus.Accepted(seq=0, prompt_tokens=1),
        bus.Delta(seq=1, text="é日🙂", tokens=2),
        bus.Done(seq=2, finish_reason="length", prompt_tokens=1, completion_tokens=2),
        bus.Failed(seq=3, code="x", message="y", retryable=True),
    ]
    assert [bus.decode_frame(bus.encode(f)) for f in frames] == frames


def test_key_format() -> None:
    keys = {key_format.generate() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("mp_")
        assert len(key) == key_format.KEY_LENGTH
        assert key_format.well_formed(key)
    key = keys.pop()
    flipped = key[:10] + ("a" if key[10] != "a" else "b") + key[11:]
    assert not key_format.well_formed(flipped)
    assert key_format.digest(key) != key_format.digest(flipped)


def test_the_control_plane_uses_no_deprecated_litestar_style() -> None:
    """Inferred dependencies and path parameters stop working in Litestar 3: every route marks them."""
    import warnings

    from litestar.exceptions import LitestarDeprecationWarning

    from services.app import create_app
    from services.settings import Settings

    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "NATS_URL": "nats://127.0.0.1:1", "MP_SECRET_KEY": "k" * 64}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", LitestarDeprecationWarning)
        create_app(settings)


def test_sse_events_survive_clients_that_split_lines_like_python() -> None:
    from schemas import sse

    # A model may emit NEL, LINE SEPARATOR or PARAGRAPH SEPARATOR: httpx's aiter_lines() and
    # str.splitlines() break lines there, SSE does not. Each event must stay one line.
    text = "a\x85b\u2028c\u2029d\x1ce\u00e9\u2027"
    for event in (sse.data({"t": text}), sse.named("x", {"t": text})):
        lines = [line for line in event.decode().splitlines() if line]
        assert lines[-1].startswith("data: ")
        assert json.loads(lines[-1].removeprefix("data: ")) == {"t": text}


async def test_a_hang_up_arriving_with_a_frame_still_cancels_the_request() -> None:
    # On Python 3.11, asyncio.wait_for() loses a cancellation that arrives in the same loop turn
    # as the item it waits for (gh-86296): the buyer's hang-up was then ignored and the provider
    # generated on to max_tokens. The frame and the cancel arrive together here, every time.
    for _ in range(20):
        stream = ReplyStream("r", "p")

        async def consume(stream: ReplyStream = stream) -> None:
            while True:
                await stream.next(5)

        task = asyncio.create_task(consume())
        for _ in range(2):
            await asyncio.sleep(0)
        stream.push(bus.Delta(seq=0, text="x", tokens=1, token_ids=[1]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)


def test_a_free_port_is_never_one_already_promised(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mac-provider up` starts Postgres and NATS on free ports before the control plane binds MP_PORT:
    the kernel may offer that very port (seen once); it is skipped."""
    import infra.ports as ports

    offered = iter([8080, 8080, 5433])

    class Scripted:
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> Scripted:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def bind(self, address: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", next(offered))

    monkeypatch.setattr(ports.socket, "socket", Scripted)
    assert ports.free_port(avoid={8080}) == 5433


def test_fail_codes_sort_into_exactly_one_kind_and_all_are_metric_labels() -> None:
    import typing

    from schemas import codes
    from services.metrics.labels import known_codes

    kinds = [set(typing.get_args(k)) for k in (codes.RequestFault, codes.Recoverable, codes.ProviderFault)]
    assert sum(len(k) for k in kinds) == len(codes.FAIL_CODES)  # no code in two kinds
    assert codes.is_request_fault("context_length_exceeded")
    assert not codes.is_recoverable("context_length_exceeded")
    assert codes.is_recoverable("worker_crashed")
    assert not codes.is_request_fault("worker_crashed")
    # A code no kind knows (a newer or lying daemon) is neither the buyer's fault nor recoverable.
    assert not codes.is_request_fault("invalid_whatever")
    assert not codes.is_recoverable("invalid_whatever")
    assert known_codes() >= codes.FAIL_CODES | codes.STREAM_ENDS


def test_the_body_decoder_takes_integral_floats_for_integers_and_names_nested_fields() -> None:
    from schemas import body, openai

    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3.0,"top_logprobs":2.0}'
    req = body.decode(raw, openai.ChatCompletionRequest)
    assert (req.max_tokens, req.top_logprobs) == (3, 2)
    with pytest.raises(body.BodyError) as refused:
        body.decode(raw.replace(b"3.0", b"3.5"), openai.ChatCompletionRequest)
    assert (refused.value.code, refused.value.param) == ("invalid_value", "max_tokens")
    with pytest.raises(body.BodyError) as nested:
        body.decode(b'{"model":"m","messages":[{"role":"user","content":5}]}', openai.ChatCompletionRequest)
    assert nested.value.param == "messages[0].content"


def test_admin_commands_read_settings_without_writing_secrets(tmp_path: Path) -> None:
    from services.cli import main

    home = tmp_path / "home"
    env = {"MP_HOME": str(home), "DATABASE_URL": "postgresql://x@127.0.0.1:1/x"}
    with pytest.MonkeyPatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        m.delenv("MP_SECRET_KEY", raising=False)
        m.delenv("MP_METRICS_TOKEN", raising=False)
        # Reads the settings, finds no database, changes nothing.
        assert main(["migrate", "--check"]) == 3
    assert not (home / "secret_key").exists()
    assert not (home / "metrics_token").exists()


@pytest.mark.parametrize(
    "outage",
    [ConnectionRefusedError(111, "refused"), asyncpg.exceptions.CannotConnectNowError("starting up")],
    ids=["refused", "starting-up"],
)
def test_a_database_outage_is_a_503_to_retry_not_a_500(outage: Exception) -> None:
    # Postgres restarting (a deploy, a failover) is seconds of unavailability, not a bug in the request.
    from litestar import Litestar, get
    from litestar.testing import TestClient

    from services.errors import exception_handler

    @get("/v1/probe")
    async def probe() -> None:
        raise outage

    with TestClient(Litestar([probe], exception_handlers={Exception: exception_handler})) as client:
        r = client.get("/v1/probe")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "coordinator_unavailable"
    assert r.headers["retry-after"] == "1"


def test_usage_stream_settings_are_read_and_bounded() -> None:
    from services.settings import Settings, SettingsError

    base = {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "NATS_URL": "nats://127.0.0.1:1", "MP_SECRET_KEY": "k" * 64}
    default = Settings.from_env(base)
    assert (default.settlement, default.usage_stream_replicas, default.usage_stream_max_mb) == ("jetstream", 1, 256)
    set_ = Settings.from_env({**base, "MP_SETTLEMENT": "postgres", "MP_USAGE_STREAM_MAX_MB": "1024"})
    assert (set_.settlement, set_.usage_stream_max_mb) == ("postgres", 1024)
    for key, bad in (("MP_SETTLEMENT", "kafka"), ("MP_USAGE_STREAM_MAX_MB", "1"), ("MP_LEDGER_LINGER_MS", "5000")):
        with pytest.raises(SettingsError, match=key):
            Settings.from_env({**base, key: bad})


def test_json_log_lines_render_every_value() -> None:
    """MP_LOG_FORMAT=json: one JSON object per line, and a value JSON has no type for is its repr, never
    an exception that loses the line."""
    import datetime as dt

    from schemas.logs import _to_json

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    line = _to_json({"event": "chat_completion", "ttft_ms": 1.5, "day": dt.date(2026, 1, 2), "what": Opaque()})
    assert json.loads(line) == {"event": "chat_completion", "ttft_ms": 1.5, "day": "2026-01-02", "what": "<opaque>"}


def test_log_timestamps_are_utc_iso_to_the_microsecond_across_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """`UtcStamp` formats the date and time of day once a second: each line's stamp is still its own
    instant, in structlog's ISO form (`Z` for UTC), across a second's and a day's end."""
    import datetime as dt
    import time as time_module

    from schemas.logs import UtcStamp

    stamp = UtcStamp()
    expected: list[str] = []
    got: list[str] = []
    start = dt.datetime(2026, 12, 31, 23, 59, 58, tzinfo=dt.UTC).timestamp()
    for offset in (0.000001, 0.5, 0.999999, 1.0, 1.25, 2.000001, 2.75):
        now = start + offset
        monkeypatch.setattr(time_module, "time", lambda now=now: now)
        got.append(stamp(None, "info", {})["timestamp"])
        instant = dt.datetime.fromtimestamp(now, dt.UTC)
        expected.append(instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    # Float seconds carry about 0.2 us of error at this magnitude: compare to the microsecond, allowing one.
    for ours, theirs in zip(got, expected, strict=True):
        a = dt.datetime.fromisoformat(ours.replace("Z", "+00:00"))
        b = dt.datetime.fromisoformat(theirs.replace("Z", "+00:00"))
        assert abs((a - b).total_seconds()) <= 1e-6, (ours, theirs)
        assert ours[:19] == theirs[:19], (ours, theirs)
    assert got[-1].startswith("2027-01-01T00:00:00.75"), got


def test_summary_lines_are_written_as_structlog_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary line's own JSON writer (`SummaryLines`) gives the line structlog gives under the same
    configuration: the same keys in the same order, the same values; nothing above `info`'s level; and
    in the console format it is structlog's own line."""
    import io
    import sys

    import structlog

    from schemas.logs import SummaryLines, configure

    fields = {
        "request_id": "0123456789abcdef01234567",
        "key_id": 7,
        "model": "m/ü",
        "provider": None,
        "stream": False,
        "prompt_tokens": 12,
        "completion_tokens": 64,
        "dispatch_ms": 0.12,
        "status": "client_disconnected",
    }
    saved = structlog.get_config()
    try:
        out = io.BytesIO()
        monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(out, encoding="utf-8"))
        configure(json=True)
        structlog.get_logger("gateway").info("chat_completion", **fields)
        SummaryLines("gateway", json=True)("chat_completion", dict(fields))
        SummaryLines("gateway", json=True, level="warning")("chat_completion", dict(fields))
        theirs, ours = (json.loads(line) for line in out.getvalue().splitlines())
        assert list(ours) == list(theirs) == [*fields, "event", "level", "timestamp"]
        assert {**ours, "timestamp": None} == {**theirs, "timestamp": None}
        assert ours["event"] == "chat_completion"
        assert ours["level"] == "info"

        text = io.StringIO()  # no binary buffer underneath: structlog's own line, as text
        monkeypatch.setattr(sys, "stderr", text)
        configure(json=False)
        SummaryLines("gateway", json=False)("chat_completion", dict(fields))
        console = text.getvalue()
        assert "chat_completion" in console
        assert "request_id=0123456789abcdef01234567" in console
    finally:
        structlog.configure(**saved)
