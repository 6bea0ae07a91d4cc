"""Find the checkpoint format at a path, and build a rank's model from it."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..distributed.context import ParallelContext
from ..model.transformer import KV_BLOCK, Transformer
from ..parallel.layers import ParallelEmbedding, ShardedWeight, VocabParallelEmbedding
from .. import csrc
from ..quant.ggml import BLOCK_TYPES
from ..quant.weights import QUANT_TYPES, QuantizedWeight, quantize_weight, quantized_from_shards
from .bundled import resolve_model
from .config import LoadConfig
from .gguf import GGUFCheckpoint
from .hf import HFCheckpoint
from .meta import MetaCheckpoint
from .shard import canonical_parts, param_layout, read_shard
from .source import CheckpointError, CheckpointSource

FORMATS_HELP = ("a Meta folder (params.json + consolidated.*.pth), a Hugging Face folder "
                "(config.json + *.safetensors) or a .gguf file")


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Find the format and validate (cheap: nothing but headers, indexes and metadata is read)."""
    path = Path(resolve_model(str(path)))
    if not path.exists():
        raise CheckpointError(f"Model path {path} does not exist. Pass {FORMATS_HELP}.")
    if path.is_file():
        return GGUFCheckpoint(path)  # says so clearly if the file is not GGUF
    if (path / "params.json").exists() or any(path.glob("*.pth")):
        return MetaCheckpoint(path)
    if (path / "config.json").exists() or any(path.glob("*.safetensors")):
        return HFCheckpoint(path)
    raise CheckpointError(f"Cannot tell the format of {path}: expected {FORMATS_HELP}.")


def describe(source: CheckpointSource) -> str:
    return {"meta": "Meta checkpoint", "hf": "Hugging Face safetensors", "gguf": "GGUF file"}.get(
        source.format, source.format)


def default_dtype(device: torch.device, quantized: bool = False) -> torch.dtype:
    """bf16 on GPUs that have it. On CPU fp32 (our block kernels quantize fp32 activations themselves, and
    fp32 element-wise code is faster than bf16 there); bf16 only for quantized weights that fall back to
    PyTorch's packed kernels, which run in bf16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if quantized and not csrc.available() else torch.float32


def quant_act_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """PyTorch's packed int8/int4 matmuls are fast with bf16 inputs on CPU and CUDA."""
    return torch.bfloat16 if device.type in ("cpu", "cuda") else dtype


def stores_quantized(source: CheckpointSource) -> bool:
    if isinstance(source, GGUFCheckpoint):  # any GGML block type
        return any(BLOCK_TYPES[t][0] > 1 for t in source.tensor_types() if t in BLOCK_TYPES)
    return bool(getattr(source, "quantization", None))


