"""Windowed perplexity on WikiText-2 with a BOS token or a QFeP prefix cache before each window.

Protocol: the test text is tokenized without special tokens and cut into non-overlapping
windows of L tokens (the remainder is dropped). Each window is preceded by the start token or
by the prefix cache, and every one of its L tokens is scored, so every configuration scores
the same tokens. With a prefix, the first token is scored from the full-precision logits at
the prefix's last position, since the prefix itself is computed in full precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class PerplexityResult:
    """Perplexity over the scored tokens and their count."""

    ppl: float
    n_tokens: int
    nll_sum: float
    n_windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_windows(token_ids: list[int], seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Cut token ids into non-overlapping windows of ``seq_len``; keep the first ``n_windows``.

    Returns ``(n, seq_len)``.
    """
    available = len(token_ids) // seq_len
    if available == 0:
        raise ValueError(f"only {len(token_ids)} tokens, fewer than one window of {seq_len}")
    count = available if n_windows is None else min(n_windows, available)
    return torch.tensor(token_ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


@torch.no_grad()
def window_logits(model: nn.Module, window: torch.Tensor, start_token_id: int | None = None, prefix=None) -> torch.Tensor:
    """Return the float32 logits that predict each token of ``window`` ``(seq_len,)``, shape ``(seq_len, vocab)``.

    Exactly one of ``start_token_id`` and ``prefix`` (a ``PrefixCache``) must be given.
    """
    if (start_token_id is None) == (prefix is None):
        raise ValueError("give exactly one of start_token_id and prefix")
    device = next(model.parameters()).device
    window = window.to(device)
    if prefix is None:
        input_ids = torch.cat([window.new_tensor([start_token_id]), window])[None, :]
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]
        return logits.float()

    output = model(input_ids=window[None, :], **prefix.forward_kwargs())
    return torch.cat([prefix.last_logits.to(device), output.logits[0, :-1].float()], dim=0)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    start_token_id: int | None = None,
    prefix=None,
    progress: bool = True,
    description: str = "perplexity",
) -> PerplexityResult:
    """Return the perplexity of ``model`` over every token of every window ``(n, seq_len)``."""
    nll_sum = 0.0
    n_tokens = 0
    for window in tqdm(windows, desc=description, unit="window", disable=not progress):
        logits = window_logits(model, window, start_token_id, prefix)
        targets = window.to(logits.device)
        nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        n_tokens += targets.numel()
    return PerplexityResult(ppl=math.exp(nll_sum / n_tokens), n_tokens=n_tokens, nll_sum=nll_sum, n_windows=len(windows))
