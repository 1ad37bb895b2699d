"""`mac-provider migrate --check`: what a new version's pods wait on before they serve (infra/deploy)."""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from infra.postgres import PostgresServer
from services.cli import main
from tests.support.accounts import query


def test_check_reports_pending_migrations_and_changes_nothing(
    postgres: PostgresServer, state_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"mp_check_{secrets.token_hex(4)}"
    query(postgres.url, f"CREATE DATABASE {name}")
    fresh = urlunsplit(urlsplit(postgres.url)._replace(path=f"/{name}"))
    monkeypatch.setenv("DATABASE_URL", fresh)
    monkeypatch.setenv("MP_HOME", str(state_dir))
    try:
        # A new database: the check fails (3), says what is missing, and creates nothing.
        assert main(["migrate", "--check"]) == 3
        assert "migrations not applied yet: [1, 2," in capsys.readouterr().err
        assert query(fresh, "SELECT to_regclass('schema_migrations') IS NULL AS absent")[0]["absent"]
        assert main(["migrate"]) == 0
        assert main(["migrate", "--check", "--wait", "5"]) == 0
        assert "up to date" in capsys.readouterr().out
    finally:
        query(postgres.url, f"DROP DATABASE {name}")
