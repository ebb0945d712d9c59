"""Evaluation and calibration text: WikiText-2 raw test and C4 samples.

By default the Hugging Face data sets are loaded by name. When a local mirror folder is
configured (argument ``data_dir`` or ``$SPIKELIB_DATA_DIR``), files are read from it instead:
``wikitext-2-raw-v1/test.txt``, ``c4/train_sample.jsonl`` and ``c4/validation.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "SPIKELIB_DATA_DIR"

WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")
C4_HUB = "allenai/c4"
C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
MIRROR_FILES = {
    "wikitext": "wikitext-2-raw-v1/test.txt",
    "c4/train": "c4/train_sample.jsonl",
    "c4/validation": "c4/validation.jsonl",
}


class DataUnavailableError(RuntimeError):
    """Raised when neither the local mirror nor the Hugging Face hub provides a data set."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the mirror folder from the argument or ``$SPIKELIB_DATA_DIR``, or None for the hub."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        return None
    folder = Path(chosen).expanduser()
    if not folder.is_dir():
        raise DataUnavailableError(
            f"data mirror folder not found: {folder}. Point --data-dir, data.dir in params.yaml or {DATA_DIR_ENV} at a "
            "folder laid out like wikitext-2-raw-v1/test.txt and c4/train_sample.jsonl, or unset "
            "it to load the Hugging Face data sets."
        )
    return folder


def _mirror_file(folder: Path, key: str) -> Path:
    path = folder / MIRROR_FILES[key]
    if not path.is_file():
        raise DataUnavailableError(f"data mirror {folder} has no {MIRROR_FILES[key]}; the mirror is incomplete")
    return path


def wikitext2_test_rows(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Return the WikiText-2 raw test split as the Hugging Face data set has it, one row per line.

    Each row keeps its trailing newline; blank lines (a single space in the raw file) are empty rows.
    """
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return list(_load_hub(WIKITEXT_HUB[0], name=WIKITEXT_HUB[1], split="test")["text"])
    with open(_mirror_file(folder, "wikitext"), encoding="utf-8", newline="") as handle:
        return ["" if line == " \n" else line for line in handle]


def wikitext2_test_text(data_dir: str | os.PathLike | None = None) -> str:
    """Return the WikiText-2 test text: its rows joined with two newlines, the usual protocol."""
    return "\n\n".join(wikitext2_test_rows(data_dir))


def c4_documents(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[str]:
    """Return the texts of the C4 ``en`` sample: ``train`` for calibration, ``validation`` held out."""
    if split not in C4_HUB_FILES:
        raise ValueError(f"invalid C4 split {split!r}; choose one of {', '.join(C4_HUB_FILES)}")
    folder = resolve_data_dir(data_dir)
    if folder is None:
        rows = _load_hub(C4_HUB, data_files={split: C4_HUB_FILES[split]}, split=split)
        return list(rows["text"])
    with open(_mirror_file(folder, f"c4/{split}"), encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def _load_hub(path: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as error:  # datasets raises many types for a missing network or data set
        raise DataUnavailableError(
            f"could not load the Hugging Face data set {path!r} ({type(error).__name__}: {error}). "
            f"Without hub access, point data_dir or {DATA_DIR_ENV} at a local mirror folder."
        ) from error
