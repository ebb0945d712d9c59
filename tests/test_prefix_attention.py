"""The prefix-aware attention gives SDPA's masked output, and falls back to SDPA for other masks."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from conftest import BOS_ID
from spikelib import prefix_attention, qfep


def lower_right_mask(query_length: int, key_length: int, batch: int = 1) -> torch.Tensor:
    mask = torch.ones(query_length, key_length, dtype=torch.bool).tril(key_length - query_length)
    return mask.expand(batch, 1, query_length, key_length)


def test_padded_causal_attention_equals_masked_sdpa():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 9, 8, generator=generator)
    key, value = torch.randn(2, 2, 12, 8, generator=generator), torch.randn(2, 2, 12, 8, generator=generator)
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1),
                                              attn_mask=lower_right_mask(9, 12, 2), scale=0.3)
    output = prefix_attention.padded_causal_attention(query, key, value, prefix=3, scale=0.3)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


def test_prefix_length_recognises_only_the_prefix_pattern():
    assert prefix_attention.prefix_length(lower_right_mask(6, 9), 6) == 3
    assert prefix_attention.prefix_length(None, 6) == -1
    padded = lower_right_mask(6, 9).clone()
    padded[..., 0] = False  # a padded first key: not the plain prefix pattern
    assert prefix_attention.prefix_length(padded, 6) == -1
    square = lower_right_mask(6, 6)
    assert prefix_attention.prefix_length(square, 6) == -1
    float_mask = torch.zeros(1, 1, 6, 9)
    assert prefix_attention.prefix_length(float_mask, 6) == -1


def test_model_output_unchanged_behind_a_prefix(tiny_model):
    fast = prefix_attention.use_prefix_attention(copy.deepcopy(tiny_model))
    assert fast.config._attn_implementation == prefix_attention.NAME
    cache = qfep.PrefixCache(tiny_model, [BOS_ID, 9, 17])
    ids = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, **cache.forward_kwargs()).logits
        output = fast(input_ids=ids, **cache.forward_kwargs()).logits
        plain_expected = tiny_model(input_ids=ids).logits
        plain_output = fast(input_ids=ids).logits
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain_output, plain_expected, rtol=1e-5, atol=1e-6)


def test_padded_batch_falls_back_to_sdpa(tiny_model):
    fast = prefix_attention.use_prefix_attention(copy.deepcopy(tiny_model))
    ids = torch.randint(4, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, attention_mask=mask).logits
        output = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(output[:, 3:], expected[:, 3:], rtol=1e-5, atol=1e-6)


def test_eager_model_left_alone(tiny_model):
    tiny_model.set_attn_implementation("eager")
    prefix_attention.use_prefix_attention(tiny_model)
    assert tiny_model.config._attn_implementation == "eager"
