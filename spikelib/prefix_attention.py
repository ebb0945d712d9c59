"""Attention for a forward pass behind a QFeP prefix cache, without the cost of a full mask.

With ``P`` cached prefix tokens in front of ``L`` new ones, every new token attends to the whole
prefix and the new tokens before it. transformers passes that pattern to SDPA as an explicit
``L x (P + L)`` mask, so SDPA's CPU kernel computes every block of the score matrix. Without a
mask, its causal pass skips the blocks above the diagonal. With SmolLM2's shapes at 1,024 tokens
on 2 CPU threads, one layer's attention took 16.7 ms with the mask against 11.7 ms without, and
that was most of what a prefix cost in a prefill.

The ``spikelib_prefix`` attention implementation puts ``P`` zero queries in front of the ``L``
real ones and runs SDPA's causal kernel on the square ``(P + L) x (P + L)`` problem. Real query
``i`` then attends to keys ``0 .. P + i``, the prefix and the new tokens up to itself, which is
exactly the masked pattern. The ``P`` extra output rows are dropped. The output matches the masked one up
to float rounding. Any other mask, and features it does not handle (soft-capping, position bias,
attention weights), go to transformers' own SDPA function unchanged.

NOTE: the padded path is tested on CPU only. On CUDA it calls the same SDPA function with
``is_causal=True``, which has not been run on a GPU here.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "spikelib_prefix"

_last_mask: tuple[weakref.ref | None, int] = (None, -1)


def prefix_length(mask: torch.Tensor | None, query_length: int) -> int:
    """Return ``P`` when ``mask`` is a prefix plus causal pattern for every row, else ``-1``.

    The result is cached for the last mask object, because one forward pass passes the same
    mask to every layer.
    """
    global _last_mask
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4:
        return -1
    reference, length = _last_mask
    if reference is not None and reference() is mask:
        return length
    prefix = mask.shape[-1] - query_length
    length = -1
    if prefix > 0 and mask.shape[-2] == query_length:
        expected = torch.ones(query_length, mask.shape[-1], dtype=torch.bool, device=mask.device).tril(prefix)
        if torch.equal(mask, expected.expand_as(mask)):
            length = prefix
    _last_mask = (weakref.ref(mask), length)
    return length


def padded_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: int,
                            scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Return attention ``(batch, heads, L, dim)`` of ``L`` queries over ``prefix`` shared keys then ``L`` causal ones.

    ``key`` and ``value`` may have fewer heads than ``query`` (grouped-query attention).
    """
    batch, heads, _, dim = query.shape
    padded = torch.cat([query.new_zeros(batch, heads, prefix, dim), query], dim=2)
    output = F.scaled_dot_product_attention(padded, key, value, dropout_p=dropout, is_causal=True, scale=scale,
                                            enable_gqa=key.shape[1] != heads)
    return output[:, :, prefix:]


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs):
    """Attention function of the ``spikelib_prefix`` implementation (transformers' interface)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query_length = query.shape[2]
    plain = (query_length < 2 or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
             or kwargs.get("output_attentions"))
    prefix = -1 if plain else prefix_length(attention_mask, query_length)
    if prefix < 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = padded_causal_attention(query, key, value, prefix, scale, dropout)
    return output.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``spikelib_prefix`` with transformers (attention and mask) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, prefix_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_prefix_attention(model: nn.Module) -> nn.Module:
    """Switch ``model`` from SDPA to ``spikelib_prefix`` attention, in place, and return it.

    Models that do not use SDPA (eager attention, for example) are left as they are.
    """
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(register())
    return model
