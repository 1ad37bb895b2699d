"""`mac-provider-daemon doctor`: is this machine ready to serve, and if not, what to fix.

Checks the chip and memory, the GPU path (Metal) or the CPU fallback's BLAS,
the model folder and whether it fits the memory budget, the pool connection,
the local ports and the admin token file. Exit code 1 when something must be fixed.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import sys
from dataclasses import asdict, dataclass

from daemon.engine import fit
from daemon.machine import Machine, detect
from daemon.settings import DaemonSettings

GB = 1 << 30


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


def _machine(m: Machine) -> list[Check]:
    checks = [
        Check(
            "machine",
            "ok",
            f"{m.system} {platform.machine()}, {m.chip}, {m.ram_bytes / GB:.0f} GB memory, {m.cpu_count} cores",
        )
    ]
    if m.bandwidth_known:
        checks.append(Check("bandwidth", "ok", f"about {m.bandwidth_gbs:.0f} GB/s unified memory bandwidth"))
    else:
        checks.append(
            Check(
                "bandwidth",
                "warn",
                f"unknown chip; speed predictions assume {m.bandwidth_gbs:.0f} GB/s",
                "predictions only: nothing to fix",
            )
        )
    if m.system == "Darwin" and platform.machine() != "arm64":
        checks.append(
            Check("chip", "fail", "an Intel Mac: mlx needs Apple silicon", "run the daemon on an M-series Mac")
        )
    return checks


def _mlx() -> list[Check]:
    try:
        import mlx.core as mx
    except Exception as exc:
        return [Check("mlx", "fail", f"mlx does not import: {exc}", "pip install 'mlx-lm>=0.32'")]
    version = getattr(mx, "__version__", "?")
    if mx.metal.is_available():
        return [Check("mlx", "ok", f"mlx {version} on Metal (GPU)")]
    checks = [Check("mlx", "warn", f"mlx {version} on the CPU only: slow", "serve from an Apple-silicon Mac")]
    if platform.system() == "Linux":
        preload = os.environ.get("LD_PRELOAD", "")
        from infra.blas import fast_blas_env

        blis = fast_blas_env().get("LD_PRELOAD")
        if "blis" in preload:
            checks.append(Check("blas", "ok", f"BLIS preloaded ({preload})"))
        else:
            fix = (
                f"start the daemon with LD_PRELOAD={blis} BLIS_NUM_THREADS=1 (the systemd unit does)"
                if blis
                else "apt-get install libblis4-pthread, then preload its libblas.so.3 (the systemd unit does)"
            )
            checks.append(
                Check("blas", "warn", "mlx uses the reference BLAS: prompt processing is several times slower", fix)
            )
    return checks


def _model(settings: DaemonSettings, m: Machine) -> list[Check]:
    path = settings.model_path
    if path is None:
        return [
            Check(
                "model",
                "warn",
                "no MP_MODEL_PATH: the daemon starts without a model",
                f"set MP_MODEL_PATH, or put a model folder in {settings.models_dir} and "
                "POST /admin/load?model_path=<folder name> once it runs",
            )
        ]
    if not (path / "config.json").exists():
        return [Check("model", "fail", f"{path} is not an mlx-lm model folder", "point MP_MODEL_PATH at one")]
    if not list(path.glob("*.safetensors")):
        return [Check("model", "fail", f"{path} has no .safetensors weights", "convert the model with mlx_lm.convert")]
    fp = fit.footprint(path)
    budget = settings.memory_budget_bytes or fit.default_budget(m.ram_bytes)
    adm = fit.admission(fp, budget)
    checks = [Check("model", "ok", f"{settings.model_id}: {fp.model_type}, {fp.weights_bytes / GB:.2f} GB of weights")]
    tps = fit.predicted_decode_tps(fp, m.bandwidth_gbs, min(8192, adm.max_safe_context))
    if adm.max_safe_context <= 0:
        checks.append(
            Check(
                "fit",
                "fail",
                f"the weights alone exceed the memory budget ({budget / GB:.1f} GB)",
                "raise MP_MEMORY_BUDGET_GB or serve a smaller / more quantized model",
            )
        )
    elif adm.max_safe_context < min(4096, fp.context_length):
        checks.append(
            Check(
                "fit",
                "warn",
                f"only {adm.max_safe_context} tokens of context fit in {budget / GB:.1f} GB",
                "raise MP_MEMORY_BUDGET_GB or serve a smaller model",
            )
        )
    else:
        checks.append(
            Check(
                "fit",
                "ok",
                f"fits: {adm.max_safe_context} tokens of context in a {budget / GB:.1f} GB budget, "
                f"about {tps:.0f} tokens/s predicted",
            )
        )
    return checks


async def _nats(settings: DaemonSettings) -> Check:
    import nats

    async def quiet(_: Exception) -> None:
        return None

    url = settings.nats_url_redacted  # what the report shows; the connection uses the real one
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                settings.nats_url,
                connect_timeout=3,
                max_reconnect_attempts=1,
                allow_reconnect=False,
                error_cb=quiet,
                # The pool's NATS refuses a daemon without its provider credentials.
                user=settings.nats_user or None,
                password=settings.nats_password or None,
                token=settings.provider_token or None,
                user_credentials=str(settings.nats_creds) if settings.nats_creds else None,
            ),
            5,
        )
    except Exception as exc:
        if "authorization violation" in str(exc).lower():
            fix = (
                "its provider token was revoked, or the provider banned: sign in again "
                "(mac-provider-daemon login) or check MP_PROVIDER_TOKEN"
                if settings.provider_token
                else "check MP_NATS_USER / MP_NATS_PASSWORD (or MP_NATS_CREDS) from the pool operator"
            )
            return Check("pool", "fail", f"the coordinator at {url} refused this provider's credentials", fix)
        return Check(
            "pool",
            "fail",
            f"cannot reach the coordinator at {url}: {type(exc).__name__}",
            "check NATS_URL and the network",
        )
    await nc.close()
    return Check("pool", "ok", f"coordinator reachable at {url}")


def _port(name: str, port: int) -> Check:
    if port == 0:
        return Check(name, "ok", "turned off (port 0)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return Check(
                name, "warn", f"127.0.0.1:{port} is in use (a running daemon?)", "stop it or pick another port"
            )
    return Check(name, "ok", f"127.0.0.1:{port} is free")


def _admin_token(settings: DaemonSettings) -> Check:
    from daemon.admin.token import AdminTokenError, read_admin_token

    path = settings.admin_token_file
    if settings.admin_port == 0:
        return Check("admin token", "ok", "the admin API is off (MP_ADMIN_PORT=0)")
    if not os.path.lexists(path):
        return Check("admin token", "ok", f"made at first start in {path} (0600)")
    try:
        read_admin_token(path)
    except AdminTokenError as exc:
        return Check("admin token", "fail", str(exc), f"delete {path}; the daemon makes a private one")
    return Check("admin token", "ok", f"{path} (private to this user)")


def checks(settings: DaemonSettings) -> list[Check]:
    m = detect()
    out = _machine(m) + _mlx() + _model(settings, m)
    if settings.engine == "mlx" and settings.slots > 16 and m.system != "Darwin":
        out.append(Check("slots", "warn", f"{settings.slots} slots on a CPU", "MP_SLOTS=4 decodes faster here"))
    out.append(asyncio.run(_nats(settings)))
    out.append(_port("admin port", settings.admin_port))
    out.append(_admin_token(settings))
    out.append(_port("api port", settings.api_port))
    return out


def run_doctor(settings: DaemonSettings, *, as_json: bool = False) -> int:
    results = checks(settings)
    if as_json:
        print(json.dumps([asdict(c) for c in results], indent=2))
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for c in results:
            print(f"[{marks[c.status]}] {c.name}: {c.detail}")
            if c.fix and c.status != "ok":
                print(f"        fix: {c.fix}")
    sys.stdout.flush()
    return 1 if any(c.status == "fail" for c in results) else 0
