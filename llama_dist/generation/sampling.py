"""Choosing the next token from logits."""
from __future__ import annotations

import torch


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability mass exceeds top_p."""
    probs_sorted, idx = probs.sort(dim=-1, descending=True)
    outside = probs_sorted.cumsum(dim=-1) - probs_sorted > top_p
    probs_sorted = probs_sorted.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs_sorted / probs_sorted.sum(-1, keepdim=True), 1, generator=generator)
    return idx.gather(-1, choice).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
