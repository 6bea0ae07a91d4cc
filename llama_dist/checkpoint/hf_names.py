"""Hugging Face Llama parameter names and q/k row order, mapped to and from Meta's.

HF stores each head's q/k rows as [all real parts, all imaginary parts] (rotate-half RoPE);
Meta interleaves them in pairs. The permutation works head by head, so it applies to any
whole-head slice of a tensor-parallel shard as well as to the full weight.
"""
from __future__ import annotations

import re

import torch

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(meta_name: str) -> str:
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta_name)
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def hf_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF (half-split) q/k rows -> Meta's interleaved pairs, for any whole number of heads."""
    rows, cols = w.shape
    return w.reshape(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_hf(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's half-split order."""
    rows, cols = w.shape
    return w.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_permuted(meta_name: str) -> bool:
    return meta_name.endswith(("attention.wq.weight", "attention.wk.weight"))
