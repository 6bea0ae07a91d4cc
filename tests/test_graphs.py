"""The decode step replayed from graphs captured at load (runner/graphs.py), on CPUs: a recorder that runs the
step again on the same static buffers stands in for the CUDA graph, so what is checked is everything around it:
the buckets, padding a batch by its last row, the windows, copying inputs in and outputs out."""
import pytest
import torch

from llama_dist.checkpoint.config import LoadConfig
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.model.args import ModelArgs
from llama_dist.runner.graphs import GraphedStep, batch_buckets, rerun, token_buckets

from .helpers import TINY_GQA, random_state_dict


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(13) == [1, 2, 4, 8, 13]
    assert batch_buckets(200)[-6:] == [96, 112, 128, 160, 192, 200]


def test_token_buckets():
    assert token_buckets(16) == [16]
    assert token_buckets(192) == [16, 32, 64, 128, 192]
    assert token_buckets(4096)[4:] == [256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]


def test_graphed_step_equals_the_eager_step():
    args = ModelArgs(**TINY_GQA)
    ctx = init_distributed(backend="gloo", device="cpu")
    config = LoadConfig(dtype="float32", quantize="none", n_ctx=300, max_batch_size=5)
    state = random_state_dict(args)
    eager, graphed = (load_model(StateDictSource(args, state), ctx, config, progress=False) for _ in range(2))
    step = GraphedStep(graphed, record=rerun)
    assert step.windows == [256, 300] and sorted({b for b, _ in step.graphs}) == [1, 2, 4, 5]
    g = torch.Generator().manual_seed(0)
    slots, starts = torch.tensor([4, 0, 2]), [250, 7, 30]  # rows in any cache slots, at their own positions
    for model in (eager, graphed):
        for slot, start in zip(slots.tolist(), starts):
            model(torch.randint(0, args.vocab_size, (1, start), generator=g.manual_seed(slot)), 0,
                  slots=torch.tensor([slot]))
    tokens = torch.tensor([[11], [12], [13]])
    for i in range(10):  # row 0 crosses from the 256 window into the 300 one
        positions = [s + i for s in starts]
        want = eager(tokens, torch.tensor(positions), slots, last_only=True)
        got = step(tokens, positions, slots)
        assert got.shape == want.shape == (3, 1, args.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tokens = want[:, -1].argmax(-1, keepdim=True)
    one = step(tokens[:1], starts[0] + 10, slots[:1])  # a lone row, one position for all: bucket 1
    torch.testing.assert_close(one, eager(tokens[:1], starts[0] + 10, slots[:1], last_only=True), rtol=1e-5, atol=1e-5)
    for layer in ("0", "1"):  # the padded rows wrote only what the last row wrote
        torch.testing.assert_close(graphed.layers[layer].attention.cached(slots, 300),
                                   eager.layers[layer].attention.cached(slots, 300), rtol=1e-5, atol=1e-5)
    # rows 0..2 without slots (the graph keeps them between such replays), the slots' rows between: each replay
    # reads and writes the rows asked for
    for i, rows in enumerate((None, None, slots, None)):
        want = eager(tokens, 40 + i, rows, last_only=True)
        torch.testing.assert_close(step(tokens, 40 + i, rows), want, rtol=1e-5, atol=1e-5)
    for layer in ("0", "1"):
        torch.testing.assert_close(graphed.layers[layer].attention.cached(torch.arange(5), 300),
                                   eager.layers[layer].attention.cached(torch.arange(5), 300), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="past the cache"):  # a replay would write there unchecked
        step(tokens, 300, slots)
