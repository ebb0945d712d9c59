"""Shared steps of the comparison notebooks: the main stage's choices and perplexity tables."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import calibration, data, perplexity, qfem, qfep, quantizers
from .hooks import TokenScales
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



def search_choices(
    model,
    tokenizer,
    start_token_id: int,
    data_dir: str | None,
    seed: int = 0,
    calib_windows: int = 32,
    seq_len: int = 512,
    search_windows: int = 8,
    n_thresholds: int = 12,
    alpha_tolerance: float = 0.02,
    spike_candidates: int = 8,
    context_candidates: int = 64,
    scales: TokenScales | None = None,
    progress: bool = True,
) -> MainChoices:
    """Calibrate, search QFeM's alpha and QFeP's prefix for a model, as the main results stage does.

    For models that the pipeline's calibration and main results stages did not run on. The alpha
    search uses held-out C4 validation windows and plain per-tensor W8A8. ``scales`` recorded
    earlier on this model skip the calibration (``calib_windows`` is then unused).
    """
    if scales is None:
        train = data.c4_documents("train", data_dir)
        windows = calibration.sample_windows(tokenizer, train, calib_windows, seq_len, start_token_id, seed)
        scales = calibration.calibrate(model, windows, progress=progress)
    ratios = qfem.module_ratios(scales)

    validation = data.c4_documents("validation", data_dir)
    held_out = calibration.sample_windows(tokenizer, validation, search_windows, seq_len + 1, start_token_id, seed)[:, 1:]

    def held_out_ppl(candidate) -> float:
        return perplexity.evaluate_perplexity(candidate, held_out, start_token_id, progress=False).ppl

    quantized = quantizers.quantize_model(model)
    search = qfem.search_threshold(quantized, ratios, scales.module_sites, qfem.threshold_grid(ratios, n_thresholds),
                                   held_out_ppl, alpha_tolerance)
    del quantized
    prefix = qfep.search_prefix(model, tokenizer, scales, ratios, start_token_id, spike_candidates, context_candidates,
                                progress=progress)
    return MainChoices(
        alpha=search.to_dict()["alpha"],
        qfem_modules=list(search.modules),
        prefix_ids=list(prefix.prefix_ids),
        prefix_tokens=list(prefix.prefix_tokens),
        target_site=prefix.target_site,
    )


MAIN_METHODS = ("fp", "w8a8", "w8a8+qfep", "w8a8+qfem", "w8a8+qfem+qfep")


def main_perplexity_rows(
    model,
    choices: MainChoices,
    windows,
    start_token_id: int,
    model_name: str = "",
    fp_label: str = "FP32",
    progress: bool = True,
) -> list[dict]:
    """Return ``perplexity_rows`` of the five main configurations on the same windows."""
    from . import methods

    builder = methods.ConfigurationBuilder(model, None, choices.qfem_modules, choices.prefix_ids, progress=False)
    results = {}
    for name in MAIN_METHODS:
        configuration = builder.build(name)
        label = fp_label if name == "fp" else configuration.method.label
        results[label] = methods.evaluate(configuration, windows, start_token_id, progress, f"{model_name} {label}".strip())
        del configuration
    return perplexity_rows(results, results[fp_label].ppl, results["W8A8"].ppl, model=model_name)
ZEROSHOT_COLUMNS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "word_perplexity",
                    "byte_perplexity", "bits_per_byte", "token_perplexity", "n_tokens")


def zeroshot_rows(
    model,
    tokenizer,
    start_token_id: int,
    choices: MainChoices,
    tasks,
    data_dir: str | None,
    n_docs,
    seed: int,
    batch_size: int = 8,
    max_length: int | None = None,
    model_name: str = "",
    fp_label: str = "FP32",
) -> tuple[list[dict], list[dict]]:
    """Evaluate the five main configurations with lm-evaluation-harness.

    Returns one row per (configuration, task) with the harness's metrics, and one summary row
    per configuration with the mean accuracy over ``spikelib.zeroshot.PAPER_TASKS``, the number
    of log-likelihood requests and the wall time.
    """
    from . import methods, zeroshot

    builder = methods.ConfigurationBuilder(model, None, choices.qfem_modules, choices.prefix_ids, progress=False)
    rows, summary = [], []
    for name in MAIN_METHODS:
        configuration = builder.build(name)
        label = fp_label if name == "fp" else configuration.method.label
        result = zeroshot.evaluate_zeroshot(configuration.model, tokenizer, tasks, data_dir, configuration.prefix,
                                            start_token_id, n_docs=n_docs, seed=seed, batch_size=batch_size,
                                            max_length=max_length)
        del configuration
        for task, metrics in result.tasks.items():
            row = {"model": model_name, "method": label, "task": task, "version": metrics.get("version"),
                   "n_docs": metrics.get("n_docs"), "n_docs_total": metrics.get("n_docs_total")}
            row.update({column: metrics.get(column) for column in ZEROSHOT_COLUMNS})
            rows.append(row)
        summary.append({"model": model_name, "method": label, "paper_average_acc": result.paper_average_acc,
                        "loglikelihood_requests": result.loglikelihood_requests,
                        "rolling_documents": result.rolling_documents, "seconds": round(result.seconds, 1)})
    return rows, summary
