"""Symmetric round-to-nearest INT8 fake quantization of weights and activations.

Fake quantization rounds values to the integer grid and scales them back to floating point,
so accuracy studies run in ordinary float kernels. A b-bit symmetric quantizer maps x to
clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) * s with s = absmax / (2^(b-1) - 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .architectures import family_for, linear_module_sites

WEIGHT_GRANULARITIES = ("per-channel", "per-tensor")
ACTIVATION_GRANULARITIES = ("per-tensor", "per-token", "static")


def integer_range(n_bits: int) -> tuple[int, int]:
    """Return (qmin, qmax) of a signed ``n_bits`` integer."""
    return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1


def absmax_to_scale(absmax: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Return the step size s = absmax / qmax, raised to the smallest normal float for all-zero inputs."""
    _, qmax = integer_range(n_bits)
    return (absmax / qmax).clamp(min=torch.finfo(absmax.dtype).tiny)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Round ``x / scale`` to the nearest integer, clamp to the ``n_bits`` range, and scale back."""
    qmin, qmax = integer_range(n_bits)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def quantize_weight_per_channel_absmax(weight: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fake-quantize a ``(out_features, in_features)`` weight with one scale per output channel."""
    scale = absmax_to_scale(weight.abs().amax(dim=-1, keepdim=True), n_bits)
    return fake_quantize(weight, scale, n_bits)


def quantize_weight_per_tensor_absmax(weight: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fake-quantize a weight with one scale for the whole tensor."""
    return fake_quantize(weight, absmax_to_scale(weight.abs().amax(), n_bits), n_bits)


def quantize_activation_per_tensor_absmax(x: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fake-quantize an activation with one dynamic scale from the max |x| of the whole tensor."""
    return fake_quantize(x, absmax_to_scale(x.abs().amax(), n_bits), n_bits)


def quantize_activation_per_token_absmax(x: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fake-quantize an activation ``(..., hidden)`` with one dynamic scale per token."""
    return fake_quantize(x, absmax_to_scale(x.abs().amax(dim=-1, keepdim=True), n_bits), n_bits)


def quantize_activation_static(x: torch.Tensor, absmax: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fake-quantize an activation with a fixed calibrated absmax; larger values are clamped."""
    return fake_quantize(x, absmax_to_scale(absmax.to(x.dtype), n_bits), n_bits)


def is_conv1d(module: nn.Module) -> bool:
    """Return True for GPT-2's ``Conv1D``, a linear layer that stores its weight as ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Return the weight of an ``nn.Linear`` or ``Conv1D`` as ``(out_features, in_features)``."""
    return module.weight.t() if is_conv1d(module) else module.weight


def is_linear(module: nn.Module) -> bool:
    """Return True for the layers ``quantize_model`` replaces: ``nn.Linear`` (and subclasses) and ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class QuantConfig:
    """W8A8 setting: bit width and the weight and activation granularities.

    ``act_granularity`` is ``per-tensor`` (dynamic, the main setting of Yang, Kim and Kim, 2024), ``per-token``
    (dynamic) or ``static`` (per-tensor, from calibrated scales).
    """

    n_bits: int = 8
    weight_granularity: str = "per-channel"
    act_granularity: str = "per-tensor"

    def __post_init__(self):
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(
                f"invalid weight_granularity {self.weight_granularity!r}; choose one of {', '.join(WEIGHT_GRANULARITIES)}"
            )
        if self.act_granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(
                f"invalid act_granularity {self.act_granularity!r}; choose one of {', '.join(ACTIVATION_GRANULARITIES)}"
            )
        if not 2 <= self.n_bits <= 16:
            raise ValueError(f"invalid n_bits {self.n_bits}; choose a width from 2 to 16")


class FakeQuantLinear(nn.Module):
    """A linear layer with fake-quantized weights and (unless disabled) fake-quantized inputs.

    ``quantize_input`` is False for modules that QFeM keeps in full precision; their weights
    stay quantized.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: QuantConfig,
        static_absmax: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = config
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("static_absmax", static_absmax)
        self.quantize_input = True

    @classmethod
    def from_float(
        cls, linear: nn.Linear, config: QuantConfig, static_absmax: float | None = None
    ) -> "FakeQuantLinear":
        """Build the layer from a float ``nn.Linear`` or ``Conv1D``, quantizing its weight once."""
        if config.act_granularity == "static" and static_absmax is None:
            raise ValueError("static activation quantization needs a calibrated absmax for every module")
        weight = linear_weight(linear).detach().contiguous()
        if config.weight_granularity == "per-channel":
            weight = quantize_weight_per_channel_absmax(weight, config.n_bits)
        else:
            weight = quantize_weight_per_tensor_absmax(weight, config.n_bits)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        absmax = None if static_absmax is None else torch.tensor(float(static_absmax), dtype=weight.dtype)
        return cls(weight, bias, config, absmax)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        granularity = self.config.act_granularity
        if granularity == "per-tensor":
            return quantize_activation_per_tensor_absmax(x, self.config.n_bits)
        if granularity == "per-token":
            return quantize_activation_per_token_absmax(x, self.config.n_bits)
        return quantize_activation_static(x, self.static_absmax, self.config.n_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = self.quantize_activation(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        activation = self.config.act_granularity if self.quantize_input else "full precision"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.config.n_bits}, weight={self.config.weight_granularity}, activation={activation}"
        )


def quantize_model(
    model: nn.Module,
    config: QuantConfig = QuantConfig(),
    full_precision_inputs: Iterable[str] = (),
    static_absmax: dict[str, float] | None = None,
    inplace: bool = False,
    modules: Iterable[str] | None = None,
) -> nn.Module:
    """Return a W8A8 fake-quantized model: every linear layer of the decoder layers is replaced.

    Embeddings, norms and ``lm_head`` stay in full precision. ``full_precision_inputs`` names
    modules whose activations are not quantized (QFeM). ``static_absmax`` maps every module
    name to its calibrated input absmax, required for ``act_granularity="static"``.
    ``modules`` limits quantization (weights and activations) to the named decoder linear
    modules and leaves the others untouched in full precision; None quantizes all of them.
    """
    quantized = model if inplace else copy.deepcopy(model)
    decoder_linears = linear_module_sites(quantized, family_for(quantized))
    if modules is not None:
        modules = list(modules)
        unknown = sorted(set(modules) - decoder_linears.keys())
        if unknown:
            raise KeyError(f"not decoder linear modules of this model: {unknown[:5]}")
    else:
        modules = list(decoder_linears)
    for name in modules:
        linear = quantized.get_submodule(name)
        if not is_linear(linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, expected nn.Linear or Conv1D")
        absmax = None if static_absmax is None else static_absmax[name]
        parent_name, _, child = name.rpartition(".")
        setattr(quantized.get_submodule(parent_name), child, FakeQuantLinear.from_float(linear, config, absmax))
    set_full_precision_inputs(quantized, full_precision_inputs)
    return quantized


def set_full_precision_inputs(model: nn.Module, names: Iterable[str]) -> None:
    """Keep the inputs of the named quantized modules in full precision and quantize all others."""
    names = set(names)
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}
    unknown = names - quantized.keys()
    if unknown:
        raise KeyError(f"not quantized linear modules of this model: {sorted(unknown)[:5]}")
    for name, module in quantized.items():
        module.quantize_input = name not in names
