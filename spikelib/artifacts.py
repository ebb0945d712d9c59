"""Atomic writes of results and the provenance recorded beside them.

Every writer goes through a temporary file in the target folder followed by ``os.replace``,
so a crash halfway leaves the previous version of the file intact.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PROVENANCE_PACKAGES = ("spikelib", "torch", "transformers", "gguf", "datasets", "numpy", "pandas")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it over ``path`` when the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp creates files readable by the owner only; give results the usual mode.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path, ".json") as temporary:
        temporary.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV without its index, atomically."""
    with atomic_path(path, ".csv") as temporary:
        frame.to_csv(temporary, index=False)
    return Path(path)


def save_figure(figure, stem: str | os.PathLike, dpi: int = 150) -> list[Path]:
    """Save a matplotlib figure as ``stem.png`` and ``stem.pdf``, atomically."""
    written = []
    for extension in ("png", "pdf"):
        target = Path(f"{stem}.{extension}")
        with atomic_path(target, f".{extension}") as temporary:
            # Fixed metadata keeps the PDF bytes stable between identical runs.
            metadata_arg = {"CreationDate": None} if extension == "pdf" else {"Software": None}
            figure.savefig(temporary, format=extension, dpi=dpi, bbox_inches="tight", metadata=metadata_arg)
        written.append(target)
    return written


def package_versions(names: tuple[str, ...] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Return the installed version of each named distribution (None when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """Return the current git commit of ``cwd``, or None outside a repository."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def git_has_changes(cwd: str | os.PathLike | None = None) -> bool | None:
    """Return whether tracked files differ from the current commit, or None outside a repository."""
    try:
        result = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(result.stdout.strip())


def slug(name: str) -> str:
    """Return a file name for a model name: ``meta-llama/Llama-2-7b-hf`` -> ``meta-llama__Llama-2-7b-hf``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/").replace("/", "__"))
    if not cleaned.strip("._"):
        raise ValueError(f"cannot make a file name from model name {name!r}")
    return cleaned


def provenance(parameters: dict[str, Any]) -> dict[str, Any]:
    """Return the record stored beside every result: parameters, package versions, commit, machine."""
    return {
        "parameters": parameters,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "git_uncommitted_changes": git_has_changes(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__} to JSON")
