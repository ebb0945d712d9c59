"""Real INT8 execution of a W8A8 configuration: int8 weights, int8 activations, int32 products.

``Int8Linear`` stores its weight as int8 with one float scale per output channel. Its forward
pass quantizes the input to int8 (one dynamic scale per tensor or per token), multiplies it by
the int8 weight with ``torch._int_mm`` into int32, and rescales the result:

    y = (q(x) @ q(W)^T) * s_x * s_w + b

which is exactly what the fake-quantized layer computes, up to float rounding. Modules that QFeM
keeps in full precision multiply the float input by the de-quantized weight instead.

``torch._int_mm`` runs on CPU for any shapes. On CUDA it needs more than 16 rows and both other
dimensions divisible by 8. Other shapes fall back to float32 matmuls over blocks of 1,024 inner
columns, each exact, summed in int32. The first fallback per shape is logged.

NOTE: the CUDA shape rules above are unverified here: no GPU has run this path, and the tests
check ``int_mm_supported`` only against those stated values.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import FakeQuantLinear, absmax_to_scale, integer_range

logger = logging.getLogger(__name__)

GRANULARITIES = ("per-tensor", "per-token")


def quantize_int8(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(int8 values, float32 scale)`` of a 2-D activation, the scale per tensor or per row.

    The values equal the fake quantizer's ``clamp(round(x / scale))``. The maximum comes from
    the minimum and maximum, and the rounding runs in place, so the only temporary is one float
    copy of ``x``.
    """
    qmin, qmax = integer_range(8)
    if granularity == "per-tensor":
        low, high = torch.aminmax(x)
    elif granularity == "per-token":  # two reductions: aminmax along a dimension was slower on CPU
        low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"invalid activation granularity {granularity!r} for INT8 execution; choose one of {', '.join(GRANULARITIES)}")
    scale = absmax_to_scale(torch.maximum(-low, high).float(), 8)
    values = torch.div(x.float(), scale).round_().clamp_(qmin, qmax)
    return values.to(torch.int8), scale


def int_mm_supported(rows: int, inner: int, columns: int, device: torch.device) -> bool:
    """Return whether ``torch._int_mm`` accepts an ``(rows, inner) x (inner, columns)`` product on ``device``."""
    if device.type != "cuda":
        return True
    return rows > 16 and inner % 8 == 0 and columns % 8 == 0


_warned_fallback: set[tuple] = set()


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the int32 product of int8 ``a (m, k)`` and ``b (k, n)``."""
    if int_mm_supported(a.shape[0], a.shape[1], b.shape[1], a.device):
        return torch._int_mm(a, b)
    key = (a.device.type, a.shape[1], b.shape[1])
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        logger.warning("torch._int_mm cannot multiply %s x %s on %s; using exact float32 products of %d-column blocks instead",
                       tuple(a.shape), tuple(b.shape), a.device, EXACT_BLOCK)
    return exact_float_matmul(a, b)


# A product of two int8 values is at most 128 * 128 = 2^14 in magnitude, so a float32 sum of up
# to 2^10 of them stays within 2^24, where float32 still represents every integer exactly.
EXACT_BLOCK = 1024


def exact_float_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the int32 product of int8 ``a`` and ``b`` through float32 matmuls over blocks of the inner dimension."""
    total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for start in range(0, a.shape[1], EXACT_BLOCK):
        block = a[:, start:start + EXACT_BLOCK].float() @ b[start:start + EXACT_BLOCK].float()
        total += block.to(torch.int32)
    return total


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (per-channel scales) and int8 dynamic activations."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 granularity: str = "per-tensor"):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"invalid activation granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.granularity = granularity
        self.quantize_input = True

    @classmethod
    def from_fake(cls, layer: FakeQuantLinear) -> "Int8Linear":
        """Recover the int8 weight of a per-channel fake-quantized layer, whose weight already lies on the grid."""
        config = layer.config
        if config.n_bits != 8 or config.weight_granularity != "per-channel":
            raise ValueError(f"INT8 execution needs 8-bit per-channel weights, got {config.n_bits}-bit {config.weight_granularity}")
        if config.act_granularity not in GRANULARITIES:
            raise ValueError(f"INT8 execution supports dynamic {' and '.join(GRANULARITIES)} activations, "
                             f"not {config.act_granularity}")
        weight = layer.weight.float()
        scale = absmax_to_scale(weight.abs().amax(dim=-1, keepdim=True), 8)
        weight_int8 = torch.round(weight / scale).clamp(*integer_range(8)).to(torch.int8)
        bias = None if layer.bias is None else layer.bias.clone()
        converted = cls(weight_int8, scale.flatten(), bias, config.act_granularity)
        converted.quantize_input = layer.quantize_input
        return converted

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Return the weight as ``dtype``: int8 values times their channel scales."""
        return (self.weight_int8.to(dtype) * self.weight_scale[:, None].to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_input:
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        rows = x.reshape(-1, self.in_features)
        values, scale = quantize_int8(rows, self.granularity)
        product = int8_matmul(values, self.weight_int8.t())
        # One pass over the int32 product where the scale is per tensor; per token, a second in place.
        if scale.dim() == 0:
            output = torch.mul(product, scale * self.weight_scale)
        else:
            output = torch.mul(product, self.weight_scale).mul_(scale)
        if self.bias is not None:
            output.add_(self.bias.float())
        return output.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        activation = self.granularity if self.quantize_input else "full precision"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, activation={activation}"


def to_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the model with every ``FakeQuantLinear`` replaced by an ``Int8Linear`` computing the same function.

    ``model`` is a fake-quantized model from ``spikelib.quantizers.quantize_model`` or a
    configuration built by ``spikelib.methods.ConfigurationBuilder``; QFeM's full-precision
    modules keep full-precision activations, and a QFeP prefix cache works unchanged.
    """
    converted = model if inplace else copy.deepcopy(model)
    names = [name for name, module in converted.named_modules() if isinstance(module, FakeQuantLinear)]
    if not names:
        raise ValueError("the model has no fake-quantized layers; build it with spikelib.quantizers.quantize_model first")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = converted.get_submodule(parent) if parent else converted
        setattr(owner, child, Int8Linear.from_fake(converted.get_submodule(name)))
    return converted


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Return the bytes a tensor stores; for tensor subclasses (torchao's int8 weights) the sum of their parts."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def linear_weight_bytes(model: nn.Module, decoder_only: bool = True) -> dict[str, int]:
    """Return the bytes of linear-layer weights by storage: ``int8``, ``scales`` and ``float``.

    With ``decoder_only`` only the decoder layers count, not the output head. A torchao int8
    weight counts as ``int8``, its scales included.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    from .architectures import decoder_layers, family_for

    root = decoder_layers(model, family_for(model)) if decoder_only else model
    sizes = {"int8": 0, "scales": 0, "float": 0}
    for module in root.modules():
        if isinstance(module, Int8Linear):
            sizes["int8"] += module.weight_int8.numel() * module.weight_int8.element_size()
            sizes["scales"] += module.weight_scale.numel() * module.weight_scale.element_size()
        elif isinstance(module, (nn.Linear, FakeQuantLinear)):
            if is_traceable_wrapper_subclass(module.weight):  # torchao's int8 weight: values and scales
                sizes["int8"] += tensor_bytes(module.weight)
            else:
                sizes["float"] += module.weight.numel() * module.weight.element_size()
    return sizes
