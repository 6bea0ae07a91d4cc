"""Choosing the next token from logits: one sampler, over a SamplingParams value (llama.cpp's chain by default,
Meta's generate as a preset)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.transformer import to_device


@dataclass
class SamplingParams:
    """llama.cpp's sampler settings; temperature 0 is greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0  # subtracted from a token's logit per time it occurs in the window
    presence_penalty: float = 0.0  # subtracted once from the logit of a token that occurs in the window
    repeat_last_n: int = 64  # the window: the history's last tokens the penalties count (-1: all, 0: none)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-inf: never)

    def penalises(self) -> bool:
        """Whether the history changes the logits (some penalty over a window that is not empty)."""
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                            or self.presence_penalty != 0.0)

    @classmethod
    def meta(cls, temperature: float = 0.6, top_p: float = 0.9) -> "SamplingParams":
        """Meta's generate: the logits at a temperature, then nucleus sampling; nothing else."""
        return cls(temperature=temperature, top_k=0, top_p=top_p, min_p=0.0)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           histories: list[list[int]] | None = None) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids, in llama.cpp's order: logit bias, penalties (over each row's
    history), top-k, temperature, min-p, top-p; temperature 0 is greedy."""
    logits = _biased(logits, params, histories)
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = _filtered(logits, params)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if params.top_p < 1.0:
        return sample_top_p(probs, params.top_p, generator)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [batch, vocab] (each summing to 1), the one torch.multinomial(probs, 1) draws from
    the same generator (its own method for one draw: an exponential race), without its check of the values, which
    reads one back to the host and so waits for the device."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability mass exceeds top_p."""
    probs_sorted, idx = probs.sort(dim=-1, descending=True)
    probs_sorted = probs_sorted.masked_fill(_outside_nucleus(probs_sorted, top_p), 0.0)
    choice = draw(probs_sorted / probs_sorted.sum(-1, keepdim=True), generator)
    return idx.gather(-1, choice[:, None]).squeeze(-1)


def _outside_nucleus(probs_sorted: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the descending probabilities fall outside the smallest set whose mass exceeds top_p."""
    return probs_sorted.cumsum(dim=-1) - probs_sorted > top_p


def final_probs(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """The distribution sample draws one row from [vocab] (summing to 1; greedy: all on the likeliest token),
    what llama.cpp reports as post-sampling probabilities."""
    logits = _biased(logits[None], params, [history])[0]
    if params.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    probs = _filtered(logits, params)
    probs = probs / probs.sum()
    if params.top_p < 1.0:  # the nucleus sample_top_p keeps
        ordered, idx = probs.sort(descending=True)
        probs = probs.scatter(0, idx[_outside_nucleus(ordered, params.top_p)], 0.0)
    return probs / probs.sum()


def _biased(logits: torch.Tensor, params: SamplingParams, histories: list[list[int]] | None) -> torch.Tensor:
    """The logits [batch, vocab] after the logit bias and each row's penalties over the last repeat_last_n tokens of
    its history, as llama.cpp applies them: a token seen there has its logit divided by repeat_penalty (multiplied,
    where it is not positive), then frequency_penalty subtracted per occurrence and presence_penalty once (a
    float copy)."""
    logits = logits.float().clone()
    if params.logit_bias:
        ids = to_device(list(params.logit_bias), logits.device)
        logits[:, ids] += to_device(list(params.logit_bias.values()), logits.device)
    if params.penalises() and histories:
        for row, history in zip(logits, histories):
            window = history if params.repeat_last_n < 0 else history[-params.repeat_last_n:]
            if window:
                seen, counts = torch.tensor(window, device=logits.device).unique(return_counts=True)
                picked = row[seen]
                picked = torch.where(picked > 0, picked / params.repeat_penalty, picked * params.repeat_penalty)
                row[seen] = picked - counts * params.frequency_penalty - params.presence_penalty
    return logits


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities (not normalised) after top-k, temperature and min-p, along the last dimension."""
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs
