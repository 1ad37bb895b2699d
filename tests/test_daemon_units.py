"""The daemon's pure parts: the output pipeline (detokenizer, tool markup, stops), sampling
resolution, settings and config file, fit arithmetic, and the worker protocol framing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from daemon.engine import fit, prompt
from daemon.engine.base import EngineError, TextChunk
from daemon.engine.output import Output, TokenText
from daemon.engine.sampling import GenerationDefaults, resolve
from daemon.machine import apple_chip_name
from daemon.settings import DaemonSettings, SettingsError
from daemon.worker import protocol as p
from schemas import bus
from tests.support.output import feed_until_stopped
from tests.support.tool_model import WEATHER_TOOL, write_tool_model

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit

EOS = 2


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = write_tool_model(tiny_model_path, tmp_path_factory.mktemp("tool-model") / "tiny-tools")
    tokenizer = load_tokenizer(folder, eos_token_ids=[EOS])
    assert tokenizer.has_tool_calling, "the template names <tool_call>: mlx-lm picks its json_tools parser"
    return tokenizer


def _run(output: Output, ids: list[int], finish: str = "stop") -> list[TextChunk]:
    chunks = [output.feed(p.Token(id="r", token=t)) for t in ids]
    last = EOS if finish == "stop" else ids[-1]
    if finish == "length":
        chunks[-1] = output.feed(p.Token(id="r", token=last, finish="length"))
    else:
        chunks.append(output.feed(p.Token(id="r", token=last, finish="stop")))
    return [c for c in chunks if c is not None]


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_tool_call_is_parsed_and_content_before_it_streams_live(tool_tokenizer: Any) -> None:
    ids = tool_tokenizer.encode("Let me check the weather. " + CALL, add_special_tokens=False)
    out = Output(tool_tokenizer, stops=[], tools=[WEATHER_TOOL], token_text=None)
    chunks = _run(out, ids)
    text = "".join(c.text for c in chunks)
    calls = [call for c in chunks for call in c.tool_calls]
    assert text == "Let me check the weather. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    assert out.called_tools
    # The content went out before the markup was complete, and no markup ever did.
    first_text = next(i for i, c in enumerate(chunks) if c.text)
    first_call = next(i for i, c in enumerate(chunks) if c.tool_calls)
    assert first_text < first_call
    assert all("<" not in c.text for c in chunks)
    assert out.completion_tokens == len(ids), "the EOS token is not counted as output"


def test_unparseable_markup_falls_back_to_plain_content(tool_tokenizer: Any) -> None:
    broken = "<tool_call>not json at all</tool_call> done"
    ids = tool_tokenizer.encode(broken, add_special_tokens=False)
    out = Output(tool_tokenizer, stops=[], tools=[WEATHER_TOOL], token_text=None)
    chunks = _run(out, ids)
    assert "".join(c.text for c in chunks) == broken
    assert not out.called_tools


def test_markup_is_plain_text_when_no_tools_were_offered(tool_tokenizer: Any) -> None:
    ids = tool_tokenizer.encode(CALL, add_special_tokens=False)
    out = Output(tool_tokenizer, stops=[], tools=None, token_text=None)
    assert "".join(c.text for c in _run(out, ids)) == CALL


def test_stop_string_spanning_tokens_with_length_finish(tool_tokenizer: Any) -> None:
    ids = tool_tokenizer.encode("The sea is deep, the sea is wide.", add_special_tokens=False)
    out = Output(tool_tokenizer, stops=["is wi"], tools=None, token_text=None)
    chunks = feed_until_stopped(out, ids)
    assert "".join(c.text for c in chunks) == "The sea is deep, the sea "
    assert out.stopped


def test_logprob_bytes_rebuild_multibyte_text(tool_tokenizer: Any) -> None:
    text = "日本 🙂 café"
    ids = tool_tokenizer.encode(text, add_special_tokens=False)
    tt = TokenText(tool_tokenizer)
    assert b"".join(tt.bytes_of(t) for t in ids).decode() == text
    entry = tt.logprob(ids[0], -0.5, [(ids[0], -0.5), (ids[1], -1.5)])
    assert entry.logprob == -0.5
    assert [a[1] for a in entry.top] == [-0.5, -1.5]


def test_tool_round_trip_renders_through_the_template(tool_tokenizer: Any) -> None:
    request = bus.InferenceRequest(
        request_id="r",
        model="m",
        messages=[
            bus.BusMessage(role="user", content="Weather in Paris?"),
            bus.BusMessage(
                role="assistant",
                content="",
                tool_calls=[bus.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')],
            ),
            bus.BusMessage(role="tool", content="18C and sunny", tool_call_id="call_1"),
        ],
        params=bus.SamplingParams(max_tokens=4),
        tools=[WEATHER_TOOL],
    )
    rendered = tool_tokenizer.decode(prompt.encode(tool_tokenizer, request))
    assert '"name": "get_weather"' in rendered  # the tool list
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in rendered
    assert "<tool_response>18C and sunny</tool_response>" in rendered
    # tool_choice "none" hides the tools from the model.
    hidden = bus.InferenceRequest(
        request_id="r",
        model="m",
        messages=request.messages,
        params=request.params,
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert "You may call" not in tool_tokenizer.decode(prompt.encode(tool_tokenizer, hidden))
    with pytest.raises(EngineError) as err:
        prompt.tools_offered(
            bus.InferenceRequest(
                request_id="r",
                model="m",
                messages=[],
                params=request.params,
                tools=[WEATHER_TOOL],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        )
    assert err.value.param == "tool_choice"


# ---- sampling -------------------------------------------------------------------------


def test_generation_config_defaults(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1})
    )
    defaults = GenerationDefaults.from_model_dir(tmp_path)
    s = resolve(bus.SamplingParams(max_tokens=5), defaults, vocab_size=100)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.6, 0.95, 20, 1.1)
    # Explicit values win; top_k at or above the vocabulary is the same as off.
    s = resolve(bus.SamplingParams(max_tokens=5, temperature=0.0, top_k=500), defaults, vocab_size=100)
    assert (s.temperature, s.top_k) == (0.0, 0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert GenerationDefaults.from_model_dir(tmp_path).temperature == 0.0
    # No file: OpenAI's defaults.
    s = resolve(bus.SamplingParams(max_tokens=5), GenerationDefaults(), vocab_size=100)
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty, s.logprobs) == (1.0, 1.0, 0, 0.0, None, -1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 11.0),
        ("presence_penalty", 2.1),
        ("top_k", -2),
        ("top_logprobs", 21),
        ("logit_bias", {100: 1.0}),
        ("logit_bias", {5: 101.0}),
        ("stop", ["", "x"]),
        ("max_tokens", 0),
    ],
)
def test_bad_sampling_values_name_their_field(field: str, value: Any) -> None:
    params: dict[str, Any] = {"max_tokens": 5, field: value}
    if field == "top_logprobs":
        params["logprobs"] = True
    with pytest.raises(EngineError) as err:
        resolve(bus.SamplingParams(**params), GenerationDefaults(), vocab_size=100)
    assert (err.value.code, err.value.param) == ("invalid_value", field)


def test_seeds_map_onto_unsigned_keys() -> None:
    s = resolve(bus.SamplingParams(max_tokens=1, seed=-1), GenerationDefaults(), vocab_size=10)
    assert s.seed == (1 << 64) - 1


# ---- settings ------------------------------------------------------------------------


def test_settings_from_a_config_file_with_the_environment_winning(tmp_path: Path) -> None:
    config = tmp_path / "daemon.env"
    config.write_text(
        "# brew services reads this\n"
        "NATS_URL=tls://pool.example:4222\n"
        'MP_PROVIDER_ID="my-mac"\n'
        "export MP_SLOTS=6\n"
        "MP_IDLE_UNLOAD_S=120\n"
        "MP_MEMORY_BUDGET_GB=12\n"
    )
    s = DaemonSettings.from_env({"MP_CONFIG": str(config), "MP_SLOTS": "3"})
    assert s.nats_url == "tls://pool.example:4222"
    assert s.provider_id == "my-mac"
    assert s.slots == 3
    assert s.idle_unload_s == 120
    assert s.memory_budget_bytes == 12 << 30
    assert s.model_path is None  # a daemon may start empty and load through the admin API
    config.write_text("oops\n")
    with pytest.raises(SettingsError, match="KEY=value"):
        DaemonSettings.from_env({"MP_CONFIG": str(config)})
    with pytest.raises(SettingsError, match="MP_SLOTS"):
        DaemonSettings.from_env({"MP_SLOTS": "0"})
    with pytest.raises(SettingsError, match="MP_ADMIN_PORT"):
        DaemonSettings.from_env({"MP_ADMIN_PORT": "70000"})
    # A value that does not parse names its variable (and what it held), not just Python's complaint.
    for name, raw in (("MP_QUEUE_LIMIT", "many"), ("MP_HEARTBEAT_S", "1s"), ("MP_PROMPT_CACHE_GB", "1GB")):
        with pytest.raises(SettingsError, match=f"{name} must be .*{raw!r}"):
            DaemonSettings.from_env({name: raw})


def test_credentials_never_go_to_another_machine_over_plain_nats() -> None:
    # A Mac's provider token (or NATS password) in clear on the network would let anyone serve as it.
    for url in ("nats://pool.example:4222", "tls://a.example:4222,nats://10.0.0.7:4222", "ws://pool.example:8080"):
        with pytest.raises(SettingsError, match=r"NATS_URL: .* plain nats://.*tls://") as refused:
            DaemonSettings.from_env({"NATS_URL": url, "MP_PROVIDER_TOKEN": "mpp_not-shown"})
        assert "mpp_not-shown" not in str(refused.value)
    for url in ("tls://pool.example:4222", "nats://127.0.0.1:4222", "nats://localhost:4222,nats://[::1]:4223"):
        assert DaemonSettings.from_env({"NATS_URL": url}).nats_url == url
    # A network the operator trusts (a lab LAN) may say so explicitly.
    lan = DaemonSettings.from_env({"NATS_URL": "nats://10.0.0.7:4222", "MP_NATS_PLAINTEXT": "allow"})
    assert lan.nats_url == "nats://10.0.0.7:4222"


# ---- fit -----------------------------------------------------------------------------


def test_fit_from_the_model_folder(tiny_model_path: Path) -> None:
    fp = fit.footprint(tiny_model_path)
    assert fp.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # k+v x layers x kv heads x head dim x float32
    assert fp.context_length == 1 << 16
    assert fp.weights_bytes == (tiny_model_path / "model.safetensors").stat().st_size
    roomy = fit.admission(fp, 16 << 30)
    assert roomy.max_safe_context == fp.context_length
    tight = fit.admission(fp, fp.weights_bytes + fit.transient_bytes(fp.weights_bytes) + 512 * 300)
    assert tight.max_safe_context == 300
    assert fit.admission(fp, 1).max_safe_context == 0


def test_decode_speed_prediction_scales_with_bandwidth() -> None:
    fp = fit.Footprint(
        weights_bytes=4 << 30, kv_bytes_per_token=100_000, context_length=32768, model_type="x", quant_bits=4
    )
    slow, fast = fit.predicted_decode_tps(fp, 100, 0), fit.predicted_decode_tps(fp, 400, 0)
    assert fast == pytest.approx(4 * slow, rel=0.01)
    assert fit.predicted_decode_tps(fp, 100, 8192) < slow


def test_apple_chip_names() -> None:
    assert apple_chip_name("Apple M2 Pro") == "M2 Pro"
    assert apple_chip_name("Apple M4") == "M4"
    assert apple_chip_name("Intel(R) Core(TM) i9") is None


# ---- the worker pipe -----------------------------------------------------------------


def test_worker_frames_round_trip() -> None:
    messages = [
        p.Generate(id="a", prompt=[1, 2, 3], max_tokens=4, seed=7, logit_bias={5: 1.0}, logprobs=2),
        p.Cancel(id="a"),
        p.Shutdown(),
    ]
    stream = io.BytesIO(b"".join(p.frame(m) for m in messages))
    decoded = []
    while (body := p.read_frame(stream)) is not None:
        decoded.append(p.TO_WORKER.decode(body))
    assert decoded == messages
    out = p.Tokens(items=[p.Token(id="a", token=9, finish="length", logprob=-0.1, top=[(9, -0.1)])])
    body = p.frame(out)[p.HEADER_SIZE :]
    assert p.FROM_WORKER.decode(body) == out


# ---- packaging -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_config_template_is_valid_and_names_only_real_settings() -> None:
    import re

    template = REPO / "infra" / "homebrew" / "daemon.env"
    s = DaemonSettings.from_env({}, config_file=template)
    assert (s.slots, s.idle_unload_s, s.api_port, s.admin_port, s.log_json) == (8, 600, 11440, 11441, True)
    # Read by the daemon's settings, and by `login` (its own few, daemon/login.py).
    readers = ("settings.py", "login.py")
    known = {n for f in readers for n in re.findall(r'"((?:MP|NATS)_[A-Z_]+)"', (REPO / "daemon" / f).read_text())}
    named = set(re.findall(r"^#?\s*((?:MP|NATS)_[A-Z_]+)=", template.read_text(), re.MULTILINE))
    assert named, "the template documents settings"
    assert named <= known, named - known


def test_service_definitions_run_the_daemon_with_its_config_file() -> None:
    unit = (REPO / "infra" / "systemd" / "mac-provider-daemon.service").read_text()
    assert "ExecStart=/opt/mac-provider/bin/mac-provider-daemon serve --config /etc/mac-provider/daemon.env" in unit
    assert "KillMode=mixed" in unit
    formula = (REPO / "infra" / "homebrew" / "mac-provider-daemon.rb").read_text()
    assert 'run [opt_bin/"mac-provider-daemon", "serve", "--config", etc/"mac-provider/daemon.env"]' in formula
    assert 'log_path var/"log/mac-provider-daemon.log"' in formula
    assert "keep_alive" in formula


async def test_the_synthetic_engine_continues_another_providers_answer_within_max_tokens() -> None:
    """The benchmarks' stand-in keeps the continuation protocol as a real engine does: a failed-over request
    gets only the tokens max_tokens still allows (more would be a violation that suspends the provider)."""
    from daemon.engine.base import CancelToken, Finished
    from daemon.engine.synthetic import WORDS, SyntheticEngine
    from schemas import bus

    engine = SyntheticEngine()
    request = bus.InferenceRequest(
        request_id="r1",
        model="synthetic",
        messages=[bus.BusMessage(role="user", content="hi")],
        params=bus.SamplingParams(max_tokens=5),
        deadline_ms=0,
        continuation=bus.Continuation(token_ids=[0, 1, 2], text="".join(WORDS[:3])),
    )
    events = [e async for e in engine.generate(await engine.prepare(request), CancelToken())]
    chunks = [e for e in events if isinstance(e, TextChunk)]
    assert [c.text for c in chunks] == list(WORDS[3:5])
    assert isinstance(events[-1], Finished)
    assert events[-1].completion_tokens == 2
