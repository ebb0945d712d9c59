"""The INT8 execution path against the fake quantizer: one layer, whole models, QFeM and QFeP."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import BOS_ID
from spikelib import int8, qfep, quantizers
from spikelib.quantizers import FakeQuantLinear, QuantConfig


def random_linear(in_features: int = 48, out_features: int = 40, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.5)
    return layer


def spiky_input(rows: int = 12, features: int = 48, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, features, generator=generator)
    x[0, 0, 3] = 300.0  # one activation spike, 100 times the other inputs' scale
    return x


@pytest.mark.parametrize("granularity", int8.GRANULARITIES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_fake_quantizer(granularity, bias):
    fake = FakeQuantLinear.from_float(random_linear(bias=bias), QuantConfig(act_granularity=granularity))
    real = int8.Int8Linear.from_fake(fake)
    x = spiky_input()
    expected = fake(x)
    # Both compute the same integer products; only float rounding of the rescaling differs.
    torch.testing.assert_close(real(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_weight_is_stored_as_int8():
    fake = FakeQuantLinear.from_float(random_linear(), QuantConfig())
    real = int8.Int8Linear.from_fake(fake)
    assert real.weight_int8.dtype == torch.int8
    assert real.weight_int8.abs().max() == 127
    torch.testing.assert_close(real.dequantized_weight(torch.float32), fake.weight)


def test_full_precision_input_uses_float_activations():
    fake = FakeQuantLinear.from_float(random_linear(), QuantConfig())
    fake.quantize_input = False
    real = int8.Int8Linear.from_fake(fake)
    assert not real.quantize_input
    x = spiky_input()
    torch.testing.assert_close(real(x), fake(x), rtol=1e-5, atol=1e-4)


def test_fallback_product_equals_int_mm(monkeypatch):
    a = torch.randint(-128, 128, (5, 24), dtype=torch.int8)
    b = torch.randint(-128, 128, (24, 7), dtype=torch.int8)
    expected = torch._int_mm(a, b)
    monkeypatch.setattr(int8, "int_mm_supported", lambda *args: False)
    assert torch.equal(int8.int8_matmul(a, b), expected)


def test_fallback_exact_for_wide_inputs():
    """Full-scale int8 values over 3,000 inner columns: one float32 matmul would round the sums."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (4, 3000), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (3000, 5), dtype=torch.int8, generator=generator)
    a[0] = 127
    b[:, 0] = 127  # 3,000 x 16,129: partial sums beyond 2^24, where float32 spacing is 2 or more
    expected = torch._int_mm(a, b)
    single = (a.float() @ b.float()).round().to(torch.int32)
    assert not torch.equal(single, expected)
    assert torch.equal(int8.exact_float_matmul(a, b), expected)


def test_cuda_shape_rules():
    cuda = torch.device("cuda")
    assert int8.int_mm_supported(32, 64, 64, cuda)
    assert not int8.int_mm_supported(16, 64, 64, cuda)
    assert not int8.int_mm_supported(32, 60, 64, cuda)
    assert int8.int_mm_supported(1, 3, 5, torch.device("cpu"))


def test_static_and_narrow_configurations_rejected():
    static = FakeQuantLinear.from_float(random_linear(), QuantConfig(act_granularity="static"), static_absmax=4.0)
    with pytest.raises(ValueError, match="dynamic"):
        int8.Int8Linear.from_fake(static)
    four_bit = FakeQuantLinear.from_float(random_linear(), QuantConfig(n_bits=4))
    with pytest.raises(ValueError, match="8-bit per-channel"):
        int8.Int8Linear.from_fake(four_bit)


def test_model_conversion_matches_fake_model(tiny_model):
    fake = quantizers.quantize_model(tiny_model, full_precision_inputs=["model.layers.1.mlp.down_proj"])
    real = int8.to_int8(fake)
    layers = {name: m for name, m in real.named_modules() if isinstance(m, int8.Int8Linear)}
    assert len(layers) == 14
    assert not layers["model.layers.1.mlp.down_proj"].quantize_input
    ids = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = fake(input_ids=ids).logits
        output = real(input_ids=ids).logits
    torch.testing.assert_close(output, expected, rtol=1e-3, atol=1e-3)


def test_conversion_keeps_prefix_cache_working(tiny_model):
    fake = quantizers.quantize_model(tiny_model)
    real = int8.to_int8(fake)
    cache = qfep.PrefixCache(tiny_model, [BOS_ID, 9, 17])
    ids = torch.randint(4, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = fake(input_ids=ids, **cache.forward_kwargs()).logits
        output = real(input_ids=ids, **cache.forward_kwargs()).logits
    torch.testing.assert_close(output, expected, rtol=1e-3, atol=1e-3)


def test_conversion_needs_a_quantized_model(tiny_model):
    with pytest.raises(ValueError, match="quantize_model"):
        int8.to_int8(tiny_model)


def test_linear_weights_four_times_smaller(tiny_model):
    fake = quantizers.quantize_model(tiny_model)
    before = int8.linear_weight_bytes(fake, decoder_only=True)
    after = int8.linear_weight_bytes(int8.to_int8(fake), decoder_only=True)
    assert after["int8"] * 4 == before["float"]
    assert after["float"] == 0
