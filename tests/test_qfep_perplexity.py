"""QFeP prefix search and cache, and windowed perplexity with a start token or a prefix."""

from __future__ import annotations

import math

import pytest
import torch

from spikelib.calibration import calibrate
from spikelib.hooks import TokenScales
from spikelib.perplexity import evaluate_perplexity, split_windows, window_logits
from spikelib.qfem import module_ratios
from spikelib.qfep import PrefixCache, frequent_tokens, search_prefix, spike_token_candidates
from spikelib.quantizers import quantize_model

from conftest import BOS_ID

PREFIX = [BOS_ID, 17, 42]


def random_windows(n_windows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (n_windows, seq_len), generator=torch.Generator().manual_seed(seed))


def cache_tensors(cache) -> list[torch.Tensor]:
    return [tensor.clone() for layer in cache.layers for tensor in (layer.keys, layer.values)]


def full_logits(model, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids]), use_cache=False).logits[0].float()


def hand_nll(model, window: torch.Tensor, context: list[int]) -> float:
    """Sum the negative log-likelihood of every window token after ``context`` in one full pass."""
    logits = full_logits(model, context + window.tolist())
    predicting = logits[len(context) - 1 : len(context) - 1 + len(window)]
    log_probs = torch.log_softmax(predicting.double(), dim=-1)
    return float(-log_probs.gather(1, window[:, None]).sum())


# --- PrefixCache --------------------------------------------------------------------------


def test_prefix_cache_length(tiny_model):
    prefix = PrefixCache(tiny_model, PREFIX)
    assert len(prefix) == 3
    assert prefix.cache.get_seq_length() == 3
    assert prefix.last_logits.shape == (1, 128)


def test_prefix_cache_unchanged_by_reuse(tiny_model):
    prefix = PrefixCache(tiny_model, PREFIX)
    snapshot = cache_tensors(prefix.cache)
    for window in random_windows(3, 6):
        window_logits(tiny_model, window, prefix=prefix)
    assert prefix.cache.get_seq_length() == 3
    after = cache_tensors(prefix.cache)
    assert len(after) == len(snapshot)
    for before_tensor, after_tensor in zip(snapshot, after):
        assert torch.equal(before_tensor, after_tensor)


def test_prefix_cache_reuse_same_logits(tiny_model):
    prefix = PrefixCache(tiny_model, PREFIX)
    window = random_windows(1, 6)[0]
    first = window_logits(tiny_model, window, prefix=prefix)
    second = window_logits(tiny_model, window, prefix=prefix)
    assert torch.equal(first, second)


def test_prefix_cache_last_logits(tiny_model):
    prefix = PrefixCache(tiny_model, PREFIX)
    expected = full_logits(tiny_model, PREFIX)[-1]
    torch.testing.assert_close(prefix.last_logits[0], expected, rtol=1e-5, atol=1e-5)


def test_prefix_positions_continue(tiny_model):
    prefix = PrefixCache(tiny_model, PREFIX)
    window = random_windows(1, 8)[0]
    logits = window_logits(tiny_model, window, prefix=prefix)
    full = full_logits(tiny_model, PREFIX + window.tolist())
    # Position 2 + i of the full pass predicts window[i], starting at the last prefix token.
    expected = full[len(PREFIX) - 1 : len(PREFIX) - 1 + len(window)]
    assert logits.shape == (8, 128)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_prefix_positions_differ_from_restart(tiny_model):
    # Sanity check of the previous test: restarting positions at 0 gives different logits.
    prefix = PrefixCache(tiny_model, PREFIX)
    window = random_windows(1, 8)[0]
    logits = window_logits(tiny_model, window, prefix=prefix)
    restarted = full_logits(tiny_model, window.tolist())
    assert not torch.allclose(logits[1:], restarted[:-1], atol=1e-3)


def test_start_token_prefix_matches_bos_path(tiny_model):
    window = random_windows(1, 7)[0]
    with_prefix = window_logits(tiny_model, window, prefix=PrefixCache(tiny_model, [BOS_ID]))
    with_start = window_logits(tiny_model, window, start_token_id=BOS_ID)
    torch.testing.assert_close(with_prefix, with_start, rtol=1e-4, atol=1e-4)


