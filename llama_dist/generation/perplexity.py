"""Perplexity in the style of llama.cpp's tool: non-overlapping windows, the second half of each scored."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .llama import Llama


def perplexity(llama: Llama, text: str, n_ctx: int = 512, progress: bool = True) -> dict:
    """Mean NLL over the scored tokens, exp() of it, and an error estimate (standard error of the mean).

    Each window of `n_ctx` tokens starts with BOS (when the model uses one) and is evaluated from an
    empty cache; only its second half is scored, so every scored token sees at least n_ctx/2 of context.
    """
    ids = llama.tokenizer.encode(text, bos=False) if llama.is_driver else None
    ids = llama.ctx.comm.broadcast_object(ids)
    if n_ctx > llama.model.n_ctx:
        raise ValueError(f"A window of {n_ctx} tokens exceeds the context the model was built with "
                         f"({llama.model.n_ctx}).")
    n_windows = len(ids) // n_ctx
    if n_windows == 0:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one window of {n_ctx}; give more text.")
    nll = []
    bar = tqdm(range(n_windows), desc="perplexity", disable=not (progress and llama.is_driver))
    for w in bar:
        window = torch.tensor(ids[w * n_ctx:(w + 1) * n_ctx], device=llama.ctx.device)
        if llama.tokenizer.add_bos:
            window[0] = llama.tokenizer.bos_id
        logits = llama.runner.forward(window[None], 0)[0]
        first = n_ctx // 2
        losses = F.cross_entropy(logits[first - 1:-1].float(), window[first:], reduction="none")
        nll.extend(losses.tolist())
        bar.set_postfix(ppl=f"{math.exp(sum(nll) / len(nll)):.4f}")
    mean = sum(nll) / len(nll)
    sem = (sum((x - mean) ** 2 for x in nll) / (len(nll) - 1)) ** 0.5 / len(nll) ** 0.5
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_error": ppl * sem, "mean_nll": mean, "scored_tokens": len(nll),
            "windows": n_windows, "n_ctx": n_ctx}
