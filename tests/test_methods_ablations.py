"""Method names, the configuration builder, attention quantization and the ablation selections."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import BOS_ID, build_tiny_llama
from spikelib import ablations, methods, qfep, quantizers
from spikelib.attention_quant import enable_attention_quantization
from spikelib.channel_absmax import record_input_absmax
from spikelib.quantizers import FakeQuantLinear


def random_windows(n: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(4, 128, (n, length), generator=generator)
    windows[:, 0] = BOS_ID
    return windows


@pytest.fixture
def builder(tiny_model):
    return methods.ConfigurationBuilder(
        tiny_model, random_windows(), qfem_modules=["model.layers.1.mlp.down_proj"], prefix_ids=[BOS_ID, 9, 17], progress=False
    )


@pytest.mark.parametrize("name", methods.METHODS)
def test_method_names_round_trip(name):
    assert methods.Method.parse(name).name == name


def test_method_labels():
    assert methods.Method.parse("fp").label == "FP"
    assert methods.Method.parse("w8a8+sq+qfem+qfep").label == "W8A8+SQ+QFeM+QFeP"


@pytest.mark.parametrize("name", ["w8a8+qfep+qfem", "sq", "int8", ""])
def test_unknown_method_rejected(name):
    with pytest.raises(ValueError, match="unknown method"):
        methods.Method.parse(name)


def test_fp_configuration_is_the_model(builder, tiny_model):
    configuration = builder.build("fp")
    assert configuration.model is tiny_model
    assert configuration.prefix is None


def test_w8a8_quantizes_every_linear(builder):
    configuration = builder.build("w8a8")
    quantized = [m for m in configuration.model.modules() if isinstance(m, FakeQuantLinear)]
    assert len(quantized) == 2 * 7
    assert all(module.quantize_input for module in quantized)


def test_qfem_keeps_listed_inputs(builder):
    model = builder.build("w8a8+qfem").model
    assert not model.get_submodule("model.layers.1.mlp.down_proj").quantize_input
    assert model.get_submodule("model.layers.0.mlp.down_proj").quantize_input


def test_qfep_configuration_has_prefix(builder):
    configuration = builder.build("w8a8+qfep")
    assert configuration.prefix.prefix_ids == [BOS_ID, 9, 17]
    other = builder.build("w8a8+qfep", prefix_ids=[BOS_ID, 5])
    assert other.prefix.prefix_ids == [BOS_ID, 5]


def test_missing_parts_rejected(tiny_model):
    bare = methods.ConfigurationBuilder(tiny_model, progress=False)
    with pytest.raises(ValueError, match="prefix ids"):
        bare.build("w8a8+qfep")
    with pytest.raises(ValueError, match="QFeM modules"):
        bare.build("w8a8+qfem")
    with pytest.raises(ValueError, match="calibration_windows"):
        bare.build("w8a8+sq")


def test_static_uses_calibrated_absmax(builder, tiny_model):
    configuration = builder.build("w8a8", act_granularity="static")
    expected = record_input_absmax(tiny_model, random_windows(), progress=False).module_absmax()
    module = configuration.model.get_submodule("model.layers.0.mlp.down_proj")
    assert float(module.static_absmax) == pytest.approx(expected["model.layers.0.mlp.down_proj"])


def test_static_with_prefix_calibrates_after_prefix(builder, tiny_model):
    plain = builder.build("w8a8", act_granularity="static").model
    with_prefix = builder.build("w8a8+qfep", act_granularity="static").model
    name = "model.layers.1.self_attn.q_proj"
    prefix = qfep.PrefixCache(tiny_model, [BOS_ID, 9, 17])
    expected = record_input_absmax(tiny_model, random_windows()[:, 1:], prefix, progress=False).module_absmax()[name]
    assert float(with_prefix.get_submodule(name).static_absmax) == pytest.approx(expected)
    assert float(plain.get_submodule(name).static_absmax) != pytest.approx(expected)


def test_sq_leaves_original_untouched(builder, tiny_model):
    before = tiny_model.model.layers[0].input_layernorm.weight.clone()
    configuration = builder.build("w8a8+sq+qfem+qfep")
    torch.testing.assert_close(tiny_model.model.layers[0].input_layernorm.weight, before)
    smoothed = configuration.model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(smoothed, before)
    assert configuration.details["smoothed_sites"] == 4


def test_sq_with_prefix_calibrates_with_prefix(builder):
    without = builder.build("w8a8+sq").model.model.layers[0].input_layernorm.weight
    with_prefix = builder.build("w8a8+sq+qfep").model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(without, with_prefix)


def test_modules_limit_quantization(builder):
    chosen = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    model = builder.build("w8a8", modules=chosen).model
    quantized = sorted(name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear))
    assert quantized == chosen
    assert type(model.get_submodule("model.layers.1.mlp.down_proj")) is nn.Linear


def test_unknown_modules_rejected(tiny_model):
    with pytest.raises(KeyError, match="not decoder linear modules"):
        quantizers.quantize_model(tiny_model, modules=["lm_head"])


def test_evaluate_scores_same_tokens(builder):
    windows = random_windows(n=2, length=8)[:, 1:]
    plain = methods.evaluate(builder.build("w8a8"), windows, BOS_ID, progress=False)
    prefixed = methods.evaluate(builder.build("w8a8+qfep"), windows, BOS_ID, progress=False)
    assert plain.n_tokens == prefixed.n_tokens == windows.numel()
    assert plain.ppl != prefixed.ppl


def test_attention_quantization_changes_outputs(tiny_model):
    windows = random_windows()
    reference = tiny_model(input_ids=windows).logits
    fine = enable_attention_quantization(quantizers.quantize_model(tiny_model, quantizers.QuantConfig(n_bits=16)), n_bits=16)
    coarse = enable_attention_quantization(quantizers.quantize_model(tiny_model, quantizers.QuantConfig(n_bits=16)), n_bits=3)
    assert (fine(input_ids=windows).logits - reference).abs().max() < 0.05
    assert (coarse(input_ids=windows).logits - reference).abs().max() > 0.5
    assert tiny_model.config._attn_implementation != coarse.config._attn_implementation


def test_attention_quantization_rejects_static(tiny_model):
    with pytest.raises(ValueError, match="invalid attention granularity"):
        enable_attention_quantization(tiny_model, granularity="static")


def test_builder_attention_switch(builder):
    configuration = builder.build("w8a8", quantize_attention=True)
    assert configuration.details["quantized_attention"]
    assert configuration.model.config._attn_implementation == "spikelib_int8_qkv"


SITE_RATIOS = {f"s{i:02d}": float(100 - i) for i in range(12)}


def test_ranked_groups_are_disjoint():
    groups = ablations.ranked_site_groups(SITE_RATIOS, size=4)
    assert groups["top"] == ["s00", "s01", "s02", "s03"]
    assert groups["middle"] == ["s04", "s05", "s06", "s07"]
    assert groups["bottom"] == ["s08", "s09", "s10", "s11"]


def test_ranked_groups_middle_of_odd_count():
    ratios = {f"s{i:02d}": float(100 - i) for i in range(15)}
    groups = ablations.ranked_site_groups(ratios, size=3)
    assert groups["middle"] == ["s06", "s07", "s08"]
    assert groups["bottom"] == ["s12", "s13", "s14"]


def test_ranked_groups_too_few_sites():
    with pytest.raises(ValueError, match="three disjoint groups"):
        ablations.ranked_site_groups({"a": 1.0, "b": 2.0}, size=1)


def test_modules_of_sites_include_siblings():
    module_sites = {"l.0.q": "l.0.qkv", "l.0.k": "l.0.qkv", "l.0.v": "l.0.qkv", "l.0.down": "l.0.down_proj"}
    assert ablations.modules_of_sites(["l.0.qkv"], module_sites) == ["l.0.k", "l.0.q", "l.0.v"]


def test_random_prefix_is_seeded(tiny_tokenizer):
    first = ablations.random_prefix(tiny_tokenizer, BOS_ID, 3, seed=5)
    assert first == ablations.random_prefix(tiny_tokenizer, BOS_ID, 3, seed=5)
    assert first != ablations.random_prefix(tiny_tokenizer, BOS_ID, 3, seed=6)
    assert len(first) == 3
    assert first[0] == BOS_ID
    assert not set(first[1:]) & set(tiny_tokenizer.all_special_ids)


def test_prefix_variants(tiny_tokenizer):
    variants = ablations.prefix_variants(BOS_ID, [BOS_ID, 9, 17], tiny_tokenizer, n_random=2, seed=0)
    assert variants["none"] is None
    assert variants["start token"] == [BOS_ID]
    assert variants["start + spike token"] == [BOS_ID, 17]
    assert variants["searched"] == [BOS_ID, 9, 17]
    assert len(variants["random 1"]) == len(variants["random 2"]) == 3


def test_builder_without_qfem_modules_rejects_qfem(tiny_model):
    builder = methods.ConfigurationBuilder(tiny_model, progress=False)
    with pytest.raises(ValueError, match="needs the QFeM modules"):
        builder.build("w8a8+qfem")


def test_builder_empty_qfem_selection_is_w8a8(tiny_model):
    # A threshold search may find that no module is worth keeping in full precision.
    builder = methods.ConfigurationBuilder(tiny_model, qfem_modules=[], progress=False)
    configuration = builder.build("w8a8+qfem")
    layers = [module for module in configuration.model.modules() if isinstance(module, FakeQuantLinear)]
    assert layers
    assert all(layer.quantize_input for layer in layers)
    assert configuration.details["fp_modules"] == 0