def test_bos_path_logits(tiny_model):
    window = random_windows(1, 7)[0]
    logits = window_logits(tiny_model, window, start_token_id=BOS_ID)
    expected = full_logits(tiny_model, [BOS_ID] + window.tolist())[:-1]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("both", [True, False], ids=["both", "neither"])
def test_window_logits_needs_one_start(tiny_model, both):
    window = random_windows(1, 4)[0]
    prefix = PrefixCache(tiny_model, PREFIX) if both else None
    start = BOS_ID if both else None
    with pytest.raises(ValueError, match="exactly one of start_token_id and prefix"):
        window_logits(tiny_model, window, start_token_id=start, prefix=prefix)


# --- evaluate_perplexity ------------------------------------------------------------------


def test_perplexity_bos_reference(tiny_model):
    windows = random_windows(3, 6)
    result = evaluate_perplexity(tiny_model, windows, start_token_id=BOS_ID, progress=False)
    nll = sum(hand_nll(tiny_model, window, [BOS_ID]) for window in windows)
    assert result.n_tokens == 18
    assert result.n_windows == 3
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / 18), rel=1e-5)


def test_perplexity_prefix_reference(tiny_model):
    windows = random_windows(3, 6)
    result = evaluate_perplexity(tiny_model, windows, prefix=PrefixCache(tiny_model, PREFIX), progress=False)
    nll = sum(hand_nll(tiny_model, window, PREFIX) for window in windows)
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / 18), rel=1e-5)


def test_perplexity_prefix_not_scored(tiny_model):
    windows = random_windows(2, 5)
    with_prefix = evaluate_perplexity(tiny_model, windows, prefix=PrefixCache(tiny_model, PREFIX), progress=False)
    with_start = evaluate_perplexity(tiny_model, windows, start_token_id=BOS_ID, progress=False)
    assert with_prefix.n_tokens == windows.numel()
    assert with_start.n_tokens == windows.numel()


def test_perplexity_quantized_prefix_first_token(tiny_model):
    # With one-token windows only the float prefix logits score anything.
    windows = random_windows(3, 1)
    prefix = PrefixCache(tiny_model, PREFIX)
    result = evaluate_perplexity(quantize_model(tiny_model), windows, prefix=prefix, progress=False)
    log_probs = torch.log_softmax(full_logits(tiny_model, PREFIX)[-1].double(), dim=-1)
    expected = float(-log_probs[windows[:, 0]].sum())
    assert result.n_tokens == 3
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)


def test_perplexity_quantized_prefix_uses_quantized(tiny_model):
    windows = random_windows(2, 6)
    prefix = PrefixCache(tiny_model, PREFIX)
    quantized = evaluate_perplexity(quantize_model(tiny_model), windows, prefix=prefix, progress=False)
    full_precision = evaluate_perplexity(tiny_model, windows, prefix=prefix, progress=False)
    assert quantized.n_tokens == full_precision.n_tokens
    assert quantized.nll_sum != pytest.approx(full_precision.nll_sum, rel=1e-4)


# --- split_windows ------------------------------------------------------------------------


def test_split_windows_drops_remainder():
    windows = split_windows(list(range(10)), 3)
    assert torch.equal(windows, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))


def test_split_windows_keeps_first():
    windows = split_windows(list(range(10)), 3, n_windows=2)
    assert torch.equal(windows, torch.tensor([[0, 1, 2], [3, 4, 5]]))


def test_split_windows_caps_count():
    assert split_windows(list(range(10)), 3, n_windows=10).shape == (3, 3)


def test_split_windows_exact_fit():
    assert split_windows(list(range(6)), 3).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_split_windows_too_few_tokens():
    with pytest.raises(ValueError, match="only 2 tokens, fewer than one window of 3"):
        split_windows([5, 6], 3)


# --- candidates ---------------------------------------------------------------------------


def candidate_scales() -> TokenScales:
    # Token 1 sits only at position 0, with the largest scales of all.
    token_ids = torch.tensor([[1, 50, 7, 8], [1, 9, 50, 7]])
    values = torch.tensor([[1000.0, 5.0, 30.0, 2.0], [900.0, 20.0, 3.0, 10.0]])
    return TokenScales(
        scales={"layer.down_proj": values},
        token_ids=token_ids,
        module_sites={"layer.mlp.down_proj": "layer.down_proj"},
        site_layers={"layer.down_proj": (0, "down_proj")},
    )


