"""QFeM, the quantization-free module and the search for its threshold alpha.

For each linear module m, r(m) = max_t a_t / median_t a_t over the token-wise input scales a_t
of the calibration tokens. A large r means a few spike tokens set the per-tensor scale. Modules
with r(m) > alpha keep full-precision activations; their weights stay INT8. Siblings that read
the same input (q/k/v, gate/up) share one ratio, so they are always excluded together.

Source: Yang, Kim and Kim (2024), arXiv:2405.14428, section 4.1. Its threshold search is described
there but not shipped with the authors' code. spikelib's version: for a grid of alphas,
measure the quantized model's perplexity on held-out calibration text. The chosen alpha is the
largest one whose perplexity is within ``tolerance`` (relative) of the best perplexity on the
grid, i.e. the fewest full-precision modules that give nearly all of the attainable gain.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .hooks import TokenScales
from .quantizers import set_full_precision_inputs

logger = logging.getLogger(__name__)


def site_ratios(scales: TokenScales) -> dict[str, float]:
    """Return max / median of the token-wise scales of every linear input site (hidden states excluded)."""
    input_sites = set(scales.module_sites.values())
    ratios = {}
    for site in input_sites:
        values = scales.scales[site].flatten().double().numpy()
        # numpy's median averages the two middle values of an even count; torch.median does not.
        median = float(np.median(values))
        ratios[site] = float(values.max()) / median if median > 0 else math.inf
    return ratios


def module_ratios(scales: TokenScales) -> dict[str, float]:
    """Return r(m) for every quantizable linear module; siblings get their shared site's ratio."""
    by_site = site_ratios(scales)
    return {module: by_site[site] for module, site in scales.module_sites.items()}


def select_modules(ratios: dict[str, float], alpha: float, module_sites: dict[str, str] | None = None) -> list[str]:
    """Return the modules with r(m) > alpha, plus every sibling that shares an input with one of them."""
    selected = {module for module, ratio in ratios.items() if ratio > alpha}
    if module_sites:
        sites = {module_sites[module] for module in selected}
        selected |= {module for module, site in module_sites.items() if site in sites}
    return sorted(selected)


def threshold_grid(ratios: dict[str, float], n_thresholds: int) -> list[float]:
    """Return +inf (plain W8A8), then alphas that exclude the top 1, 2, ..., n distinct ratios in turn.

    Each alpha is the geometric mean of two consecutive distinct ratios, so small changes in
    calibration do not move a module across it.
    """
    distinct = sorted({round(value, 6) for value in ratios.values() if math.isfinite(value)}, reverse=True)
    alphas = [math.inf]
    for upper, lower in zip(distinct, distinct[1:]):
        if len(alphas) > n_thresholds:
            break
        alphas.append(math.sqrt(upper * lower))
    return alphas


@dataclass
class ThresholdSearch:
    """Perplexity against the number of full-precision modules for each alpha, and the choice."""

    points: list[dict]
    alpha: float
    modules: list[str]
    tolerance: float
    rule: str

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["alpha"] = _finite_or_none(self.alpha)
        for point in payload["points"]:
            point["alpha"] = _finite_or_none(point["alpha"])
        return payload


def choose_alpha(points: Sequence[dict], tolerance: float) -> dict:
    """Return the point with the fewest full-precision modules whose ppl <= (1 + tolerance) * best ppl."""
    best = min(point["ppl"] for point in points)
    eligible = [point for point in points if point["ppl"] <= (1 + tolerance) * best]
    return min(eligible, key=lambda point: (point["n_modules"], -point["alpha"]))


@torch.no_grad()
def search_threshold(
    quantized_model: nn.Module,
    ratios: dict[str, float],
    module_sites: dict[str, str],
    alphas: Sequence[float],
    evaluate: Callable[[nn.Module], float],
    tolerance: float = 0.02,
    progress: bool = True,
) -> ThresholdSearch:
    """Evaluate ``evaluate(quantized_model)`` (a perplexity) for every alpha and choose one.

    The model is left with the chosen modules in full precision.
    """
    if not alphas:
        raise ValueError("alphas is empty; give at least one threshold")
    points = []
    measured: dict[tuple[str, ...], float] = {}
    for alpha in tqdm(sorted(alphas, reverse=True), desc="QFeM threshold search", unit="alpha", disable=not progress):
        modules = tuple(select_modules(ratios, alpha, module_sites))
        if modules not in measured:
            set_full_precision_inputs(quantized_model, modules)
            measured[modules] = float(evaluate(quantized_model))
        points.append({"alpha": float(alpha), "n_modules": len(modules), "ppl": measured[modules]})
        logger.info("alpha=%.4g: %d full-precision modules, ppl %.3f", alpha, len(modules), measured[modules])

    chosen = choose_alpha(points, tolerance)
    modules = select_modules(ratios, chosen["alpha"], module_sites)
    set_full_precision_inputs(quantized_model, modules)
    rule = (
        f"largest alpha whose held-out perplexity is within {tolerance:.1%} of the best perplexity on the grid"
    )
    return ThresholdSearch(points=points, alpha=chosen["alpha"], modules=modules, tolerance=tolerance, rule=rule)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
