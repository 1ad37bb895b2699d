"""A model folder's identity: one SHA-256 over every file that decides what the model answers.

The pool's operator catalog (`mac-provider admin models`) lists which identities may be
served under which public model id, so the identity must change whenever the answers can,
and only then. Which files count (top level of the folder; mlx-lm reads nothing below it):

- the weights: every `*.safetensors` and `*.gguf` file;
- `config.json` (architecture, RoPE layout, quantization: same tensors, other answers) and
  `generation_config.json` (EOS ids and default sampling);
- the tokenizer and chat template: `tokenizer.json`, `tokenizer_config.json` (holds the chat
  template), `special_tokens_map.json`, `added_tokens.json`, `vocab.json`, `merges.txt`,
  `tokenizer.model`, `chat_template.jinja`, `chat_template.json`.

Nothing else: READMEs, licences, `*.safetensors.index.json` (a map of shards that are
hashed themselves), hidden files, subfolders. The identity is the SHA-256 of the lines
`name NUL size NUL sha256(file) LF`, one per file in byte order of their names, so renaming
a shard, adding one or changing a byte anywhere changes it.

Hashing a large model takes a while, so per-file digests are cached in a small JSON file in
the daemon's state folder, keyed by the file's real path, size and mtime_ns: a daemon that
restarts, or whose worker reloads after an idle unload, stats its files instead of reading
them. The cache is the owner's own: it vouches for nothing to the pool (a provider can report
any identity it likes; the control plane's canary checks catch one that serves other weights).
Hashing runs in a thread of its own at low priority, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from schemas.private_file import write_private

log = structlog.get_logger("daemon.identity")

CACHE_FILE_NAME = "weights-sha256.json"
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
IDENTITY_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)
# Files remembered in the cache (least recently used forgotten first): a few models' worth.
_MAX_CACHED = 512
_CACHE_VERSION = 1
# A cache file larger than this is not ours (or corrupt): it is ignored and rewritten.
_MAX_CACHE_BYTES = 1 << 20


class IdentityError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Identity:
    """A folder's identity and what computing it cost (the facts `/admin/status` shows)."""

    sha256: str
    files: int
    bytes_total: int
    # Bytes actually read and hashed now; 0 when every file came from the cache.
    bytes_hashed: int
    files_from_cache: int
    seconds: float


def identity_files(folder: Path) -> list[Path]:
    """The files that make `folder`'s identity, in byte order of their names."""
    chosen = []
    for entry in folder.iterdir():
        name = entry.name
        if name.startswith(".") or not entry.is_file():
            continue
        if name in IDENTITY_NAMES or name.endswith(WEIGHT_SUFFIXES):
            chosen.append(entry)
    return sorted(chosen, key=lambda p: p.name.encode())


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_sha256(entries: list[tuple[str, int, str]]) -> str:
    """The identity of (name, size, sha256) entries (sorted here, so order does not matter)."""
    digest = hashlib.sha256()
    for name, size, sha in sorted(entries, key=lambda e: e[0].encode()):
        digest.update(f"{name}\0{size}\0{sha}\n".encode())
    return digest.hexdigest()


def _lower_priority() -> None:
    """Run this (hashing) thread below the daemon's other work, where the OS allows it per thread."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        darwin_thread, darwin_bg = getattr(os, "PRIO_DARWIN_THREAD", None), getattr(os, "PRIO_DARWIN_BG", None)
        if darwin_thread is not None and darwin_bg is not None:
            os.setpriority(darwin_thread, 0, darwin_bg)  # macOS: background CPU and I/O priority
        else:
            # Linux: nice values are per thread (the tid is a process id to setpriority).
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class WeightsHasher:
    """Identities of model folders, with per-file digests cached in `<state_dir>/weights-sha256.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.cache_path = state_dir / CACHE_FILE_NAME
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    async def identity_async(self, folder: Path) -> Identity:
        """`identity(folder)` in this hasher's own low-priority thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="weights-sha256", initializer=_lower_priority)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.identity, folder)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def identity(self, folder: Path) -> Identity:
        """The folder's identity (blocking: reads every file not in the cache)."""
        started = time.monotonic()
        files = identity_files(folder)
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
            raise IdentityError(f"{folder} holds no weights (*.safetensors or *.gguf)")
        with self._lock:
            cache = self._read_cache()
            entries: list[tuple[str, int, str]] = []
            hashed = from_cache = total = 0
            for path in files:
                real = path.resolve()
                st = real.stat()
                key = str(real)
                cached = cache.get(key)
                if cached is not None and cached["size"] == st.st_size and cached["mtime_ns"] == st.st_mtime_ns:
                    sha = str(cached["sha256"])
                    from_cache += 1
                else:
                    sha = file_sha256(real)
                    hashed += st.st_size
                # Re-inserted last: the dict's order is the cache's recency.
                cache.pop(key, None)
                cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
                entries.append((path.name, st.st_size, sha))
                total += st.st_size
            self._write_cache(cache)
        identity = Identity(
            sha256=manifest_sha256(entries),
            files=len(entries),
            bytes_total=total,
            bytes_hashed=hashed,
            files_from_cache=from_cache,
            seconds=round(time.monotonic() - started, 3),
        )
        log.info(
            "weights_identity",
            folder=folder.name,
            sha256=identity.sha256,
            files=identity.files,
            mb_hashed=round(hashed / 1e6, 1),
            from_cache=from_cache,
            seconds=identity.seconds,
        )
        return identity

    def _read_cache(self) -> dict[str, dict[str, int | str]]:
        try:
            if self.cache_path.stat().st_size > _MAX_CACHE_BYTES:
                return {}
            data = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
            return {}
        if not isinstance(data.get("files"), dict):
            return {}
        files: dict[str, dict[str, int | str]] = {}
        for key, value in data["files"].items():
            if (
                isinstance(value, dict)
                and isinstance(value.get("size"), int)
                and isinstance(value.get("mtime_ns"), int)
                and isinstance(value.get("sha256"), str)
                and len(value["sha256"]) == 64
            ):
                files[key] = value
        return files

    def _write_cache(self, files: dict[str, dict[str, int | str]]) -> None:
        kept = dict(list(files.items())[-_MAX_CACHED:])
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_private(self.cache_path, json.dumps({"version": _CACHE_VERSION, "files": kept}, indent=1))
        except OSError as exc:
            # Only a cost: the next load hashes again.
            log.warning("weights_cache_unwritable", path=str(self.cache_path), error=str(exc)[:200])