def test_spike_candidates_order():
    # Scales after position 0, descending: 30 (7), 20 (9), 10 (7 again), 5 (50), 3 (50), 2 (8).
    assert spike_token_candidates(candidate_scales(), "layer.down_proj", 10) == [7, 9, 50, 8]


def test_spike_candidates_limit():
    assert spike_token_candidates(candidate_scales(), "layer.down_proj", 2) == [7, 9]


def test_spike_candidates_skip_position0():
    assert 1 not in spike_token_candidates(candidate_scales(), "layer.down_proj", 10)


def test_frequent_tokens_order():
    token_ids = torch.tensor([[1, 5, 5, 6], [1, 6, 5, 7]])
    # After position 0, token 5 occurs three times, 6 twice and 7 once. The start token 1 is not counted.
    assert frequent_tokens(token_ids, 2) == [5, 6]
    assert frequent_tokens(token_ids, 10) == [5, 6, 7]


# --- search_prefix ------------------------------------------------------------------------


@pytest.fixture
def searched(tiny_model, tiny_tokenizer):
    windows = torch.cat([torch.full((4, 1), BOS_ID), random_windows(4, 11, seed=7)], dim=1)
    scales = calibrate(tiny_model, windows, batch_size=4, progress=False)
    ratios = module_ratios(scales)
    result = search_prefix(
        tiny_model, tiny_tokenizer, scales, ratios, BOS_ID, n_spike_candidates=3, n_context_candidates=4, progress=False
    )
    return result, scales, ratios


def test_search_prefix_shape(searched):
    result, scales, _ = searched
    assert len(result.prefix_ids) == 3
    assert result.prefix_ids[0] == BOS_ID
    assert result.prefix_ids[1] in result.context_candidates
    assert result.prefix_ids[2] in result.spike_candidates


def test_search_prefix_candidates(searched):
    result, scales, _ = searched
    assert result.context_candidates == frequent_tokens(scales.token_ids, 4)
    assert result.spike_candidates == spike_token_candidates(scales, result.target_site, 3)


def test_search_prefix_target(searched):
    result, scales, ratios = searched
    best_module = max(ratios, key=ratios.get)
    assert result.target_site == scales.module_sites[best_module]
    assert result.target_layer == scales.site_layers[result.target_site][0]


def test_search_prefix_text(searched, tiny_tokenizer):
    result, _, _ = searched
    assert result.prefix_text == tiny_tokenizer.decode(result.prefix_ids)
    assert result.prefix_tokens == [tiny_tokenizer.decode([token]) for token in result.prefix_ids]


def test_search_prefix_top_pairs_sorted(searched):
    result, _, _ = searched
    scores = [pair["score"] for pair in result.top_pairs]
    assert len(scores) == 10
    assert scores == sorted(scores, reverse=True)
    best = result.top_pairs[0]
    assert [best["context_id"], best["spike_id"]] == result.prefix_ids[1:]
    assert best["score"] == pytest.approx(best["first_scale"] / best["second_scale"])


def test_search_prefix_scales_manual(searched, tiny_model):
    result, scales, _ = searched
    best = result.top_pairs[0]
    context, spike = best["context_id"], best["spike_id"]
    label = scales.site_layers[result.target_site][1]
    module_name = {"qkv_proj": "self_attn.q_proj", "o_proj": "self_attn.o_proj",
                   "gate_up_proj": "mlp.gate_proj", "down_proj": "mlp.down_proj"}[label]
    captured = []
    module = tiny_model.model.layers[result.target_layer].get_submodule(module_name)
    handle = module.register_forward_pre_hook(lambda _module, args: captured.append(args[0].clone()))
    try:
        full_logits(tiny_model, [BOS_ID, context, spike, context, spike])
    finally:
        handle.remove()
    token_scales = captured[0][0].abs().amax(dim=-1)
    assert best["first_scale"] == pytest.approx(float(token_scales[2]), rel=1e-5)
    assert best["second_scale"] == pytest.approx(float(token_scales[4]), rel=1e-5)
