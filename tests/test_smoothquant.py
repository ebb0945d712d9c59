"""SmoothQuant: smoothing factors, exact folding for every norm style, and channel maxima."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM, GemmaConfig, GemmaForCausalLM

from conftest import build_tiny_llama
from spikelib import qfep, quantizers, smoothquant
from spikelib.architectures import family_for
from spikelib.channel_absmax import record_input_absmax

GEMMA_SIZES = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter so that norms with weight 0 or 1 do not hide folding mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
            else:
                parameter.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def build_family_model(kind: str) -> torch.nn.Module:
    if kind == "llama":
        return build_tiny_llama(num_layers=2, seed=0)
    if kind == "gemma":
        return randomize(GemmaForCausalLM(GemmaConfig(**GEMMA_SIZES)), 0)
    if kind == "gemma2":
        return randomize(Gemma2ForCausalLM(Gemma2Config(**GEMMA_SIZES)), 0)
    config = Gemma3TextConfig(**GEMMA_SIZES, sliding_window=16)
    return randomize(Gemma3ForCausalLM(config), 0)


def random_windows(n: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(4, 128, (n, length), generator=generator)
    windows[:, 0] = 1
    return windows


def test_factors_match_formula():
    act = torch.tensor([4.0, 1.0, 9.0])
    weight = torch.tensor([1.0, 4.0, 0.25])
    factors = smoothquant.smoothing_factors(act, weight, 0.5)
    expected = torch.tensor([2.0, 0.5, 6.0], dtype=torch.float64)
    torch.testing.assert_close(factors, expected)


def test_factors_alpha_extremes():
    act = torch.tensor([4.0, 1.0])
    weight = torch.tensor([2.0, 8.0])
    torch.testing.assert_close(smoothquant.smoothing_factors(act, weight, 1.0), act.double())
    torch.testing.assert_close(smoothquant.smoothing_factors(act, weight, 0.0), 1.0 / weight.double())


def test_factors_reject_bad_alpha():
    with pytest.raises(ValueError, match="migration strength"):
        smoothquant.smoothing_factors(torch.ones(2), torch.ones(2), 1.5)


def test_factors_zero_channel_stays_finite():
    factors = smoothquant.smoothing_factors(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), 0.5)
    assert torch.isfinite(factors).all()
    assert (factors > 0).all()


@pytest.mark.parametrize("kind", ["llama", "gemma", "gemma2", "gemma3"])
def test_folding_keeps_outputs(kind):
    model = build_family_model(kind)
    windows = random_windows()
    absmax = record_input_absmax(model, windows, progress=False)
    smoothed, factors = smoothquant.smooth_model(model, absmax, alpha=0.5)

    reference = model(input_ids=windows).logits
    output = smoothed(input_ids=windows).logits
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)
    assert len(factors) == 2 * 2  # qkv and gate/up of two layers
    assert any((site_factors - 1).abs().max() > 0.1 for site_factors in factors.values())


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_folding_divides_site_inputs(kind):
    model = build_family_model(kind)
    windows = random_windows()
    before = record_input_absmax(model, windows, progress=False)
    smoothed, factors = smoothquant.smooth_model(model, before, alpha=0.5)
    after = record_input_absmax(smoothed, windows, progress=False)
    for site, site_factors in factors.items():
        torch.testing.assert_close(after.channels[site], before.channels[site] / site_factors, rtol=1e-4, atol=1e-6)
    down = "model.layers.0.down_proj"
    torch.testing.assert_close(after.channels[down], before.channels[down], rtol=1e-4, atol=1e-6)


def test_wrong_norm_offset_changes_outputs():
    """The Gemma fold needs its offset of 1: folding as if w * x would change the function."""
    model = build_family_model("gemma")
    windows = random_windows()
    reference = model(input_ids=windows).logits
    broken = copy.deepcopy(model)
    layer = broken.model.layers[0]
    factors = torch.linspace(0.5, 2.0, 32, dtype=torch.float64)
    smoothquant.fold_into_norm(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj], factors, norm_offset=0.0)
    assert (broken(input_ids=windows).logits - reference).abs().max() > 1e-2


def test_family_norm_offsets():
    assert family_for(build_family_model("llama")).norm_offset == 0.0
    assert family_for(build_family_model("gemma")).norm_offset == 1.0
    assert family_for(build_family_model("gemma3")).norm_offset == 1.0


def test_smoothing_helps_outlier_channel():
    """An input channel 40 times larger than the rest ruins per-tensor W8A8; smoothing moves it into the weights."""
    model = build_tiny_llama(num_layers=2, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] = 40.0
            layer.post_attention_layernorm.weight[7] = 40.0
    windows = random_windows(n=4, length=16)
    reference = model(input_ids=windows).logits

    plain = quantizers.quantize_model(model)
    smoothed, _ = smoothquant.smooth_model(model, record_input_absmax(model, windows, progress=False), alpha=0.5)
    smoothed_quantized = quantizers.quantize_model(smoothed)
    plain_error = (plain(input_ids=windows).logits - reference).pow(2).mean()
    smoothed_error = (smoothed_quantized(input_ids=windows).logits - reference).pow(2).mean()
    assert smoothed_error < 0.5 * plain_error


def test_channel_maxima_match_norm_outputs():
    model = build_tiny_llama(num_layers=2, seed=0)
    windows = random_windows()
    outputs = {}
    handles = [
        model.model.layers[1].post_attention_layernorm.register_forward_hook(
            lambda module, args, output: outputs.setdefault("gate_up", output)
        )
    ]
    model(input_ids=windows)
    for handle in handles:
        handle.remove()
    absmax = record_input_absmax(model, windows, batch_size=2, progress=False)
    expected = outputs["gate_up"].abs().flatten(0, 1).amax(dim=0)
    torch.testing.assert_close(absmax.channels["model.layers.1.gate_up_proj"], expected)
    assert absmax.n_tokens == windows.numel()


def test_channel_maxima_skip_prefix_positions():
    model = build_tiny_llama(num_layers=2, seed=0)
    prefix_ids = [1, 9, 17]
    windows = random_windows(n=2, length=10)
    prefix = qfep.PrefixCache(model, prefix_ids)
    absmax = record_input_absmax(model, windows[:, 1:], prefix, progress=False)

    captured = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    for window in windows[:, 1:]:
        model(input_ids=torch.cat([torch.tensor(prefix_ids), window])[None, :])
    handle.remove()
    expected = torch.cat([values[0, len(prefix_ids):] for values in captured]).abs().amax(dim=0)
    torch.testing.assert_close(absmax.channels["model.layers.0.down_proj"], expected, rtol=1e-5, atol=1e-6)


def test_module_absmax_is_site_max():
    model = build_tiny_llama(num_layers=2, seed=0)
    absmax = record_input_absmax(model, random_windows(), progress=False)
    per_module = absmax.module_absmax()
    assert per_module["model.layers.0.self_attn.q_proj"] == per_module["model.layers.0.self_attn.v_proj"]
    assert per_module["model.layers.1.mlp.down_proj"] == float(absmax.channels["model.layers.1.down_proj"].max())
    assert len(per_module) == 2 * 7
