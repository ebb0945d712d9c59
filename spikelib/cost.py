"""The cost study of real INT8 inference: prefill latency and memory against sequence length.

``measure_model`` loads one model, applies a quantization plan (its QFeM modules and QFeP prefix)
to every method of ``spikelib.bench.METHODS`` and times their prefill side by side at each
sequence length. ``summary`` turns the rows into ratios: speed-up over FP32, overhead over plain
W8A8, time against torchao, weight size. ``plot_cost`` draws latency and memory against sequence
length, one panel column per model.
"""

from __future__ import annotations

import gc

import pandas as pd

from . import bench, models
from .plan import QuantizationPlan

SUMMARY_COLUMNS = ("model", "method", "prefill_ms", "speedup_vs_fp", "slowdown_vs_w8a8", "vs_torchao",
                   "linear_weight_mb", "weight_ratio_vs_fp", "peak_memory_mb", "fp_modules", "fp_weight_share",
                   "prefix_tokens", "activation")


def measure_model(model_name: str, plan: QuantizationPlan, seq_lens, method_names=bench.METHODS, repeats: int = 3,
                  device: str = "cpu", dtype: str = "float32", act_granularity: str = "per-tensor",
                  progress: bool = True) -> list[dict]:
    """Return ``spikelib.bench.sweep`` rows of one model, each with the model's name."""
    model, _ = models.load_model(model_name, device, dtype)
    plan.check_model(model)
    runners, details = bench.build_runners(model, method_names, plan.full_precision_modules, plan.prefix_ids,
                                           act_granularity)
    rows = bench.sweep(runners, details, seq_lens, model.config.vocab_size, repeats, device, progress=progress)
    del runners, model
    gc.collect()
    return [{"model": model_name, **row} for row in rows]


def perplexity_agreement(model, plan: QuantizationPlan, windows, start_token_id: int,
                         method_names=("w8a8", "w8a8+qfem+qfep"), progress: bool = True) -> pd.DataFrame:
    """Return, per method, the perplexity of the fake-quantized model and of its INT8 conversion on ``windows``.

    Layer by layer the two agree to float rounding. Through the model they drift further apart,
    because a rounding difference that crosses an INT8 step boundary changes a value by a whole
    step, and the coarser the steps (per-tensor scales, spikes), the more. ``relative_difference``
    is ``|int8 / fake - 1|``.
    """
    from . import int8, methods

    builder = methods.ConfigurationBuilder(model, None, plan.full_precision_modules, plan.prefix_ids, progress=False)
    table = []
    for name in method_names:
        configuration = builder.build(name, plan.act_granularity)
        fake = methods.evaluate(configuration, windows, start_token_id, progress, f"{name} fake")
        configuration.model = int8.to_int8(configuration.model, inplace=True)
        real = methods.evaluate(configuration, windows, start_token_id, progress, f"{name} int8")
        table.append({"method": name, "fake_ppl": round(fake.ppl, 4), "int8_ppl": round(real.ppl, 4),
                      "relative_difference": abs(real.ppl / fake.ppl - 1), "n_tokens": real.n_tokens})
        del configuration
    return pd.DataFrame(table)


def summary(rows: pd.DataFrame, seq_len: int) -> pd.DataFrame:
    """Return one row per model and method at ``seq_len``, with latency and weight ratios.

    ``speedup_vs_fp`` is FP's latency over the method's; ``slowdown_vs_w8a8`` the method's over
    plain W8A8's minus one; ``vs_torchao`` the method's latency over torchao's (below 1: faster).
    Ratios whose reference method was not measured are left empty.
    """
    part = rows[rows["seq_len"] == seq_len]
    if part.empty:
        raise ValueError(f"no rows at seq_len {seq_len}; measured lengths are {sorted(rows['seq_len'].unique())}")
    table = []
    for model, group in part.groupby("model", sort=False):
        by_method = group.set_index("method")

        def reference(method: str, column: str):
            return by_method.loc[method, column] if method in by_method.index else None

        fp_ms, w8a8_ms, torchao_ms = (reference(name, "prefill_ms") for name in ("fp", "w8a8", bench.TORCHAO))
        fp_weights = reference("fp", "linear_weight_mb")
        for method, row in by_method.iterrows():
            table.append({
                "model": model, "method": method, "prefill_ms": row["prefill_ms"],
                "speedup_vs_fp": None if fp_ms is None else round(fp_ms / row["prefill_ms"], 3),
                "slowdown_vs_w8a8": None if w8a8_ms is None else round(row["prefill_ms"] / w8a8_ms - 1, 4),
                "vs_torchao": None if torchao_ms is None else round(row["prefill_ms"] / torchao_ms, 3),
                "linear_weight_mb": row["linear_weight_mb"],
                "weight_ratio_vs_fp": None if fp_weights is None else round(fp_weights / row["linear_weight_mb"], 3),
                "peak_memory_mb": row["peak_memory_mb"], "fp_modules": row["fp_modules"],
                "fp_weight_share": row.get("fp_weight_share", 0.0),
                "prefix_tokens": row["prefix_tokens"], "activation": row["activation"],
            })
    return pd.DataFrame(table, columns=list(SUMMARY_COLUMNS))


def plot_cost(rows: pd.DataFrame):
    """Return a figure: prefill latency (top) and peak memory (bottom) against sequence length, per model."""
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(rows["model"]))
    figure, axes = plt.subplots(2, len(model_names), figsize=(5.2 * len(model_names), 7.5), squeeze=False)
    for column, model in enumerate(model_names):
        part = rows[rows["model"] == model]
        for method, group in part.groupby("method", sort=False):
            style = "--" if method.startswith(bench.TORCHAO) else "-"
            axes[0, column].plot(group["seq_len"], group["prefill_ms"], style, marker="o", label=method)
            axes[1, column].plot(group["seq_len"], group["peak_memory_mb"], style, marker="o", label=method)
        axes[0, column].set_title(model)
        axes[0, column].set_ylabel("prefill latency (ms, median)")
        axes[1, column].set_ylabel("peak memory (MB): model + one pass")
        for axis in axes[:, column]:
            axis.set_xscale("log", base=2)
            axis.set_xlabel("sequence length (tokens, batch 1)")
            axis.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    return figure
