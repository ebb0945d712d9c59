"""Forward hooks that record token-wise input scales (Yang, Kim and Kim, 2024, arXiv:2405.14428, section 3).

For every decoder layer the recorder keeps, per token t, the scale a_t = max_j |x_tj| of the
input x of each linear module (siblings that share an input are recorded once) and of the
layer's output hidden state. Only these scales are kept, never whole activations, so memory
grows with the number of tokens and sites, not with the hidden size.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .architectures import HIDDEN_LABEL, Family, family_for, iter_sites, site_input_modules, site_modules, site_name


@dataclass
class TokenScales:
    """Recorded token-wise scales of one set of equal-length sequences.

    ``scales`` maps a site name (``model.layers.{i}.{label}``) to a float32 tensor of shape
    ``(n_sequences, seq_len)``; ``token_ids`` has the same shape. ``module_sites`` maps every
    quantizable linear module to the site of its input.
    """

    scales: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    module_sites: dict[str, str]
    site_layers: dict[str, tuple[int, str]]
    metadata: dict = field(default_factory=dict)

    def site_max(self) -> dict[str, float]:
        """Return the largest scale of each site over all recorded tokens."""
        return {site: float(values.max()) for site, values in self.scales.items()}

    def save(self, path: str | Path) -> None:
        """Save to a ``torch.save`` file, atomically."""
        from .artifacts import atomic_path

        payload = {
            "scales": self.scales,
            "token_ids": self.token_ids,
            "module_sites": self.module_sites,
            "site_layers": {site: list(value) for site, value in self.site_layers.items()},
            "metadata": self.metadata,
        }
        # torch.save names the archive's root folder after a file's name, which would be the random
        # temporary name; saving to a buffer names it "archive", so equal scales give equal bytes.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with atomic_path(path, ".pt") as temporary:
            temporary.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "TokenScales":
        """Load a file written by ``save``."""
        payload = torch.load(path, weights_only=True)
        site_layers = {site: (int(value[0]), str(value[1])) for site, value in payload["site_layers"].items()}
        return cls(payload["scales"], payload["token_ids"], payload["module_sites"], site_layers, payload["metadata"])


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the layers of interest have run."""


