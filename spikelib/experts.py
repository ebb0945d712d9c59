"""Routed experts as ordinary linear layers, so that hooks and quantizers reach each expert.

transformers keeps the experts of a mixture-of-experts layer (Mixtral) as two stacked weights,
``gate_up_proj`` of shape ``(n_experts, 2 * intermediate, hidden)`` and ``down_proj`` of shape
``(n_experts, hidden, intermediate)``, applied with ``F.linear`` inside one forward method.
``LinearExperts`` keeps the same weights as one ``gate_proj``, ``up_proj`` and ``down_proj``
``nn.Linear`` per expert (views of the stacked tensors, no copy) and computes the same output.

While an expert runs, ``current_tokens`` holds the flat token positions routed to it, so that
hooks on its linear layers can put per-row statistics back at their token positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ExpertMLP(nn.Module):
    """One GLU expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return layer


class LinearExperts(nn.ModuleList):
    """Drop-in replacement for a stacked-weight experts module, called as ``(hidden, top_k_index, top_k_weights)``.

    Expert e's layers are named ``{e}.gate_proj``, ``{e}.up_proj`` and ``{e}.down_proj``.
    """

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.current_tokens: torch.Tensor | None = None

    @classmethod
    def from_stacked(cls, stacked: nn.Module) -> "LinearExperts":
        """Build from a module with ``gate_up_proj``, ``down_proj`` and ``act_fn`` (transformers' Mixtral layout)."""
        for attribute in ("gate_up_proj", "down_proj", "act_fn"):
            if not hasattr(stacked, attribute):
                raise TypeError(
                    f"{type(stacked).__name__} has no {attribute}; expected stacked expert weights as in "
                    "transformers' MixtralExperts. Describe this layout in spikelib.experts."
                )
        intermediate = stacked.gate_up_proj.shape[1] // 2
        experts = [
            ExpertMLP(
                stacked.gate_up_proj[e, :intermediate],
                stacked.gate_up_proj[e, intermediate:],
                stacked.down_proj[e],
                stacked.act_fn,
            )
            for e in range(stacked.gate_up_proj.shape[0])
        ]
        return cls(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        for expert_index, expert in enumerate(self):
            tokens, slot = torch.where(top_k_index == expert_index)
            if tokens.numel() == 0:
                continue
            self.current_tokens = tokens
            try:
                result = expert(hidden_states[tokens])
            finally:
                self.current_tokens = None
            output.index_add_(0, tokens, (result * top_k_weights[tokens, slot, None]).to(output.dtype))
        return output
