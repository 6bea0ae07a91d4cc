"""Choosing the next token from logits."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability mass exceeds top_p."""
    probs_sorted, idx = probs.sort(dim=-1, descending=True)
    probs_sorted = probs_sorted.masked_fill(_outside_nucleus(probs_sorted, top_p), 0.0)
    choice = torch.multinomial(probs_sorted / probs_sorted.sum(-1, keepdim=True), 1, generator=generator)
    return idx.gather(-1, choice).squeeze(-1)


def _outside_nucleus(probs_sorted: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the descending probabilities fall outside the smallest set whose mass exceeds top_p."""
    return probs_sorted.cumsum(dim=-1) - probs_sorted > top_p


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)


@dataclass
class SamplingParams:
    """llama.cpp's sampler settings; temperature 0 is greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-inf: never)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               history: list[int]) -> int:
    """One token from one row of logits [vocab], in llama.cpp's order: logit bias, penalty, top-k, min-p, top-p,
    temperature."""
    logits = _biased(logits, params, history)
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = _filtered(logits, params)
    if params.top_p < 1.0:
        return int(sample_top_p(probs[None] / probs.sum(), params.top_p, generator)[0])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def final_probs(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """The distribution sample_row draws from [vocab] (summing to 1; greedy: all on the likeliest token), what
    llama.cpp reports as post-sampling probabilities."""
    logits = _biased(logits, params, history)
    if params.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    probs = _filtered(logits, params)
    probs = probs / probs.sum()
    if params.top_p < 1.0:  # the nucleus sample_top_p keeps
        ordered, idx = probs.sort(descending=True)
        probs = probs.scatter(0, idx[_outside_nucleus(ordered, params.top_p)], 0.0)
    return probs / probs.sum()


def _biased(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """The logits after the logit bias and the repeat penalty (a float copy)."""
    logits = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    if params.repeat_penalty != 1.0 and history:
        recent = torch.tensor(history[-params.repeat_last_n:], device=logits.device).unique()
        picked = logits[recent]
        logits[recent] = torch.where(picked > 0, picked / params.repeat_penalty, picked * params.repeat_penalty)
    return logits


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities (not normalised) after top-k, temperature and min-p."""
    if 0 < params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs
