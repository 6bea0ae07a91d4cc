"""One rank: our model-parallel layers against fairscale 0.4.13's, same full weights and inputs."""
import os
import sys

import torch

from llama_dist import init_distributed
from llama_dist.parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def main(out: str) -> None:
    ctx = init_distributed("gloo")
    from fairscale.nn.model_parallel import initialize_model_parallel
    from fairscale.nn.model_parallel import layers as fs

    initialize_model_parallel(ctx.world_size)
    torch.manual_seed(0)  # every rank draws the same full weights and inputs
    d_in, d_out, vocab = 32, 48, 64
    x = torch.randn(3, 5, d_in)
    ids = torch.randint(0, vocab, (3, 5))
    weights = {"col": torch.randn(d_out, d_in), "row": torch.randn(d_out, d_in), "bias": torch.randn(d_out),
               "emb": torch.randn(vocab, d_in)}
    report = {}

    def compare(name, ours, theirs, inp, weight, bias=None):
        # Give fairscale's layer the same slice we loaded, by copying our shard into it.
        assert tuple(ours.weight.shape) == tuple(theirs.weight.shape), (name, ours.weight.shape, theirs.weight.shape)
        with torch.no_grad():
            theirs.weight.copy_(ours.weight)
            if bias is not None:
                theirs.bias.copy_(ours.bias)
            report[name] = {"shape": tuple(ours.weight.shape),
                            "max_diff": (ours(inp) - theirs(inp)).abs().max().item(),
                            "ours": ours(inp)}

    r, w = ctx.rank, ctx.world_size
    for gather in (True, False):
        ours = ColumnParallelLinear(d_in, d_out, ctx.comm, gather_output=gather)
        ours.weight.data = weights["col"].chunk(w, 0)[r].clone()
        compare(f"column gather={gather}", ours,
                fs.ColumnParallelLinear(d_in, d_out, bias=False, gather_output=gather), x, weights["col"])
    for parallel_in in (True, False):
        ours = RowParallelLinear(d_out, d_in, ctx.comm, bias=True, input_is_parallel=parallel_in)
        ours.weight.data = weights["row"].t().chunk(w, 1)[r].clone()
        ours.bias.data = weights["bias"][:d_in].clone()
        inp = torch.randn(3, 5, d_out)
        inp = inp.chunk(w, -1)[r] if parallel_in else inp
        compare(f"row input_is_parallel={parallel_in}", ours,
                fs.RowParallelLinear(d_out, d_in, bias=True, input_is_parallel=parallel_in), inp, None, bias=True)
    ours = ParallelEmbedding(vocab, d_in, ctx.comm)
    ours.weight.data = weights["emb"].chunk(w, 1)[r].clone()
    compare("parallel embedding", ours, fs.ParallelEmbedding(vocab, d_in), ids, None)
    ours = VocabParallelEmbedding(vocab, d_in, ctx.comm)
    ours.weight.data = weights["emb"].chunk(w, 0)[r].clone()
    compare("vocab parallel embedding", ours, fs.VocabParallelEmbedding(vocab, d_in), ids, None)
    torch.save(report, f"{out}.rank{r}")
    ctx.shutdown()  # leave together, so no rank outlives the rendezvous store on rank 0
    sys.stdout.flush()
    os._exit(0)  # fairscale's process groups abort the interpreter at normal exit


if __name__ == "__main__":
    main(sys.argv[1])
