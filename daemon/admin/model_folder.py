"""Which folder `POST /admin/load?model_path=…` may load: one inside the daemon's models folder.

Loading a folder runs its tokenizer code paths and reads its files, so a request must not
choose an arbitrary path on the Mac. The request names a folder relative to the models
folder (`Qwen2.5-7B-Instruct-4bit`, `mlx-community/Qwen2.5-7B-Instruct-4bit`), or an
absolute path that resolves (symlinks followed) inside it. The model the owner configured
at start-up (MP_MODEL_PATH) is their own choice and may always be loaded again.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

_MAX_LENGTH = 1024


class ModelFolderRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def resolve_model_folder(requested: str, *, models_dir: Path, configured: Path | None) -> Path:
    """The folder to load (resolved), or ModelFolderRefused: 400 malformed, 403 outside the models folder."""
    if not requested.strip() or len(requested) > _MAX_LENGTH:
        raise ModelFolderRefused(400, f"model_path must name a model folder (1-{_MAX_LENGTH} characters)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in requested):
        raise ModelFolderRefused(400, "model_path must not contain control characters")
    if ".." in PurePosixPath(requested).parts:
        raise ModelFolderRefused(400, "model_path must not contain '..'")
    root = models_dir.resolve()
    target = (root / Path(requested).expanduser()).resolve()
    if configured is not None and target == configured.resolve():
        return target
    if target != root and target.is_relative_to(root):
        return target
    raise ModelFolderRefused(
        403,
        f"model_path must be a model folder inside the models folder {root} (MP_MODELS_DIR); "
        "it names a place outside it (an absolute path elsewhere, or a symlink pointing out)",
    )
