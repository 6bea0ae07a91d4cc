"""Hugging Face folders: config.json + model.safetensors (single, or sharded with an index).

Each rank reads its slice through safetensors' lazy slicing; q/k rows are turned from HF's
half-split rotary order into Meta's interleaved order, head by head, after slicing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..model.args import ModelArgs
from .hf_names import hf_name, hf_to_interleaved, interleaved_to_hf, rotary_permuted
from .shard import ShardLayout, param_names
from .source import CheckpointError, CheckpointSource, count_types

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def args_from_hf_config(config: dict[str, Any]) -> ModelArgs:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = {}
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    elif rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"rope scaling {rope} is not supported.")
    n_heads = config["num_attention_heads"]
    if config.get("head_dim", config["hidden_size"] // n_heads) != config["hidden_size"] // n_heads:
        raise CheckpointError(f"head_dim={config['head_dim']} differs from hidden_size/heads; not supported.")
    return ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=config.get("num_key_value_heads", n_heads), vocab_size=config["vocab_size"],
                     hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-5),
                     rope_theta=float(theta), rope_scaling=scaling,
                     max_seq_len=config.get("max_position_embeddings", 2048))


class HFCheckpoint:
    format = "hf"

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.path = Path(folder)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path} has no config.json; a Hugging Face model folder needs config.json "
                                  "beside its *.safetensors files.")
        self.config = json.loads(config_path.read_text())
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and self.config.get("model_type") != "llama":
            raise CheckpointError(f"{self.path} holds a {archs[0]} model; llama-dist runs Llama-architecture "
                                  f"models ({', '.join(SUPPORTED_ARCHITECTURES)}).")
        if self.config.get("sliding_window"):
            raise CheckpointError(f"{self.path} uses sliding-window attention, which llama-dist does not implement.")
        self.args = args_from_hf_config(self.config)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.path} has config.json but no model.safetensors or "
                                  "model.safetensors.index.json (PyTorch .bin weights: convert them to safetensors).")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles = {}
        for f in files:
            try:
                self.handles[f] = safe_open(str(self.path / f), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{self.path / f} is missing, truncated or not safetensors: {e}") from None
        self.where = weight_map or {k: files[0] for k in self.handles[files[0]].keys()}
        self.tied_output = "lm_head.weight" not in self.where
        self.aliases = {"lm_head.weight": "model.embed_tokens.weight"} if self.tied_output else {}
        if self.tied_output:
            self.where["lm_head.weight"] = self.where["model.embed_tokens.weight"]
            self.args.vocab_parallel_embedding = True  # the output then shares the embedding's shard
        missing = [n for n in param_names(self.args) if hf_name(n) not in self.where]
        if missing:
            raise CheckpointError(f"{self.path} lacks {len(missing)} weights config.json implies "
                                  f"(first: {hf_name(missing[0])}).")

    def tensor_types(self) -> dict[str, int]:
        return count_types(h.get_slice(k).get_dtype() for h in self.handles.values() for k in h.keys())

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        key = hf_name(name)
        key = self.aliases.get(key, key)
        sl = self.handles[self.where[key]].get_slice(key)
        if layout.dim is None or layout.parts == 1:
            tensor = sl[:]
        else:
            start, stop = layout.bounds(sl.get_shape()[layout.dim])
            tensor = sl[start:stop] if layout.dim == 0 else sl[:, start:stop]
        return hf_to_interleaved(tensor, self.args.head_dim) if rotary_permuted(name) else tensor


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
              "num_key_value_heads": args.n_kv_heads, "intermediate_size": args.hidden_dim,
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": str(dtype).removeprefix("torch.")}
    if args.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
    return config


def save_hf_checkpoint(source: CheckpointSource, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                       max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json and safetensors shards (with an index when there is more than one)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args, full = source.args, ShardLayout(None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in param_names(args):
        tensor = source.read(name, full).to(dtype)
        if rotary_permuted(name):
            tensor = interleaved_to_hf(tensor, args.head_dim)
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_name(name)] = tensor.contiguous().clone()
        size += tensor.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2))
    return out
