"""SmoothQuant (Xiao et al., 2023, arXiv:2211.10438) as the outlier-alleviation baseline.

For an input site whose input comes straight from a normalization layer (q/k/v, gate/up), each
input channel j gets a smoothing factor

    s_j = max_t |X_tj| ** alpha / max_i |W_ij| ** (1 - alpha)

where the weight maximum runs over the output rows of every sibling module. The activation is
divided by s and the weight columns are multiplied by it, so X W^T is unchanged, and the
division is folded into the norm that produces X. Alpha is the migration strength: 0 leaves the
activations alone, 1 moves all of their range into the weights. Sites with no norm in front of
them (o_proj, down_proj) are not smoothed, so the down_proj spikes stay where they are.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .architectures import family_for, iter_sites
from .quantizers import is_conv1d, linear_weight
from .channel_absmax import InputAbsmax

# Smallest smoothing factor; channels that never activate would otherwise get s = 0.
MIN_FACTOR = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return s = act_absmax**alpha / weight_absmax**(1 - alpha), per input channel, at least ``MIN_FACTOR``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"invalid migration strength alpha={alpha}; choose a value from 0 to 1")
    act = act_absmax.double().clamp(min=MIN_FACTOR)
    weight = weight_absmax.double().clamp(min=MIN_FACTOR)
    return (act.pow(alpha) / weight.pow(1.0 - alpha)).clamp(min=MIN_FACTOR)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: list[nn.Linear], factors: torch.Tensor, norm_offset: float) -> None:
    """Divide the norm's output channels by ``factors`` and multiply the linears' input columns by them.

    A norm computes ``(w + norm_offset) * normalize(x) (+ b)``; its new weight is
    ``(w + norm_offset) / s - norm_offset`` and its bias, if any, ``b / s``.
    """
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"cannot fold smoothing factors into {type(norm).__name__}: it has no weight")
    new_weight = (weight.double() + norm_offset) / factors - norm_offset
    weight.copy_(new_weight.to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.copy_((bias.double() / factors).to(bias.dtype))
    for linear in linears:
        # nn.Linear stores (out, in) and multiplies columns; GPT-2's Conv1D stores (in, out) and multiplies rows.
        scale = factors if not is_conv1d(linear) else factors[:, None]
        linear.weight.copy_((linear.weight.double() * scale).to(linear.weight.dtype))


@torch.no_grad()
def smooth_model(model: nn.Module, absmax: InputAbsmax, alpha: float = 0.5, inplace: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Return the smoothed model and the factors of each smoothed site.

    ``absmax`` must come from ``record_input_absmax`` on this (unsmoothed) model. The smoothed
    model computes the same function in exact arithmetic; quantize it afterwards.
    """
    smoothed = model if inplace else copy.deepcopy(model)
    family = family_for(smoothed)
    factors: dict[str, torch.Tensor] = {}
    for _, layer, site, name in iter_sites(smoothed, family):
        if site.norm is None:
            continue
        if name not in absmax.channels:
            raise KeyError(f"no calibrated channel maxima for {name}; record them on this model first")
        linears = [layer.get_submodule(module) for module in site.modules]
        weight_absmax = torch.stack([linear_weight(linear).abs().amax(dim=0).double() for linear in linears]).amax(dim=0)
        site_factors = smoothing_factors(absmax.channels[name], weight_absmax, alpha)
        fold_into_norm(layer.get_submodule(site.norm), linears, site_factors, family.norm_offset)
        factors[name] = site_factors.float()
    return smoothed, factors
