"""INT8 fake quantizers, QuantConfig, FakeQuantLinear and quantize_model.

The references are worked out by hand. Most inputs have an absmax of 127 * 2^k, so the step
size s = absmax / 127 is a power of two and every quantized value is exact in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from spikelib.architectures import family_for, linear_module_sites
from spikelib.quantizers import (
    FakeQuantLinear,
    QuantConfig,
    absmax_to_scale,
    fake_quantize,
    integer_range,
    quantize_activation_per_tensor_absmax,
    quantize_activation_per_token_absmax,
    quantize_activation_static,
    quantize_model,
    quantize_weight_per_channel_absmax,
    quantize_weight_per_tensor_absmax,
    set_full_precision_inputs,
)

from conftest import LINEARS_PER_LAYER

# Row 0 has absmax 63.5 (step 0.5) and row 1 has absmax 254 (step 2).
WEIGHT = torch.tensor([[63.5, -20.2, 1.3], [254.0, 3.2, -7.2]])

# Token 0 has absmax 127/64 (step 1/64), token 1 is an outlier with absmax 254 (step 2).
ACTIVATION = torch.tensor([[[0.3, -0.7, 127 / 64], [254.0, 0.9, -3.3]]])


# --- integer grid and step size ------------------------------------------------------------


def test_integer_range_8bit():
    assert integer_range(8) == (-128, 127)


def test_integer_range_4bit():
    assert integer_range(4) == (-8, 7)


def test_absmax_to_scale_8bit():
    assert absmax_to_scale(torch.tensor(254.0), 8) == torch.tensor(2.0)


def test_absmax_to_scale_zero_positive():
    scale = absmax_to_scale(torch.tensor(0.0), 8)
    assert scale > 0
    assert scale == torch.finfo(torch.float32).tiny


def test_zero_tensor_under_flush_denormal():
    # The all-zero scale must stay a normal float, or flush-to-zero turns 0 / scale into NaN.
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU does not support flush-denormal mode")
    try:
        quantized = quantize_activation_per_tensor_absmax(torch.zeros(2, 3))
    finally:
        torch.set_flush_denormal(False)
    assert not torch.isnan(quantized).any()
    assert torch.equal(quantized, torch.zeros(2, 3))


def test_fake_quantize_rounds_and_clamps():
    x = torch.tensor([0.4, 0.6, -1.4, 2.5, -2.5, 300.0, -300.0])
    # torch.round rounds halves to even: 2.5 -> 2 and -2.5 -> -2.
    expected = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0, 127.0, -128.0])
    assert torch.equal(fake_quantize(x, torch.tensor(1.0), 8), expected)


def test_fake_quantize_scales_back():
    x = torch.tensor([1.0, -3.3, 5.2])
    # x / 0.5 = [2, -6.6, 10.4] -> [2, -7, 10] -> times 0.5.
    expected = torch.tensor([1.0, -3.5, 5.0])
    assert torch.equal(fake_quantize(x, torch.tensor(0.5), 8), expected)


def test_fake_quantize_4bit_clamps():
    x = torch.tensor([7.4, 9.0, -9.0])
    expected = torch.tensor([7.0, 7.0, -8.0])
    assert torch.equal(fake_quantize(x, torch.tensor(1.0), 4), expected)


# --- weights ------------------------------------------------------------------------------


def test_weight_per_channel_reference():
    # Row 0 / 0.5 = [127, -40.4, 2.6] -> [127, -40, 3]. Row 1 / 2 = [127, 1.6, -3.6] -> [127, 2, -4].
    expected = torch.tensor([[63.5, -20.0, 1.5], [254.0, 4.0, -8.0]])
    assert torch.equal(quantize_weight_per_channel_absmax(WEIGHT), expected)


def test_weight_per_tensor_reference():
    # One step 254 / 127 = 2. Row 0 / 2 = [31.75, -10.1, 0.65] -> [32, -10, 1].
    expected = torch.tensor([[64.0, -20.0, 2.0], [254.0, 4.0, -8.0]])
    assert torch.equal(quantize_weight_per_tensor_absmax(WEIGHT), expected)


def test_weight_per_channel_error_bound():
    torch.manual_seed(1)
    weight = torch.randn(16, 24)
    step = weight.abs().amax(dim=-1, keepdim=True) / 127
    error = (weight - quantize_weight_per_channel_absmax(weight)).abs()
    assert bool((error <= step / 2 * (1 + 1e-5)).all())


# --- activations --------------------------------------------------------------------------


def test_activation_per_tensor_reference():
    # Step 2 for the whole tensor. Token 0 / 2 = [0.15, -0.35, 0.99] -> [0, 0, 1].
    # Token 1 / 2 = [127, 0.45, -1.65] -> [127, 0, -2].
    expected = torch.tensor([[[0.0, 0.0, 2.0], [254.0, 0.0, -4.0]]])
    assert torch.equal(quantize_activation_per_tensor_absmax(ACTIVATION), expected)


def test_activation_per_token_reference():
    # Token 0 step 1/64: [19.2, -44.8, 127] -> [19, -45, 127]. Token 1 step 2, as per tensor.
    token0 = torch.tensor([19.0, -45.0, 127.0]) / 64
    token1 = torch.tensor([254.0, 0.0, -4.0])
    expected = torch.stack([token0, token1])[None]
    assert torch.equal(quantize_activation_per_token_absmax(ACTIVATION), expected)


def test_activation_static_reference():
    x = torch.tensor([1.2, -3.3, 20.0])
    # Calibrated absmax 63.5 -> step 0.5: [2.4, -6.6, 40] -> [2, -7, 40].
    expected = torch.tensor([1.0, -3.5, 20.0])
    assert torch.equal(quantize_activation_static(x, torch.tensor(63.5)), expected)


def test_activation_static_clamps_beyond_absmax():
    x = torch.tensor([100.0, -200.0, 63.5, -63.9])
    # Step 0.5: [200, -400, 127, -127.8] clamps to [127, -128, 127, -128].
    expected = torch.tensor([63.5, -64.0, 63.5, -64.0])
    assert torch.equal(quantize_activation_static(x, torch.tensor(63.5)), expected)


def test_activation_static_ignores_runtime_absmax():
    # A dynamic quantizer would use the step 200 / 127 here, but the static one keeps step 0.5.
    x = torch.tensor([200.0, 1.2])
    expected = torch.tensor([63.5, 1.0])
    assert torch.equal(quantize_activation_static(x, torch.tensor(63.5)), expected)


def test_activation_per_tensor_error_bound():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 16) * 3
    step = x.abs().amax() / 127
    error = (x - quantize_activation_per_tensor_absmax(x)).abs()
    assert bool((error <= step / 2 * (1 + 1e-5)).all())


def test_activation_per_token_error_bound():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 16) * torch.logspace(-2, 2, 5)[None, :, None]
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    error = (x - quantize_activation_per_token_absmax(x)).abs()
    assert bool((error <= step / 2 * (1 + 1e-5)).all())


def test_outlier_token_per_token_vs_per_tensor():
    torch.manual_seed(4)
    x = torch.randn(1, 6, 32)
    x[0, 3] *= 1000.0
    normal = [0, 1, 2, 4, 5]

    per_tensor = quantize_activation_per_tensor_absmax(x)
    per_token = quantize_activation_per_token_absmax(x)
    per_tensor_error = (x - per_tensor)[0, normal].abs().max()
    per_token_error = (x - per_token)[0, normal].abs().max()

    # The outlier's step (about 3000 / 127) rounds every normal value (|x| < 5) to zero.
    assert torch.equal(per_tensor[0, normal], torch.zeros(5, 32))
    assert per_token_error * 100 < per_tensor_error
    # The outlier token itself sets the per-tensor step, so both quantizers agree on it.
    assert torch.equal(per_tensor[0, 3], per_token[0, 3])


@pytest.mark.parametrize(
    "quantize",
    [
        quantize_activation_per_tensor_absmax,
        quantize_activation_per_token_absmax,
        quantize_weight_per_channel_absmax,
        quantize_weight_per_tensor_absmax,
        lambda x: quantize_activation_static(x, torch.tensor(0.0)),
    ],
    ids=["act-per-tensor", "act-per-token", "weight-per-channel", "weight-per-tensor", "act-static"],
)
def test_zero_tensor_gives_zeros(quantize):
    result = quantize(torch.zeros(3, 4))
    assert not bool(result.isnan().any())
    assert torch.equal(result, torch.zeros(3, 4))


# --- QuantConfig --------------------------------------------------------------------------


def test_quant_config_defaults():
    config = QuantConfig()
    assert config.n_bits == 8
    assert config.weight_granularity == "per-channel"
    assert config.act_granularity == "per-tensor"


@pytest.mark.parametrize("weight", ["per-channel", "per-tensor"])
@pytest.mark.parametrize("activation", ["per-tensor", "per-token", "static"])
def test_quant_config_accepts_valid(weight, activation):
    config = QuantConfig(weight_granularity=weight, act_granularity=activation)
    assert (config.weight_granularity, config.act_granularity) == (weight, activation)


def test_quant_config_rejects_weight_granularity():
    with pytest.raises(ValueError, match="per-row") as raised:
        QuantConfig(weight_granularity="per-row")
    assert "per-channel, per-tensor" in str(raised.value)


def test_quant_config_rejects_act_granularity():
    with pytest.raises(ValueError, match="per-group") as raised:
        QuantConfig(act_granularity="per-group")
    assert "per-tensor, per-token, static" in str(raised.value)


@pytest.mark.parametrize("n_bits", [1, 17])
def test_quant_config_rejects_n_bits(n_bits):
    with pytest.raises(ValueError, match="from 2 to 16"):
        QuantConfig(n_bits=n_bits)


# --- FakeQuantLinear ----------------------------------------------------------------------


def make_linear(seed: int = 5, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, 4, bias=bias)


def test_fake_linear_weight_per_channel():
    linear = make_linear()
    layer = FakeQuantLinear.from_float(linear, QuantConfig())
    assert torch.equal(layer.weight, quantize_weight_per_channel_absmax(linear.weight.detach()))


def test_fake_linear_weight_per_tensor():
    linear = make_linear()
    layer = FakeQuantLinear.from_float(linear, QuantConfig(weight_granularity="per-tensor"))
    assert torch.equal(layer.weight, quantize_weight_per_tensor_absmax(linear.weight.detach()))


def test_fake_linear_forward_per_tensor():
    linear = make_linear()
    layer = FakeQuantLinear.from_float(linear, QuantConfig())
    x = torch.randn(2, 3, 8)
    weight = quantize_weight_per_channel_absmax(linear.weight.detach())
    expected = F.linear(quantize_activation_per_tensor_absmax(x), weight, linear.bias)
    assert torch.equal(layer(x), expected)


def test_fake_linear_forward_per_token():
    linear = make_linear()
    layer = FakeQuantLinear.from_float(linear, QuantConfig(act_granularity="per-token"))
    x = torch.randn(2, 3, 8)
    weight = quantize_weight_per_channel_absmax(linear.weight.detach())
    expected = F.linear(quantize_activation_per_token_absmax(x), weight, linear.bias)
    assert torch.equal(layer(x), expected)


def test_fake_linear_forward_static():
    linear = make_linear()
    layer = FakeQuantLinear.from_float(linear, QuantConfig(act_granularity="static"), static_absmax=0.5)
    x = torch.randn(2, 3, 8)
    weight = quantize_weight_per_channel_absmax(linear.weight.detach())
    expected = F.linear(quantize_activation_static(x, torch.tensor(0.5)), weight, linear.bias)
    assert torch.equal(layer(x), expected)


def test_fake_linear_full_precision_input():
    linear = make_linear()
    layer = FakeQuantLinear.from_float(linear, QuantConfig())
    layer.quantize_input = False
    x = torch.randn(2, 3, 8)
    weight = quantize_weight_per_channel_absmax(linear.weight.detach())
    assert torch.equal(layer(x), F.linear(x, weight, linear.bias))


def test_fake_linear_without_bias():
    layer = FakeQuantLinear.from_float(make_linear(bias=False), QuantConfig())
    assert layer.bias is None


def test_fake_linear_static_needs_absmax():
    with pytest.raises(ValueError, match="calibrated absmax"):
        FakeQuantLinear.from_float(make_linear(), QuantConfig(act_granularity="static"))


# --- quantize_model -----------------------------------------------------------------------


def quantized_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}


def test_quantize_model_wraps_decoder_linears(tiny_model):
    quantized = quantize_model(tiny_model)
    expected = set(linear_module_sites(tiny_model, family_for(tiny_model)))
    assert len(expected) == LINEARS_PER_LAYER * 2
    assert quantized_names(quantized) == expected


def test_quantize_model_wraps_three_layers(tiny_model_3layers):
    quantized = quantize_model(tiny_model_3layers)
    assert len(quantized_names(quantized)) == LINEARS_PER_LAYER * 3


@pytest.mark.parametrize(
    ("config_class", "model_class"),
    [("MistralConfig", "MistralForCausalLM"), ("Qwen2Config", "Qwen2ForCausalLM"), ("Qwen3Config", "Qwen3ForCausalLM")],
)
def test_quantize_model_other_families(config_class, model_class):
    config = getattr(transformers, config_class)(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    quantized = quantize_model(model)
    assert family_for(model).name == "llama"
    assert quantized_names(quantized) == set(linear_module_sites(model, family_for(model)))
    assert len(quantized_names(quantized)) == LINEARS_PER_LAYER * 2
    with torch.no_grad():
        logits = quantized(input_ids=torch.arange(4, 12)[None], use_cache=False).logits
    assert bool(logits.isfinite().all())


def test_quantize_model_keeps_bias():
    # Qwen2 has biases on q, k and v.
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    quantized = quantize_model(model)
    original = model.model.layers[0].self_attn.k_proj.bias
    assert torch.equal(quantized.model.layers[0].self_attn.k_proj.bias, original)


def test_quantize_model_leaves_other_modules(tiny_model):
    quantized = quantize_model(tiny_model)
    plain_linears = [name for name, module in quantized.named_modules() if type(module) is nn.Linear]
    assert plain_linears == ["lm_head"]
    assert torch.equal(quantized.lm_head.weight, tiny_model.lm_head.weight)
    assert type(quantized.model.embed_tokens) is nn.Embedding
    assert torch.equal(quantized.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)


def test_quantize_model_leaves_norms(tiny_model):
    quantized = quantize_model(tiny_model)
    original = dict(tiny_model.named_modules())
    norms = [name for name, module in quantized.named_modules() if "norm" in type(module).__name__.lower()]
    # Two norms per layer plus the final norm.
    assert len(norms) == 2 * 2 + 1
    for name in norms:
        assert type(quantized.get_submodule(name)) is type(original[name]), name
        assert torch.equal(quantized.get_submodule(name).weight, original[name].weight), name


def test_quantize_model_keeps_original(tiny_model):
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    quantized = quantize_model(tiny_model, inplace=False)
    assert quantized is not tiny_model
    assert quantized_names(tiny_model) == set()
    after = tiny_model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_quantize_model_inplace(tiny_model):
    quantized = quantize_model(tiny_model, inplace=True)
    assert quantized is tiny_model
    assert len(quantized_names(tiny_model)) == LINEARS_PER_LAYER * 2


def test_quantize_model_quantizes_weights(tiny_model):
    quantized = quantize_model(tiny_model)
    for name in quantized_names(quantized):
        original = tiny_model.get_submodule(name).weight
        assert torch.equal(quantized.get_submodule(name).weight, quantize_weight_per_channel_absmax(original)), name


def test_quantize_model_all_inputs_full_precision(tiny_model):
    modules = sorted(linear_module_sites(tiny_model, family_for(tiny_model)))
    quantized = quantize_model(tiny_model, full_precision_inputs=modules)

    # Reference: the float model with only its decoder weights replaced by their INT8 grid values.
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name in modules:
            weight = reference.get_submodule(name).weight
            weight.copy_(quantize_weight_per_channel_absmax(weight))

    input_ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = quantized(input_ids=input_ids, use_cache=False).logits
        expected = reference(input_ids=input_ids, use_cache=False).logits
        float_logits = tiny_model(input_ids=input_ids, use_cache=False).logits
    assert all(not module.quantize_input for module in quantized.modules() if isinstance(module, FakeQuantLinear))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # Weight quantization alone still changes the output.
    assert not torch.allclose(logits, float_logits, atol=1e-4)


def test_quantize_model_activation_changes_logits(tiny_model):
    modules = sorted(linear_module_sites(tiny_model, family_for(tiny_model)))
    weights_only = quantize_model(tiny_model, full_precision_inputs=modules)
    w8a8 = quantize_model(tiny_model)
    input_ids = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights_only_logits = weights_only(input_ids=input_ids, use_cache=False).logits
        w8a8_logits = w8a8(input_ids=input_ids, use_cache=False).logits
    assert not torch.allclose(weights_only_logits, w8a8_logits, atol=1e-4)


def test_quantize_model_static_absmax(tiny_model):
    modules = linear_module_sites(tiny_model, family_for(tiny_model))
    absmax = {name: 1.0 + index for index, name in enumerate(sorted(modules))}
    quantized = quantize_model(tiny_model, QuantConfig(act_granularity="static"), static_absmax=absmax)
    for name, value in absmax.items():
        assert float(quantized.get_submodule(name).static_absmax) == value, name


def test_quantize_model_static_needs_absmax(tiny_model):
    with pytest.raises(ValueError, match="calibrated absmax"):
        quantize_model(tiny_model, QuantConfig(act_granularity="static"))


# --- set_full_precision_inputs ------------------------------------------------------------


def input_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.quantize_input for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}


def test_set_full_precision_named_only(tiny_model):
    quantized = quantize_model(tiny_model)
    chosen = {"model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"}
    set_full_precision_inputs(quantized, chosen)
    flags = input_flags(quantized)
    assert {name for name, quantize in flags.items() if not quantize} == chosen
    assert sum(flags.values()) == LINEARS_PER_LAYER * 2 - 2


def test_set_full_precision_resets_others(tiny_model):
    quantized = quantize_model(tiny_model, full_precision_inputs=["model.layers.0.mlp.down_proj"])
    set_full_precision_inputs(quantized, ["model.layers.1.mlp.down_proj"])
    flags = input_flags(quantized)
    assert flags["model.layers.0.mlp.down_proj"] is True
    assert flags["model.layers.1.mlp.down_proj"] is False


def test_set_full_precision_rejects_unknown(tiny_model):
    quantized = quantize_model(tiny_model)
    with pytest.raises(KeyError, match="model.layers.0.mlp.nonexistent"):
        set_full_precision_inputs(quantized, ["model.layers.0.mlp.nonexistent"])


def test_set_full_precision_rejects_lm_head(tiny_model):
    quantized = quantize_model(tiny_model)
    with pytest.raises(KeyError, match="lm_head"):
        set_full_precision_inputs(quantized, ["lm_head"])


def test_quantize_model_rejects_unknown_full_precision(tiny_model):
    with pytest.raises(KeyError, match="model.layers.5.mlp.down_proj"):
        quantize_model(tiny_model, full_precision_inputs=["model.layers.5.mlp.down_proj"])
