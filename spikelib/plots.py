"""Plotting helpers for the figures of Yang, Kim and Kim (2024). Each function returns a matplotlib Figure."""

from __future__ import annotations

import math

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import pandas as pd

from .architectures import HIDDEN_LABEL
from .hooks import TokenScales

FIGURE_SIZE = (7.0, 3.6)
SITE_ORDER = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "hidden")


def layer_max_table(scales: TokenScales) -> pd.DataFrame:
    """Return one row per (layer, site label) with the largest and median token-wise scale."""
    rows = []
    for site, values in scales.scales.items():
        layer, label = scales.site_layers[site]
        rows.append({"layer": layer, "site": label, "max": float(values.max()), "median": float(np.median(values.double().numpy()))})
    frame = pd.DataFrame(rows)
    # LLaMA-style labels in their usual order, then other families' labels as recorded, the hidden state last.
    labels = list(dict.fromkeys(frame["site"]))
    order = [label for label in SITE_ORDER[:-1] if label in labels]
    order += [label for label in labels if label not in SITE_ORDER] + [HIDDEN_LABEL]
    frame["site"] = pd.Categorical(frame["site"], categories=order, ordered=True)
    return frame.sort_values(["site", "layer"]).reset_index(drop=True)


def plot_layer_max(frame: pd.DataFrame, title: str, axis=None) -> plt.Figure:
    """Figure 1: per layer, the largest input magnitude of each module type and of the hidden state.

    Draws on ``axis`` when one is given (for panels), else on a new figure.
    """
    figure, axis = plt.subplots(figsize=FIGURE_SIZE) if axis is None else (axis.figure, axis)
    for label in frame["site"].cat.categories:
        part = frame[frame["site"] == label]
        if not part.empty:
            style = "--" if label == HIDDEN_LABEL else "-"
            axis.plot(part["layer"], part["max"], style, marker="o", markersize=3, label=label)
    axis.set_yscale("log")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("max |x| over calibration tokens")
    axis.set_title(title, fontsize=9)
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    return figure


def plot_layer_max_panels(frames: dict[str, pd.DataFrame], columns: int = 2) -> plt.Figure:
    """One ``plot_layer_max`` panel per model (the paper's appendix figures), keyed by panel title."""
    rows = math.ceil(len(frames) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(FIGURE_SIZE[0] * columns * 0.75, FIGURE_SIZE[1] * rows * 0.9),
                                squeeze=False)
    for axis, (title, frame) in zip(axes.flat, frames.items()):
        plot_layer_max(frame, title, axis)
    for axis in list(axes.flat)[len(frames):]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure


def plot_token_scales(values, tokens: list[str], title: str, n_labels: int = 3) -> plt.Figure:
    """Figure 2: token-wise scales of one sequence at one site, the largest ``n_labels`` tokens labelled."""
    values = [float(v) for v in values]
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    axis.bar(range(len(values)), values, width=1.0, color="tab:blue")
    axis.set_yscale("log")
    axis.set_xlabel("token position")
    axis.set_ylabel("token-wise scale max_j |x_tj|")
    axis.set_title(title)
    for position in sorted(range(len(values)), key=values.__getitem__, reverse=True)[:n_labels]:
        axis.annotate(
            repr(tokens[position]),
            (position, values[position]),
            textcoords="offset points",
            xytext=(6, -2),
            fontsize=8,
            color="tab:red",
        )
    figure.tight_layout()
    return figure


def plot_threshold_tradeoff(
    points: pd.DataFrame, chosen_alpha: float | None, reference: dict[str, float], title: str
) -> plt.Figure:
    """Figure 4: perplexity against the number of full-precision modules as alpha varies.

    ``points`` has columns alpha, n_modules, ppl; ``reference`` maps labels such as "FP32" to
    horizontal reference lines.
    """
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    ordered = points.sort_values("n_modules")
    axis.plot(ordered["n_modules"], ordered["ppl"], marker="o", label="W8A8 + QFeM")
    for _, row in ordered.iterrows():
        alpha = row["alpha"]
        text = "α=inf" if alpha is None or (isinstance(alpha, float) and math.isinf(alpha)) else f"α={alpha:.3g}"
        axis.annotate(text, (row["n_modules"], row["ppl"]), textcoords="offset points", xytext=(3, 4), fontsize=7)
    if chosen_alpha is not None:
        chosen = ordered[ordered["alpha"] == chosen_alpha]
        axis.scatter(chosen["n_modules"], chosen["ppl"], s=120, facecolors="none", edgecolors="tab:red", label="chosen alpha")
    for (label, value), style in zip(reference.items(), (":", "--", "-.")):
        axis.axhline(value, linestyle=style, color="gray", label=f"{label} ({value:.2f})")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("modules with full-precision activations")
    axis.set_ylabel("perplexity (held-out C4)")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_grouped_bars(
    frame: pd.DataFrame,
    group: str,
    series: str | None,
    title: str,
    reference: dict[str, float] | None = None,
    value: str = "ppl",
    ylabel: str = "perplexity (WikiText-2)",
    value_format: str = "%.1f",
) -> plt.Figure:
    """Bar chart of column ``value`` per ``group`` (x axis), one bar per ``series`` value within a group.

    Used by the SmoothQuant, granularity, ablation and zero-shot figures. ``reference`` draws
    horizontal lines, e.g. ``{"FP32": 30.2}``. The value of each bar is written above it.
    """
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    groups = list(dict.fromkeys(frame[group]))
    names = list(dict.fromkeys(frame[series])) if series else [None]
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        part = frame if name is None else frame[frame[series] == name]
        values = [float(part.loc[part[group] == g, value].iloc[0]) if (part[group] == g).any() else math.nan for g in groups]
        positions = np.arange(len(groups)) + (index - (len(names) - 1) / 2) * width
        bars = axis.bar(positions, values, width=width, label=name)
        axis.bar_label(bars, fmt=value_format, fontsize=7, padding=1)
    for (label, level), style in zip((reference or {}).items(), (":", "--", "-.")):
        axis.axhline(level, linestyle=style, color="gray", label=f"{label} ({level:.2f})")
    axis.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
