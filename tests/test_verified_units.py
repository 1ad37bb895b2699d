"""Verified models in pieces: the identity of a model folder and its cache, the catalog's verdicts,
the canary comparison's tolerance. No servers (the whole path: test_verified_models.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from daemon.models.identity import CACHE_FILE_NAME, IdentityError, WeightsHasher, identity_files
from schemas import bus
from services.canary import prompts
from services.canary.compare import LOGPROB_TOLERANCE, NEAR_TIE, Answer, compare, margin
from services.catalog.catalog import Catalog

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\x00" * 4096)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer.json").write_text("{}")
    (root / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (root / "README.md").write_text("not part of the identity")
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "sub").mkdir()
    (root / "sub" / "model.safetensors").write_bytes(b"ignored")
    return root


def test_identity_covers_weights_config_and_tokenizer_only(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m")
    assert [p.name for p in identity_files(folder)] == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hasher = WeightsHasher(tmp_path / "state")
    base = hasher.identity(folder).sha256
    (folder / "README.md").write_text("edited")
    assert hasher.identity(folder).sha256 == base
    for name, content in (
        ("tokenizer_config.json", '{"chat_template": "other"}'),
        ("config.json", '{"model_type": "llama", "rope_traditional": true}'),
    ):
        before = (folder / name).read_text()
        (folder / name).write_text(content)
        assert hasher.identity(folder).sha256 != base, name
        (folder / name).write_text(before)
        assert hasher.identity(folder).sha256 == base, name
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\x01")
    assert hasher.identity(folder).sha256 != base


def test_identity_is_cached_per_path_size_and_mtime(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m")
    state = tmp_path / "state"
    first = WeightsHasher(state).identity(folder)
    assert (first.bytes_hashed, first.files_from_cache) == (first.bytes_total, 0)
    # A new hasher (a restarted daemon) on the same state folder reads nothing.
    again = WeightsHasher(state).identity(folder)
    assert (again.sha256, again.bytes_hashed, again.files_from_cache) == (first.sha256, 0, 4)
    assert (state / CACHE_FILE_NAME).stat().st_mode & 0o077 == 0
    # One byte changed (new mtime): that file alone is read again, and the identity changes.
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    changed = WeightsHasher(state).identity(folder)
    assert changed.sha256 != first.sha256
    assert (changed.bytes_hashed, changed.files_from_cache) == (4096, 3)


def test_a_corrupt_cache_is_ignored_and_a_folder_without_weights_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m")
    state = tmp_path / "state"
    state.mkdir()
    (state / CACHE_FILE_NAME).write_text(json.dumps({"version": 1, "files": {str(folder / "x"): "nonsense"}}))
    assert WeightsHasher(state).identity(folder).bytes_hashed > 0
    (state / CACHE_FILE_NAME).write_text("{not json")
    assert WeightsHasher(state).identity(folder).files == 4
    (folder / "model.safetensors").unlink()
    (folder / "sub" / "model.safetensors").unlink()
    with pytest.raises(IdentityError):
        WeightsHasher(state).identity(folder)


def test_heartbeats_carry_a_bounded_weights_hash() -> None:
    decoder = bus.decoder(bus.ModelInfo)
    good = bus.ModelInfo("m", weights_sha256="ab" * 32)
    assert decoder.decode(bus.encode(good)) == good
    assert decoder.decode(bus.encode(bus.ModelInfo("m"))).weights_sha256 == ""
    for bad in ("AB" * 32, "ab" * 33, "zz" * 32, "ab" * 31):
        with pytest.raises(Exception, match="weights_sha256"):
            decoder.decode(bus.encode(bus.ModelInfo("m", weights_sha256=bad)))


# ---- the catalog's verdicts -----------------------------------------------------------------------

A, B = "a" * 64, "b" * 64


def _catalog(mode: str) -> Catalog:
    catalog = Catalog(None, "postgresql://unused", uncatalogued=mode)
    catalog._entries = {"listed": frozenset({A}), "revoked": frozenset()}
    return catalog


@pytest.mark.parametrize(
    ("model", "sha", "mode", "status", "routed"),
    [
        ("listed", A, "refuse", "verified", True),
        ("listed", B, "refuse", "hash_mismatch", False),
        ("listed", "", "refuse", "hash_pending", False),
        ("revoked", A, "allow", "hash_mismatch", False),
        ("other", A, "refuse", "not_in_catalog", False),
        ("other", A, "allow", "uncatalogued", True),
        ("listed", B, "allow", "hash_mismatch", False),
    ],
)
def test_catalog_verdicts(model: str, sha: str, mode: str, status: str, routed: bool) -> None:
    verdict = _catalog(mode).verdict(bus.ModelInfo(model, weights_sha256=sha))
    assert (verdict.status, verdict.routed, verdict.weights_sha256) == (status, routed, sha)
    assert verdict.routed or verdict.detail


def test_catalog_notices_allow_and_revoke_without_reopening_the_id() -> None:
    catalog = _catalog("allow")
    changes: list[int] = []
    catalog.on_change(lambda: changes.append(1))
    catalog._notified(json.dumps({"model_id": "listed", "weights_sha256": B, "active": True}))
    assert catalog.verdict(bus.ModelInfo("listed", weights_sha256=B)).routed
    for sha in (A, B):
        catalog._notified(json.dumps({"model_id": "listed", "weights_sha256": sha, "active": False}))
    # Every hash revoked: the id stays catalogued (refused), even where uncatalogued ids are allowed.
    assert catalog.verdict(bus.ModelInfo("listed", weights_sha256=A)).status == "hash_mismatch"
    assert len(changes) == 3


# ---- the canary comparison ------------------------------------------------------------------------


def _answer(ids: list[int], lps: list[float] | None = None, margins: list[float] | None = None) -> Answer:
    n = len(ids)
    return Answer(
        tuple(ids),
        tuple(lps) if lps is not None else (None,) * n,
        tuple(margins) if margins is not None else (None,) * n,
        "length",
    )


REF = _answer([5, 6, 7, 8, 9, 10], [-0.1, -0.5, -1.0, -0.2, -0.3, -0.4], [3.0, 2.0, 0.1, 2.0, 2.0, 2.0])


def test_same_weights_on_other_hardware_pass() -> None:
    wobble = LOGPROB_TOLERANCE / 3
    result = compare(_answer([5, 6, 7, 8, 9, 10], [-0.1 + wobble, -0.5, -1.0 - wobble, -0.2, -0.3, -0.4]), REF)
    assert (result.result, result.compared) == ("passed", 6)


def test_a_near_tie_broken_the_other_way_is_not_a_failure() -> None:
    # Token 2 led its runner-up by 0.1 nats: rounding may pick the other one; the rest then differs.
    result = compare(_answer([5, 6, 99, 1, 1, 1], [-0.1, -0.5, -1.1, -3.0, -3.0, -3.0]), REF)
    assert (result.result, result.compared) == ("inconclusive", 2)
    assert "near tie" in result.detail
    long_ref = _answer(list(range(10)), [-0.1] * 10, [2.0] * 5 + [NEAR_TIE / 2] + [2.0] * 4)
    assert compare(_answer([0, 1, 2, 3, 4, 99, 0, 0, 0, 0]), long_ref).result == "passed"


def test_other_weights_fail() -> None:
    result = compare(_answer([5, 60, 7, 8, 9, 10]), REF)
    assert (result.result, result.compared) == ("failed", 1)
    assert "token 1 is 60 where the reference has 6" in result.detail
    # The same tokens with another distribution: other weights that happen to agree on the argmax.
    result = compare(_answer([5, 6, 7, 8, 9, 10], [-0.1, -0.5 - 2 * LOGPROB_TOLERANCE, -1.0, -0.2, -0.3, -0.4]), REF)
    assert (result.result, result.compared) == ("failed", 1)
    # Stopping early where the reference's next token was clear.
    early = Answer((5, 6, 7, 8), (None,) * 4, (None,) * 4, "stop")
    assert compare(early, REF).result == "failed"


def test_margin_is_the_lead_over_the_best_other_token() -> None:
    item = bus.TokenLogprob("a", -0.2, [97], [("a", -0.2, [97]), ("b", -1.7, [98])])
    assert margin(item) == pytest.approx(1.5)
    # Two tokens that are each part of a character show the same text, not the same bytes.
    item = bus.TokenLogprob("\ufffd", -0.2, [0xE6], [("\ufffd", -0.2, [0xE6]), ("\ufffd", -0.3, [0xE7])])
    assert margin(item) == pytest.approx(0.1)
    assert margin(bus.TokenLogprob("a", -0.2, [97], [])) is None


def test_a_canary_is_a_plain_chat_completion() -> None:
    first = prompts.request("m", prompts.PROMPTS[0], 16, deadline_s=600, keepalive_ms=2000)
    second = prompts.request("m", prompts.PROMPTS[0], 16, deadline_s=600, keepalive_ms=2000)
    assert first.request_id != second.request_id
    assert len(first.request_id) == 24  # the gateway's own request ids (services/ids.py)
    assert (first.params.temperature, first.params.logprobs, first.params.max_tokens) == (0, True, 16)
    # The deadline a buyer's request carries (MP_REQUEST_TIMEOUT_S), not a canary's own shorter wait.
    assert abs(first.deadline_ms / 1000 - time.time() - 600) < 5
    # Every other field the gateway sets on a buyer's streamed request: a daemon must not tell them apart.
    assert (first.frame_ms, first.bundle, first.keepalive_ms) == (0, True, 2000)
    assert prompts.prompt_key(prompts.PROMPTS[0], 16) != prompts.prompt_key(prompts.PROMPTS[0], 17)


def test_a_canary_verdict_is_the_last_word_until_the_provider_is_back() -> None:
    from services.catalog.verdicts import Verdicts

    verdicts = Verdicts(None, None)  # type: ignore[arg-type]  # flush is not called: only the bookkeeping
    ok = bus.ModelVerdict("m", "verified", True, A)
    failed = bus.ModelVerdict("m", "canary_failed", False, A, "differs")
    verdicts.update("p", "boot", [ok])
    assert verdicts._pending == {"p"}
    verdicts._pending.clear()
    verdicts._known["p"].sent_at = time.monotonic()  # as the flush does
    verdicts.update("p", "boot", [ok])
    assert verdicts._pending == set()  # nothing new: nothing to say
    # Another replica judged a heartbeat just before the suspension: its notice is dropped.
    verdicts.update("q", "boot", [ok])
    verdicts.withdraw("q")
    assert "q" not in verdicts._pending
    # This replica's canary failed: a heartbeat judged before the suspension arrives does not undo it.
    verdicts.override("p", failed)
    verdicts.update("p", "boot", [ok])
    assert verdicts.current("p") == (failed,)
    verdicts.withdraw("p")
    assert "p" in verdicts._pending  # still told why
    # Unsuspended and heartbeating again: back to the catalog's verdict.
    verdicts._pending.clear()
    verdicts.update("p", "boot", [ok])
    assert verdicts.current("p") == (ok,)
    assert verdicts._pending == {"p"}
