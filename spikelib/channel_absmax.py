"""Per-channel maxima of |x| at every linear input site, for SmoothQuant and static quantization.

Token-wise scales (``spikelib.hooks``) keep one number per token; SmoothQuant needs one number
per input channel instead, max_t |x_tj|, and static per-tensor quantization needs the maximum
over both. With a QFeP prefix the windows run after the prefix cache, so the prefix positions
never reach the hooks and are skipped by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from .architectures import family_for, iter_sites, site_input_modules, site_modules


@dataclass
class InputAbsmax:
    """Per-channel input maxima: ``channels`` maps a site name to a float32 tensor ``(in_features,)``."""

    channels: dict[str, torch.Tensor]
    module_sites: dict[str, str]
    n_tokens: int

    def module_absmax(self) -> dict[str, float]:
        """Return the per-tensor absmax of every linear module's input (its site's largest channel)."""
        return {module: float(self.channels[site].max()) for module, site in self.module_sites.items()}


@torch.no_grad()
def record_input_absmax(
    model: nn.Module,
    windows: torch.Tensor,
    prefix=None,
    batch_size: int = 4,
    progress: bool = True,
) -> InputAbsmax:
    """Run ``windows`` ``(n, seq_len)`` through ``model`` and return the per-channel input maxima.

    Without ``prefix`` each window runs as it is, with its start token, as in evaluation. With ``prefix`` (a ``PrefixCache`` of this model) each window runs one at a time after
    a fresh copy of the cache, so the windows should not start with their own start token.
    """
    family = family_for(model)
    device = next(model.parameters()).device
    channels: dict[str, torch.Tensor] = {}
    module_sites: dict[str, str] = {}
    handles = []

    def hook_for(name: str):
        def hook(module, args):
            values = torch.linalg.vector_norm(args[0].detach().flatten(0, -2), ord=float("inf"), dim=0).float().cpu()
            channels[name] = values if name not in channels else torch.maximum(channels[name], values)

        return hook

    for index, layer, site, name in iter_sites(model, family):
        for module in site_modules(model, family, site):
            module_sites[f"{family.layers}.{index}.{module}"] = name
        # A routed site's experts each see some tokens; the running maximum merges them.
        for module in site_input_modules(model, family, site):
            handles.append(layer.get_submodule(module).register_forward_pre_hook(hook_for(name)))

    step = 1 if prefix is not None else batch_size
    try:
        for batch in tqdm(windows.split(step), desc="channel maxima", unit="batch", disable=not progress):
            batch = batch.to(device)
            if prefix is None:
                model(input_ids=batch, use_cache=False)
            else:
                model(input_ids=batch, **prefix.forward_kwargs())
    finally:
        for handle in handles:
            handle.remove()
    return InputAbsmax(channels=channels, module_sites=module_sites, n_tokens=windows.numel())
