"""Quantization plans: save, reload onto a fresh model, and the names other toolkits take."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import BOS_ID, build_tiny_llama
from spikelib import int8, methods, plan


def make_plan(method: str = "w8a8+qfem+qfep") -> plan.QuantizationPlan:
    return plan.plan_from_choices("tiny", method, ["model.layers.1.mlp.down_proj"], [BOS_ID, 9, 17],
                                  input_absmax={"model.layers.1.mlp.down_proj": 12.5}, alpha=3.0)


def test_plan_round_trip(tmp_path):
    original = make_plan()
    path = original.save(tmp_path / "plans" / "tiny.json")
    loaded = plan.QuantizationPlan.load(path)
    assert loaded == original
    payload = json.loads(path.read_text())
    assert payload["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    assert payload["format_version"] == plan.FORMAT_VERSION


def test_plan_reloads_onto_fresh_model(tmp_path):
    path = make_plan().save(tmp_path / "plan.json")
    first, second = build_tiny_llama(), build_tiny_llama()
    expected = methods.ConfigurationBuilder(first, None, ["model.layers.1.mlp.down_proj"], [BOS_ID, 9, 17],
                                            progress=False).build("w8a8+qfem+qfep")
    reloaded = plan.QuantizationPlan.load(path).apply(second)
    ids = torch.randint(4, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = expected.model(input_ids=ids, **expected.prefix.forward_kwargs()).logits
        got = reloaded.model(input_ids=ids, **reloaded.prefix.forward_kwargs()).logits
    torch.testing.assert_close(got, want)
    # The reloaded configuration also converts to the INT8 path.
    converted = int8.to_int8(reloaded.model)
    assert not converted.get_submodule("model.layers.1.mlp.down_proj").quantize_input


def test_plan_keeps_only_what_the_method_uses():
    w8a8 = make_plan("w8a8")
    assert w8a8.full_precision_modules == []
    assert w8a8.prefix_ids is None
    assert w8a8.ignore == ["lm_head"]


def test_plan_for_another_model_rejected(tiny_model):
    wrong = plan.plan_from_choices("other", "w8a8+qfem", ["model.layers.7.mlp.down_proj"], None)
    with pytest.raises(ValueError, match="model.layers.7.mlp.down_proj"):
        wrong.apply(tiny_model)


def test_plan_unknown_version_rejected(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format_version": 99, "model_name": "x", "method": "w8a8"}))
    with pytest.raises(ValueError, match="format 99"):
        plan.QuantizationPlan.load(path)


def test_plan_unknown_field_rejected(tmp_path):
    payload = make_plan().to_dict()
    payload["surprise"] = 1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="surprise"):
        plan.QuantizationPlan.load(path)