def load_model(source: CheckpointSource, ctx: ParallelContext, config: LoadConfig, layers: range | None = None,
               progress: bool = True) -> Transformer:
    """Create the model at shard size without memory, then fill each parameter with this rank's slice
    (of `layers` only, a pipeline stage's; default all), with a KV cache of config.kv_tokens (default
    config.max_batch_size sequences of config.n_ctx tokens).

    config.quantize: "auto" keeps weights as the checkpoint stores them (GGUF Q4_0/Q4_1/Q4_K blocks become
    int4 groups of 32 exactly, a quantized checkpoint stays quantized, the rest is dense); "none"
    makes everything dense; "int8"/"int4" quantize every weight (dequantized first if stored otherwise),
    after sharding.
    """
    args, quantize, group_size = source.args, config.quantize, config.group_size
    args.check_world_size(ctx.tp_size)
    quantized = quantize in QUANT_TYPES or (quantize == "auto" and stores_quantized(source))
    dtype = config.torch_dtype or default_dtype(ctx.device, quantized=quantized)
    with torch.device("meta"):
        model = Transformer(args, ctx.tp_comm, dtype=dtype, layers=layers)
    owners = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, ShardedWeight)}
    state = {}
    # a tied output is the embedding's vocab-split shard at any TP size: the same tensor serves both
    tied = getattr(source, "tied_output", False) and args.vocab_parallel_embedding
    names = [n for n, _ in model.named_parameters()]
    embedding = owners.get("tok_embeddings.weight")  # None on pipeline stages without it
    for name in tqdm(names, desc="loading", unit="tensor", disable=not (progress and ctx.is_driver)):
        owner = owners.get(name)
        if name == "output.weight" and tied and embedding is not None and embedding.qweight is not None:
            owner.set_quantized(embedding.qweight)  # one copy of the tied blocks
            continue
        if owner is not None and quantize != "none":
            qweight = _quantized_shard(source, name, owner, quantize, group_size,
                                       quant_act_dtype(ctx.device, dtype), ctx)
            if qweight is not None:
                owner.set_quantized(qweight)
                continue
        if name == "output.weight" and tied and "tok_embeddings.weight" in state:
            state[name] = state["tok_embeddings.weight"]  # one copy of the tied matrix, read once
            continue
        expected = model.get_parameter(name).shape
        tensor = read_shard(source, name, args, ctx.tp_size, ctx.tp_rank, ctx.device, dtype)
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{name}: the checkpoint gives shape {tuple(tensor.shape)} for rank {ctx.rank} "
                                  f"but the model expects {tuple(expected)}; the weights do not match the config.")
        state[name] = tensor.contiguous()
    missing, _ = model.load_state_dict(state, assign=True, strict=False)
    assert all(".qweight." in k for k in missing), missing  # quantized weights were set in place above
    model.setup_caches(config.max_batch_size, config.n_ctx, dtype, ctx.device,
                       None if config.kv_tokens is None else -(-config.kv_tokens // KV_BLOCK))
    return model.eval()


def _quantized_shard(source: CheckpointSource, name: str, owner: ShardedWeight, quantize: str, group_size: int,
                     act_dtype: torch.dtype, ctx: ParallelContext) -> QuantizedWeight | None:
    """This rank's slice of a linear or embedding weight, quantized; None keeps it dense.

    "auto" keeps what the checkpoint stores quantized (GGUF Q4 blocks, Q8_0 blocks where the CPU block kernels
    run, our quantized checkpoints); other GGML block types (Q6_K, ...), fused matrices of mixed types and 4-bit
    embedding tables become Q8_0 blocks there (QuantizedShard.as_q8_0), and elsewhere (GPUs), with Q8_0 too,
    int8 with a scale per row (as_int8), which the GPU kernels read;
    "int8"/"int4" quantize the (dequantized) weights after sharding. Embeddings are looked up by row, so they
    are only ever int8 (one scale per row, or GGUF Q8_0 blocks).
    """
    args, world, rank = source.args, ctx.tp_size, ctx.tp_rank
    is_embedding = isinstance(owner, (ParallelEmbedding, VocabParallelEmbedding))
    parts = canonical_parts(name)
    reader = getattr(source, "read_quantized", None) if quantize == "auto" else None
    stored = [reader(p, param_layout(p, args, world, rank)) for p in parts] if reader else [None]
    if all(s is not None for s in stored):
        kinds = {s.kind for s in stored}
        q8_0_kernel = ctx.device.type == "cpu" and csrc.available()
        four_bit = {"int4", "q4_1", "q4_0"}
        if len(kinds) > 1 and kinds <= four_bit:  # parts of one fused matrix in different 4-bit forms
            stored = [s.as_int4() if "int4" in kinds else s.as_q4_1() for s in stored]
        elif (len(kinds) > 1 or "ggml" in kinds or (is_embedding and kinds <= four_bit)
              or ("q8_0" in kinds and not q8_0_kernel)):
            stored = [s.as_q8_0() if q8_0_kernel else s.as_int8() for s in stored]
        # now one kind a kernel reads: Q8_0 only where the CPU block kernel runs, embeddings only in 8 bits
        return quantized_from_shards(stored, act_dtype, ctx.device)
    if quantize not in QUANT_TYPES:
        return None
    weight = read_shard(source, name, args, world, rank, ctx.device)
    return quantize_weight(weight, "int8" if is_embedding else quantize, group_size, act_dtype)


def weight_summary(model: Transformer) -> str:
    """', int4 weights' / ', int8 weights' / '' (dense) for the load report."""
    kinds = sorted({type(m.qweight).__name__.removesuffix("Weight").lower()
                    for m in model.modules() if isinstance(m, ShardedWeight) and m.qweight is not None})
    return f", {'+'.join(kinds)} weights" if kinds else ""
