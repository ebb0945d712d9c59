"""The prefill benchmark: method names, runners for every engine, memory accounting and the cost summary."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import BOS_ID, LINEARS_PER_LAYER, VOCAB_SIZE
from spikelib import bench, cost, int8, plan

FP_MODULE = "model.layers.1.mlp.down_proj"


def test_method_names_parsed():
    assert bench.BenchMethod.parse("fp").engine == "float"
    parsed = bench.BenchMethod.parse("w8a8+qfem")
    assert (parsed.engine, parsed.method.qfem, parsed.method.qfep) == ("int8", True, False)
    peer = bench.BenchMethod.parse("torchao+qfem+qfep")
    assert peer.engine == "torchao"
    assert (peer.method.quantize, peer.method.qfem, peer.method.qfep) == (True, True, True)
    with pytest.raises(ValueError, match="choose from"):
        bench.BenchMethod.parse("w8a8+sq")


def test_runners_for_every_method(tiny_model):
    runners, details = bench.build_runners(tiny_model, bench.METHODS, [FP_MODULE], [BOS_ID, 9, 17])
    assert list(runners) == list(bench.METHODS)
    assert details["fp"]["engine"] == "float"
    assert details["torchao"]["engine"] == "torchao"
    assert details["w8a8"]["activation"] == "int8 dynamic, per-tensor"
    assert details["w8a8+qfem+qfep"]["fp_modules"] == 1
    # one down_proj (64 x 32) of two layers, each with q and o (32 x 32), k and v (32 x 16), gate, up and down (32 x 64)
    layer = 32 * 32 + 16 * 32 * 2 + 32 * 32 + 3 * 32 * 64
    assert details["w8a8+qfem+qfep"]["fp_weight_share"] == pytest.approx(64 * 32 / (2 * layer), abs=1e-4)
    assert details["w8a8"]["fp_weight_share"] == 0
    assert details["w8a8+qfem+qfep"]["prefix_tokens"] == 3
    assert details["w8a8"]["fp_modules"] == 0
    assert details["w8a8"]["prefix_tokens"] == 0
    # int8 values plus one float32 scale per output channel
    assert details["w8a8"]["linear_weight_mb"] < details["fp"]["linear_weight_mb"] / 3
    assert runners["w8a8+qfep"].prefix is not None
    assert runners["w8a8"].prefix is None
    # unquantized tensors are stored once, shared with the full-precision model
    for name in ("w8a8", "w8a8+qfem+qfep", "torchao"):
        assert runners[name].model.model.embed_tokens.weight is tiny_model.model.embed_tokens.weight
        assert runners[name].model.lm_head.weight is tiny_model.lm_head.weight
    assert runners["w8a8"].model.model.layers[0].mlp.down_proj.weight_int8.dtype == torch.int8
    ids = torch.randint(4, VOCAB_SIZE, (1, 10), generator=torch.Generator().manual_seed(0))
    for runner in runners.values():
        runner(ids)


def test_qfep_methods_need_a_prefix(tiny_model):
    with pytest.raises(ValueError, match="prefix"):
        bench.build_runners(tiny_model, ["w8a8+qfep"], [], None)


def test_torchao_leaves_the_plan_modules_unquantized(tiny_model):
    """A plan's ``ignore`` names are the fully qualified names that torchao's filter receives."""
    chosen = plan.QuantizationPlan("tiny", "w8a8+qfem", full_precision_modules=[FP_MODULE])
    quantized = bench.torchao_int8(tiny_model, chosen.ignore)
    kinds = {name: type(module.weight).__name__ for name, module in quantized.named_modules() if isinstance(module, nn.Linear)}
    assert kinds[FP_MODULE] == "Parameter"
    assert kinds["lm_head"] == "Parameter"
    quantized_names = [name for name, kind in kinds.items() if kind != "Parameter"]
    assert len(quantized_names) == 2 * LINEARS_PER_LAYER - 1
    sizes = int8.linear_weight_bytes(quantized)
    assert sizes["float"] == 64 * 32 * 4  # the one full-precision down_proj
    ids = torch.randint(4, VOCAB_SIZE, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(quantized(input_ids=ids).logits).all()


def test_model_bytes_counts_int8_weights(tiny_model):
    from spikelib import quantizers

    full = bench.model_bytes(tiny_model)
    converted = int8.to_int8(quantizers.quantize_model(tiny_model))
    linear_float = sum(m.weight.numel() * 4 for name, m in tiny_model.named_modules()
                       if isinstance(m, nn.Linear) and name != "lm_head")
    linear_int8 = sum(m.weight_int8.numel() + m.weight_scale.numel() * 4 for m in converted.modules()
                      if isinstance(m, int8.Int8Linear))
    assert bench.model_bytes(converted) == full - linear_float + linear_int8


def test_sweep_rows(tiny_model):
    runners, details = bench.build_runners(tiny_model, ["fp", "w8a8"], [], None)
    rows = bench.sweep(runners, details, [8, 16], VOCAB_SIZE, repeats=2, progress=False)
    assert [(row["seq_len"], row["method"]) for row in rows] == [(8, "fp"), (8, "w8a8"), (16, "fp"), (16, "w8a8")]
    for row in rows:
        assert row["prefill_ms"] > 0
        assert len(row["runs_ms"]) == 2
        assert row["peak_memory_mb"] >= row["model_mb"]


def test_summary_ratios():
    rows = pd.DataFrame([
        {"model": "m", "seq_len": 64, "method": method, "prefill_ms": ms, "linear_weight_mb": mb, "peak_memory_mb": mb + 10,
         "fp_modules": 0, "prefix_tokens": 0, "activation": "x"}
        for method, ms, mb in (("fp", 300.0, 40.0), ("w8a8", 150.0, 10.0), ("w8a8+qfem+qfep", 165.0, 10.0),
                               ("torchao", 200.0, 10.0))
    ] + [{"model": "m", "seq_len": 32, "method": "fp", "prefill_ms": 1.0, "linear_weight_mb": 40.0,
          "peak_memory_mb": 50.0, "fp_modules": 0, "prefix_tokens": 0, "activation": "x"}])
    table = cost.summary(rows, 64).set_index("method")
    assert table.loc["w8a8", "speedup_vs_fp"] == pytest.approx(2.0)
    assert table.loc["w8a8+qfem+qfep", "slowdown_vs_w8a8"] == pytest.approx(0.1)
    assert table.loc["w8a8", "vs_torchao"] == pytest.approx(0.75)
    assert table.loc["w8a8", "weight_ratio_vs_fp"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="measured lengths are"):
        cost.summary(rows, 128)


def test_summary_leaves_ratios_empty_without_reference():
    rows = pd.DataFrame([{"model": "m", "seq_len": 64, "method": "w8a8", "prefill_ms": 10.0, "linear_weight_mb": 1.0,
                          "peak_memory_mb": 2.0, "fp_modules": 0, "prefix_tokens": 0, "activation": "x"}])
    row = cost.summary(rows, 64).iloc[0]
    assert row["speedup_vs_fp"] is None
    assert row["vs_torchao"] is None
    assert row["slowdown_vs_w8a8"] == 0


def test_peak_rss_sees_an_allocation():
    with bench.PeakRss(interval=0.001) as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, written so that its pages are resident
        block.add_(1)
    assert rss.extra_mb > 32
    del block
