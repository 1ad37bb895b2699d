"""What an engine says about itself on the admin API (`/admin/status`, `/admin/health`, `/metrics`).

Wire types, so the answer's shape is declared once: a field that is `UNSET` is left
out (the synthetic engine has no worker process to describe), `None` is JSON null.
Sizes are in GB rounded to the MB, as seed 001's status shows them.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

GB = 1 << 30

# The worker states seed 001 names (the supervisor's finer ones map onto these).
SeedWorkerStatus = Literal["healthy", "no_worker", "starting", "dead"]


def gb(n: int) -> float:
    return round(n / GB, 3)


class IdentityStatus(msgspec.Struct, frozen=True):
    """The loaded model's SHA-256 identity and what computing it cost (daemon/models/identity.py's `Identity`)."""

    sha256: str = msgspec.field(name="weights_sha256")
    files: int
    bytes_total: int
    # 0 when every file's digest came from the cache (daemon/models/identity.py).
    bytes_hashed: int
    files_from_cache: int
    seconds: float


class ModelStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    loaded: bool
    name: str | None
    memory_gb: float
    # Unloaded for idleness: the next request reloads it.
    idle_unloaded: bool | UnsetType = UNSET
    weights_gb: float | UnsetType | None = UNSET
    # response_format json_object / json_schema can be constrained (llguidance read the tokenizer).
    structured_output: bool | UnsetType = UNSET
    identity: IdentityStatus | UnsetType | None = UNSET


class WorkerStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    healthy: bool
    status: SeedWorkerStatus
    state: str | UnsetType = UNSET
    pid: int | UnsetType | None = UNSET
    rss_bytes: int | UnsetType = UNSET
    restarts: int | UnsetType = UNSET
    # The crash reason with the model folder named by its id and no other paths.
    last_crash: str | UnsetType | None = UNSET
    idle_for_s: float | UnsetType = UNSET


class AdmissionStatus(msgspec.Struct, frozen=True):
    """daemon/engine/fit.py's `Admission`."""

    max_safe_context: int
    budget_bytes: int = msgspec.field(name="memory_budget_bytes")
    usable_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int


class BatchStatus(msgspec.Struct, frozen=True):
    slots: int
    active_rows: int
    waiting: int
    decode_tps: float
    # Since the worker started: tokens generated, steps that decoded them, most rows in one step.
    generated_tokens: int = 0
    decode_steps: int = 0
    peak_rows: int = 0


class PromptCacheStatus(msgspec.Struct, frozen=True):
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int


class EngineStatus(msgspec.Struct, frozen=True):
    """The engine's part of /admin/status; the worker engine fills every field."""

    model: ModelStatus
    worker: WorkerStatus
    memory_budget_bytes: int | UnsetType = UNSET
    admission: AdmissionStatus | UnsetType | None = UNSET
    batch: BatchStatus | UnsetType = UNSET
    # None: the worker did not answer the ping just now.
    prompt_cache: PromptCacheStatus | UnsetType | None = UNSET