class _RowBuffer:
    """Equal-length rows appended into one preallocated float32 tensor that doubles when full.

    Keeping thousands of small per-pass tensors alive between the large temporaries of each
    forward pass fragments glibc's heap. Measured on SmolLM2-135M (CPU, 4 x 512 tokens a batch),
    resident memory then grew by about 500 MB per batch, so the rows go into one tensor instead.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.data: torch.Tensor | None = None
        self.rows = 0
        self.passes = 0

    def append(self, values: torch.Tensor) -> None:
        batch, length = values.shape
        if self.data is None:
            self.data = torch.empty(max(self.capacity, batch), length)
        elif length != self.data.shape[1]:
            raise ValueError(
                f"cannot record sequences of length {length} after sequences of length {self.data.shape[1]}. "
                "Record sequences of one length per recorder"
            )
        if self.rows + batch > self.data.shape[0]:
            grown = torch.empty(max(2 * self.data.shape[0], self.rows + batch), length)
            grown[: self.rows] = self.data[: self.rows]
            self.data = grown
        self.data[self.rows : self.rows + batch].copy_(values)
        self.rows += batch
        self.passes += 1

    def tensor(self) -> torch.Tensor:
        return self.data[: self.rows].clone()


class TokenScaleRecorder:
    """Hooks that append the token-wise scales of each forward pass; use ``record_token_scales``."""

    def __init__(self, model: nn.Module, family: Family, stop_after_layer: int | None = None, capacity: int = 64):
        self.model = model
        self.family = family
        self.stop_after_layer = stop_after_layer
        self.capacity = capacity
        self.records: dict[str, _RowBuffer] = {}
        self.site_layers: dict[str, tuple[int, str]] = {}
        self.module_sites: dict[str, str] = {}
        self._pass_shape: tuple[int, ...] = (-1,)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        family = self.family
        layer_sites: dict[int, list] = {}
        for index, layer, site, name in iter_sites(self.model, family):
            layer_sites.setdefault(index, []).append((layer, site, name))
        for index, entries in layer_sites.items():
            for layer, site, name in entries:
                self._track(name, index, site.label)
                for module in site_modules(self.model, family, site):
                    self.module_sites[f"{family.layers}.{index}.{module}"] = name
                if site.routed:
                    self._attach_routed(layer, site, name)
                else:
                    first = layer.get_submodule(site.modules[0])
                    self._handles.append(first.register_forward_pre_hook(self._input_hook(name)))

            hidden = site_name(family, index, HIDDEN_LABEL)
            self._track(hidden, index, HIDDEN_LABEL)
            layer = entries[0][0]
            self._handles.append(layer.register_forward_pre_hook(self._open_layer, with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._output_hook(hidden, index)))

    def _attach_routed(self, layer: nn.Module, site, name: str) -> None:
        """Record a routed site: each token's scale is the largest over the experts it was routed to.

        The block's pre-hook opens a zero scale per token position, each expert's hook puts
        its rows' scales back at their positions (``LinearExperts.current_tokens``), and the
        block's forward hook appends the per-token maxima.
        """
        experts = self.family.experts
        block = layer.get_submodule(experts.block)
        container = layer.get_submodule(experts.container)
        state: dict[str, torch.Tensor | tuple] = {}

        def open_pass(module, args):
            shape = args[0].shape[:-1]
            state["shape"] = shape
            state["scales"] = torch.zeros(shape.numel())

        def expert_input(module, args):
            rows = torch.linalg.vector_norm(args[0].detach(), ord=float("inf"), dim=-1).float().cpu()
            # Top-k routing picks k distinct experts, so a token appears at most once per expert.
            tokens = container.current_tokens.cpu()
            state["scales"][tokens] = torch.maximum(state["scales"][tokens], rows)

        def close_pass(module, args, output):
            self.records[name].append(state["scales"].reshape(-1, state["shape"][-1]))

        self._handles.append(block.register_forward_pre_hook(open_pass))
        for module in site_input_modules(self.model, self.family, site):
            self._handles.append(layer.get_submodule(module).register_forward_pre_hook(expert_input))
        self._handles.append(block.register_forward_hook(close_pass))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def scales(self) -> dict[str, torch.Tensor]:
        """Return each site's scales of all recorded passes, shape ``(n_sequences, seq_len)``."""
        return {site: buffer.tensor() for site, buffer in self.records.items() if buffer.rows}

    def passes(self) -> dict[str, int]:
        """Return how many forward passes each site has recorded."""
        return {site: buffer.passes for site, buffer in self.records.items()}

    def _track(self, name: str, index: int, label: str) -> None:
        self.records[name] = _RowBuffer(self.capacity)
        self.site_layers[name] = (index, label)

    def _append(self, name: str, activation: torch.Tensor) -> None:
        # (batch, seq, hidden) -> (batch, seq): a_t = max_j |x_tj|, without a full-size abs() copy.
        # Some layers (OPT's fc1 and fc2) see the tokens flattened to (batch * seq, hidden).
        scale = torch.linalg.vector_norm(activation.detach(), ord=float("inf"), dim=-1).float().cpu()
        self.records[name].append(scale.reshape(self._pass_shape))

    def _open_layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self._pass_shape = tuple(hidden.shape[:-1])

    def _input_hook(self, name: str):
        def hook(module, args):
            self._append(name, args[0])

        return hook

    def _output_hook(self, name: str, index: int):
        def hook(module, args, output):
            self._append(name, output[0] if isinstance(output, tuple) else output)
            if self.stop_after_layer is not None and index >= self.stop_after_layer:
                raise StopForward

        return hook


@contextlib.contextmanager
def record_token_scales(
    model: nn.Module, family: Family | None = None, stop_after_layer: int | None = None, capacity: int = 64
) -> Iterator[TokenScaleRecorder]:
    """Attach scale-recording hooks for the duration of the block; they are removed even on error.

    With ``stop_after_layer=k`` every forward pass raises ``StopForward`` right after layer k,
    so nothing beyond the layers of interest is computed; call ``forward_until`` to catch it.
    ``capacity`` is the number of sequences to preallocate for; more are accepted.
    """
    recorder = TokenScaleRecorder(model, family or family_for(model), stop_after_layer, capacity)
    recorder.attach()
    try:
        yield recorder
    finally:
        recorder.detach()


def forward_until(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Run a forward pass that a ``stop_after_layer`` recorder may end early."""
    try:
        model(input_ids=input_ids, use_cache=False)
    except StopForward:
        pass
