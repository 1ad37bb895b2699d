"""Secrets at rest and in text: files holding one are private from their first byte, settings'
repr hides them, and NATS / database URLs are logged and shown without their credentials."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import schemas.private_file as private_file
from daemon.settings import DaemonSettings
from infra.components import start_daemon
from infra.devkey import write_dev_env
from infra.nats_auth import BusSecrets, SecuredNats, write_config
from schemas.private_file import write_private
from schemas.redact import redact_url
from services.natsauth import keys
from services.settings import Settings, ensure_local_secrets
from tests.support.logs import wait_event


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Umask 0: whatever mode a file is created with is the mode it has (write-then-chmod shows)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def modes_when_published(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The mode of every file write_private is about to publish (rename or link), seen at that instant."""
    seen: list[int] = []
    for name in ("replace", "link"):
        real: Callable[..., None] = getattr(os, name)

        def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str], _real: Callable[..., None] = real) -> None:
            seen.append(stat.S_IMODE(os.stat(src).st_mode))
            _real(src, dst)

        monkeypatch.setattr(private_file.os, name, spy)
    return seen


def test_a_private_file_is_0600_from_its_first_byte(
    tmp_path: Path, no_umask: None, modes_when_published: list[int]
) -> None:
    path = tmp_path / "secret"
    write_private(path, "s3cret")
    assert _mode(path) == 0o600
    assert path.read_text() == "s3cret"
    # Overwriting an older, readable file swaps in a new private one.
    path.chmod(0o644)
    write_private(path, b"again")
    assert (_mode(path), path.read_bytes()) == (0o600, b"again")
    # The temporary file was already private when it was published, and nothing else is left behind.
    assert modes_when_published == [0o600, 0o600]
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_a_private_file_never_reuses_a_planted_file_and_the_first_writer_wins(
    tmp_path: Path, no_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "key"
    write_private(path, "first", replace=False)
    with pytest.raises(FileExistsError):
        write_private(path, "second", replace=False)
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]

    # Someone who can write the folder plants a readable file at the name the writer picks:
    # O_EXCL refuses it rather than writing the secret into a file they can open.
    monkeypatch.setattr(private_file.secrets, "token_hex", lambda n: "x" * (2 * n))
    trap = tmp_path / f".other.{'x' * 12}.tmp"
    trap.write_text("")
    trap.chmod(0o666)
    with pytest.raises(FileExistsError):
        write_private(tmp_path / "other", "secret")
    assert trap.read_text() == ""
    assert not (tmp_path / "other").exists()


def test_every_secret_file_the_stack_writes_is_private(
    tmp_path: Path, no_umask: None, modes_when_published: list[int]
) -> None:
    # The control plane's generated secret key.
    ensure_local_secrets({"MP_HOME": str(tmp_path / "home")})
    settings = Settings.from_env({"MP_HOME": str(tmp_path / "home")})
    secret_file = tmp_path / "home" / "secret_key"
    assert _mode(secret_file) == 0o600
    assert settings.secret_key == secret_file.read_bytes().strip()
    assert Settings.from_env({"MP_HOME": str(tmp_path / "home")}).secret_key == settings.secret_key, "kept"
    # The generated token a Prometheus scraper sends for /metrics.
    assert _mode(tmp_path / "home" / "metrics_token") == 0o600
    # dev.env with the dev key.
    dev_env = tmp_path / "home" / "dev.env"
    write_dev_env(dev_env, base_url="http://127.0.0.1:1/v1", key="mp_" + "k" * 36)
    assert _mode(dev_env) == 0o600
    # The local bus's seeds and passwords, and the server's auth config.
    (tmp_path / "nats").mkdir()
    bus = BusSecrets.new()
    bus.save(tmp_path / "nats" / "credentials.json")
    write_config(tmp_path / "nats", bus)
    assert _mode(tmp_path / "nats" / "credentials.json") == 0o600
    assert _mode(tmp_path / "nats" / "auth.conf") == 0o600
    assert modes_when_published == [0o600] * 5
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


NATS_PASSWORD = "n4ts-pa55/w@rd"
DB_PASSWORD = "pg-pa55"


