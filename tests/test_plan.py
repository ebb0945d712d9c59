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


def _results_dir(tmp_path, tiny_model, zoo_name: str = "tiny-zoo"):
    """A results folder as the pipeline leaves it, with the tiny model's scales for both routes."""
    from spikelib import calibration

    windows = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = BOS_ID
    scales = calibration.calibrate(tiny_model, windows, progress=False)
    results = tmp_path / "results"
    (results / "main").mkdir(parents=True)
    (results / "calibration").mkdir()
    (results / "zoo" / "scales").mkdir(parents=True)
    scales.save(results / "calibration" / "token_scales.pt")
    scales.save(results / "zoo" / "scales" / f"{zoo_name}.pt")
    (results / "main" / "qfem_selection.json").write_text(json.dumps({"alpha": 2.5, "modules": ["model.layers.1.mlp.down_proj"]}))
    (results / "main" / "qfep_prefix.json").write_text(json.dumps({"prefix_ids": [BOS_ID, 9, 17], "prefix_tokens": ["<s>", "a", "b"]}))
    zoo = {"choices": {zoo_name: {"alpha": None, "qfem_modules": [], "prefix_ids": [BOS_ID, 5], "prefix_tokens": ["<s>", "c"]}}}
    (results / "zoo" / "main_table.json").write_text(json.dumps(zoo))
    return results, scales


def test_plan_from_pipeline_results(tmp_path, tiny_model):
    results, scales = _results_dir(tmp_path, tiny_model)
    main = plan.plan_from_results("tiny", "tiny", results)
    assert main.full_precision_modules == ["model.layers.1.mlp.down_proj"]
    assert main.prefix_ids == [BOS_ID, 9, 17]
    assert main.alpha == 2.5
    site_max = scales.site_max()
    assert main.input_absmax["model.layers.0.mlp.down_proj"] == site_max[scales.module_sites["model.layers.0.mlp.down_proj"]]
    # q, k and v share one input, so they share one maximum
    assert main.input_absmax["model.layers.0.self_attn.q_proj"] == main.input_absmax["model.layers.0.self_attn.v_proj"]
    assert len(main.input_absmax) == 14
    main.check_model(tiny_model)

    zoo = plan.plan_from_results("tiny-zoo", "tiny", results)
    assert zoo.full_precision_modules == []
    assert zoo.prefix_ids == [BOS_ID, 5]
    assert zoo.alpha is None
    with pytest.raises(ValueError, match="zoo_main.model_names"):
        plan.plan_from_results("other", "tiny", results)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "not a plan object"),
    ('{"format_version": 1, "model_name": "tiny", "meth', "not valid JSON"),
    ('{"format_version": 1, "method": "w8a8"}', "lacks the plan fields"),
    ('{"format_version": 1, "model_name": "tiny", "method": "w8a8", "full_precision_modules": "model.layers.1"}',
     "must be a list of module names"),
    ('{"format_version": 1, "model_name": "tiny", "method": "w8a8+qfep", "prefix_ids": [1, "a"]}', "list of token ids"),
])
def test_malformed_plan_rejected(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        plan.QuantizationPlan.load(path)


def test_plan_settings_it_cannot_apply_rejected():
    with pytest.raises(ValueError, match="SmoothQuant"):
        plan.QuantizationPlan("tiny", "w8a8+sq+qfem")
    with pytest.raises(ValueError, match="static scales need calibration windows"):
        plan.QuantizationPlan("tiny", "w8a8", act_granularity="static")


def test_plan_prefix_outside_vocabulary_rejected(tiny_model):
    chosen = plan.QuantizationPlan("other", "w8a8+qfep", prefix_ids=[BOS_ID, 151643])
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        chosen.check_model(tiny_model)
