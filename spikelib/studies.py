"""Shared steps of the comparison notebooks: the main stage's choices and perplexity tables."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .perplexity import PerplexityResult


@dataclass
class MainChoices:
    """Choices of the main results stage for one model: QFeM's alpha and modules, and QFeP's prefix."""

    alpha: float | None
    qfem_modules: list[str]
    prefix_ids: list[int]
    prefix_tokens: list[str]
    target_site: str


def load_main_choices(selection_path: str | Path, prefix_path: str | Path, model_name: str) -> MainChoices:
    """Read ``qfem_selection.json`` and ``qfep_prefix.json`` and check that they belong to ``model_name``."""
    payloads = {}
    for path in (selection_path, prefix_path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run the main_results stage first (dvc repro main_results)")
        payload = json.loads(path.read_text())
        made_for = payload.get("provenance", {}).get("parameters", {}).get("model_name")
        if made_for != model_name:
            raise ValueError(f"{path} was made for model {made_for!r}, not {model_name!r}; rerun the main_results stage")
        payloads[path.name] = payload
    selection = payloads[Path(selection_path).name]
    prefix = payloads[Path(prefix_path).name]
    return MainChoices(
        alpha=selection["alpha"],
        qfem_modules=list(selection["modules"]),
        prefix_ids=[int(token) for token in prefix["prefix_ids"]],
        prefix_tokens=list(prefix["prefix_tokens"]),
        target_site=prefix["target_site"],
    )


def perplexity_rows(results: dict[str, PerplexityResult], fp_ppl: float, w8a8_ppl: float, **columns) -> list[dict]:
    """Return table rows for ``results`` (label -> result) with the increase over FP and the W8A8 loss recovered.

    ``w8a8_loss_recovered`` = (ppl(W8A8) - ppl) / (ppl(W8A8) - ppl(FP)); extra keyword columns are
    copied into every row.
    """
    rows = []
    for label, result in results.items():
        gap = w8a8_ppl - fp_ppl
        rows.append({
            **columns,
            "method": label,
            "ppl": round(result.ppl, 4),
            "n_tokens": result.n_tokens,
            "ppl_increase_vs_fp": round(result.ppl / fp_ppl - 1, 4),
            "w8a8_loss_recovered": round((w8a8_ppl - result.ppl) / gap, 4) if gap != 0 else math.nan,
        })
    return rows