def test_settings_repr_hides_every_secret(tmp_path: Path) -> None:
    secret_key = "sk-" + secrets.token_hex(20)
    github_secret = "gh-" + secrets.token_hex(8)
    issuer_seed, xkey_seed = keys.new_account_seed(), keys.new_curve_seed()
    env = {
        "MP_HOME": str(tmp_path),
        "MP_SECRET_KEY": secret_key,
        "MP_GITHUB_CLIENT_ID": "client-id",
        "MP_GITHUB_CLIENT_SECRET": github_secret,
        "MP_NATS_USER": "gateway",
        "MP_NATS_PASSWORD": "nats-" + NATS_PASSWORD,
        "MP_NATS_ISSUER_SEED": issuer_seed,
        "MP_NATS_XKEY_SEED": xkey_seed,
        "MP_NATS_AUTH_USER": "natsauth",
        "MP_NATS_AUTH_PASSWORD": "auth-" + NATS_PASSWORD,
        "MP_NATS_SYS_USER": "system",
        "MP_NATS_SYS_PASSWORD": "sys-" + NATS_PASSWORD,
        "NATS_URL": f"nats://gateway:{NATS_PASSWORD}@nats.internal:4222",
        "DATABASE_URL": f"postgresql://app:{DB_PASSWORD}@db.internal/mp?password=q-{DB_PASSWORD}",
    }
    settings = Settings.from_env(env)
    assert settings.nats_issuer_seed == issuer_seed, "the value itself is intact"
    daemon = DaemonSettings.from_env(
        {
            "NATS_URL": f"tls://provider-x:{NATS_PASSWORD}@pool.example:4222,tls://tok-{NATS_PASSWORD}@b:4222",
            "MP_NATS_USER": "provider-x",
            "MP_NATS_PASSWORD": "daemon-" + NATS_PASSWORD,
        }
    )
    assert settings.nats_password == "nats-" + NATS_PASSWORD, "the value itself is intact"
    for text in (repr(settings), str(settings), repr(daemon), str(daemon)):
        for secret in (secret_key, github_secret, NATS_PASSWORD, DB_PASSWORD, "pa55", issuer_seed, xkey_seed):
            assert secret not in text
    assert "nats://gateway:***@nats.internal:4222" in repr(settings)
    assert "postgresql://app:***@db.internal/mp?password=***" in repr(settings)
    assert "github_client_id='client-id'" in repr(settings), "what is not secret stays readable"
    assert "tls://provider-x:***@pool.example:4222,tls://***@b:4222" in repr(daemon)
    assert daemon.nats_url_redacted == "tls://provider-x:***@pool.example:4222,tls://***@b:4222"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://u:p@h:4222", "nats://u:***@h:4222"),
        ("nats://s3cr3t-token@h:4222", "nats://***@h:4222"),
        ("tls://u:p%40ss@h", "tls://u:***@h"),
        ("nats://u:p@ss/w,rd@h1:1,nats://v:q@h2:2", "nats://u:***@h1:1,nats://v:***@h2:2"),
        ("nats://h1:1,nats://v:q@h2:2", "nats://h1:1,nats://v:***@h2:2"),
        ("nats://h:1?token=abc", "nats://h:1?token=***"),
    ],
)
def test_nats_urls_lose_their_credentials_on_both_sides(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://postgres@127.0.0.1:5432/mp", "postgresql://postgres@127.0.0.1:5432/mp"),
        ("postgresql://app:pw@db/mp", "postgresql://app:***@db/mp"),
        ("postgres://app:p/w@db/mp", "postgres://app:***@db/mp"),
        ("postgresql://app:pw@h1:5432,h2:5432/mp", "postgresql://app:***@h1:5432,h2:5432/mp"),
        (
            "postgresql:///mp?host=/tmp&password=pw&sslmode=require",
            "postgresql:///mp?host=/tmp&password=***&sslmode=require",
        ),
    ],
)
def test_database_urls_lose_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_daemon_and_its_doctor_never_show_the_nats_token_of_their_url(
    nats_server: SecuredNats, tmp_path: Path
) -> None:
    provider_id = "secret-url-mac"
    token = nats_server.provider_token(provider_id)
    url = nats_server.url.replace("nats://", f"nats://{token}@")  # the provider's token rides in NATS_URL
    shown = f"nats://***@{nats_server.url.removeprefix('nats://')}"
    env = {"NATS_URL": url, "MP_PROVIDER_TOKEN": "", "MP_ADMIN_PORT": "0", "MP_API_PORT": "0"}
    daemon = start_daemon(  # no local listeners (ports 0): nothing to wait for but its login
        tmp_path, nats=nats_server, provider_id=provider_id, model_id="secret-url-model", engine="synthetic", env=env
    )
    try:
        online = wait_event(daemon.log_path, "provider_online", timeout=60)
    finally:
        daemon.stop()
    assert online["nats"] == shown, "it logged in with the URL's token and says so without it"
    assert token not in daemon.log_path.read_text()

    doctor = subprocess.run(
        [sys.executable, "-m", "daemon", "doctor", "--json"],
        env={**os.environ, **env, "MP_PROVIDER_ID": provider_id},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"coordinator reachable at {shown}" in doctor.stdout, doctor.stdout
    assert token not in doctor.stdout + doctor.stderr
