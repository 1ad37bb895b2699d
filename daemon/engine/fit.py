"""Will a model fit, how long a context can it hold, how fast will it decode.

Read from the model folder alone (config.json and the safetensors headers, no
tensor bytes), so it works before the worker loads and for `doctor`. The
memory admission of requests (400 `context_over_budget`) uses the same figures:
a request whose prompt + max_tokens needs more KV cache than the budget has
room for is refused up front instead of running the Mac out of memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.machine import COMMON_SKUS, Machine, bandwidth_for

GB = 1 << 30
# Activations, sampling buffers and the allocator's slack, beyond weights and KV cache.
TRANSIENT_FRACTION = 0.10
TRANSIENT_MIN_BYTES = 256 << 20
# Share of the peak bandwidth a decode step achieves in practice.
BANDWIDTH_EFFICIENCY = 0.65
# Share of unified memory a model may use by default (macOS wires at most about this much for the GPU).
DEFAULT_BUDGET_FRACTION = 0.67

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1}


@dataclass(frozen=True, slots=True)
class Footprint:
    weights_bytes: int
    kv_bytes_per_token: int
    context_length: int
    model_type: str
    quant_bits: int | None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    return header


def footprint(model_dir: Path) -> Footprint:
    config = _text_config(json.loads((model_dir / "config.json").read_text()))
    files = sorted(model_dir.glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in files)
    # The KV cache has the activations' dtype: that of the (never quantized) norm weights.
    act_bytes = 2
    for f in files[:1]:
        for name, meta in _safetensors_header(f).items():
            if name.endswith("norm.weight") and isinstance(meta, dict):
                act_bytes = _DTYPE_BYTES.get(meta.get("dtype", ""), 2)
                break
    layers = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // max(1, heads))
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    return Footprint(
        weights_bytes=weights,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * act_bytes,
        context_length=int(config.get("max_position_embeddings") or 4096),
        model_type=str(config.get("model_type", "unknown")),
        quant_bits=int(bits) if isinstance(bits, int) else None,
    )


def default_budget(ram_bytes: int) -> int:
    return int(ram_bytes * DEFAULT_BUDGET_FRACTION)


def transient_bytes(weights_bytes: int) -> int:
    return max(TRANSIENT_MIN_BYTES, int(weights_bytes * TRANSIENT_FRACTION))


@dataclass(frozen=True, slots=True)
class Admission:
    budget_bytes: int
    usable_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    # Longest prompt + max_tokens one request may have (the model's context at most).
    max_safe_context: int


def admission(fp: Footprint, budget_bytes: int, *, kv_bytes_per_token: int | None = None) -> Admission:
    per_token = max(1, kv_bytes_per_token or fp.kv_bytes_per_token)
    usable = max(0, budget_bytes - fp.weights_bytes - transient_bytes(fp.weights_bytes))
    return Admission(
        budget_bytes=budget_bytes,
        usable_bytes=usable,
        weights_bytes=fp.weights_bytes,
        kv_bytes_per_token=per_token,
        max_safe_context=min(fp.context_length, usable // per_token),
    )


def predicted_decode_tps(fp: Footprint, bandwidth_gbs: float, context_tokens: int) -> float:
    """Tokens/s of one sequence: each token streams the weights and the KV cache so far."""
    bytes_per_token = fp.weights_bytes + fp.kv_bytes_per_token * context_tokens
    return round(bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY / max(1, bytes_per_token), 1)


def assess(
    fp: Footprint, machine: Machine, budget_bytes: int, *, kv_bytes_per_token: int | None = None
) -> dict[str, Any]:
    """The fit report for this machine plus a matrix over common Macs (seed 002's /admin/fit)."""
    adm = admission(fp, budget_bytes, kv_bytes_per_token=kv_bytes_per_token)
    typical = min(8192, adm.max_safe_context) if adm.max_safe_context > 0 else 0
    kv = adm.kv_bytes_per_token * typical
    transient = transient_bytes(fp.weights_bytes)
    matrix_ctx = min(32768, fp.context_length)
    matrix = []
    for chip, ram_gb in COMMON_SKUS:
        sku_adm = admission(fp, default_budget(ram_gb * GB), kv_bytes_per_token=kv_bytes_per_token)
        bandwidth = bandwidth_for(chip) or 0.0
        fits = sku_adm.max_safe_context >= min(4096, fp.context_length)
        matrix.append(
            {
                "sku": f"{chip} {ram_gb} GB",
                "ram_gb": ram_gb,
                "fits": fits,
                "max_context": min(matrix_ctx, sku_adm.max_safe_context),
                "decode_tps": predicted_decode_tps(fp, bandwidth, min(8192, sku_adm.max_safe_context)) if fits else 0.0,
            }
        )
    return {
        "machine": {
            "chip": machine.chip,
            "ram_bytes": machine.ram_bytes,
            "bandwidth_gbs": machine.bandwidth_gbs,
            "bandwidth_known": machine.bandwidth_known,
        },
        "context_tokens": adm.max_safe_context,
        "typical_context_tokens": typical,
        "typical_decode_tps": predicted_decode_tps(fp, machine.bandwidth_gbs, typical),
        "report": {
            "fits": adm.max_safe_context > 0,
            "weights_bytes": fp.weights_bytes,
            "kv_bytes_per_token": adm.kv_bytes_per_token,
            "kv_bytes": kv,
            "transient_bytes": transient,
            "total_bytes": fp.weights_bytes + kv + transient,
            "usable_bytes": adm.usable_bytes,
            "budget_bytes": budget_bytes,
            "max_safe_context": adm.max_safe_context,
            "predicted_decode_tps": predicted_decode_tps(fp, machine.bandwidth_gbs, typical),
        },
        "sku_matrix_ctx": matrix_ctx,
        "sku_matrix": matrix,
    }
