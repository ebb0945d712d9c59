"""Optional fake quantization of the attention matmul inputs (queries, keys and values).

W8A8 in spikelib quantizes the inputs of the linear layers only. Turning this switch on also
rounds Q, K and V to INT8 (per-tensor or per-token dynamic scales) right before the attention
matmuls, as an INT8 attention kernel would see them. Keys and values from a QFeP prefix cache are
part of K and V at that point, so they are quantized together with the window's.

It works through transformers' attention interface registry: the model's attention
implementation is switched to a registered function that quantizes its inputs and then calls
PyTorch's scaled dot-product attention path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .quantizers import absmax_to_scale, fake_quantize

IMPLEMENTATION = "spikelib_int8_qkv"
GRANULARITIES = ("per-tensor", "per-token")
_SETTING = "_spikelib_qkv_quantization"


def _quantize(x: torch.Tensor, n_bits: int, granularity: str) -> torch.Tensor:
    if granularity == "per-token":
        absmax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
    else:
        absmax = x.abs().amax()
    return fake_quantize(x, absmax_to_scale(absmax, n_bits), n_bits)


def _quantized_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    n_bits, granularity = getattr(module, _SETTING, (8, "per-tensor"))
    query = _quantize(query, n_bits, granularity)
    key = _quantize(key, n_bits, granularity)
    value = _quantize(value, n_bits, granularity)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _quantized_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def enable_attention_quantization(model: nn.Module, n_bits: int = 8, granularity: str = "per-tensor") -> nn.Module:
    """Quantize Q, K and V of every attention module of ``model`` (in place) and return the model.

    ``granularity`` is ``per-tensor`` (one dynamic scale per matrix and forward pass) or
    ``per-token`` (one dynamic scale per head and token).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"invalid attention granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    for module in model.modules():
        if hasattr(module, "layer_idx") and any(hasattr(module, name) for name in ("q_proj", "qkv_proj", "c_attn")):
            setattr(module, _SETTING, (n_bits, granularity))
    model.set_attn_implementation(IMPLEMENTATION)
    return model
