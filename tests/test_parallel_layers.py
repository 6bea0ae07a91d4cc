"""Our model-parallel layers equal fairscale 0.4.13's at world sizes 2 and 4 on Gloo."""
import pytest
import torch
import torch.nn.functional as F

from .helpers import WORKERS, check_all_ok, launch_ranks

pytest.importorskip("fairscale")


@pytest.mark.parametrize("world", [2, 4])
def test_layers_equal_fairscale(world, tmp_path):
    out = tmp_path / "res"
    check_all_ok(launch_ranks(world, [str(WORKERS / "fairscale_worker.py"), str(out)]))
    reports = [torch.load(f"{out}.rank{r}") for r in range(world)]
    expected_names = {"column gather=True", "column gather=False", "row input_is_parallel=True",
                      "row input_is_parallel=False", "parallel embedding", "vocab parallel embedding"}
    assert set(reports[0]) == expected_names
    for rank, report in enumerate(reports):
        for name, r in report.items():
            assert r["max_diff"] < 1e-5, (rank, name, r["max_diff"])
    # Shard shapes: each rank holds 1/world of the split dimension, never the full weight.
    assert reports[0]["column gather=True"]["shape"] == (48 // world, 32)
    assert reports[0]["row input_is_parallel=True"]["shape"] == (32, 48 // world)
    assert reports[0]["parallel embedding"]["shape"] == (64, 32 // world)
    assert reports[0]["vocab parallel embedding"]["shape"] == (64 // world, 32)
    # Gathered outputs are full and identical on every rank.
    assert reports[0]["column gather=True"]["ours"].shape[-1] == 48
    for r in reports[1:]:
        assert torch.equal(r["vocab parallel embedding"]["ours"], reports[0]["vocab parallel embedding"]["ours"])


def test_single_process_layers_are_plain_torch():
    """With one rank the layers reduce to F.linear / F.embedding exactly."""
    from llama_dist.distributed.comm import Communicator
    from llama_dist.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    x = torch.randn(2, 8)
    col = ColumnParallelLinear(8, 4, Communicator())
    col.weight.data = torch.randn(4, 8)
    assert torch.equal(col(x), F.linear(x, col.weight))
    row = RowParallelLinear(8, 4, Communicator())
    row.weight.data = torch.randn(4, 8)
    assert torch.equal(row(x), F.linear(x, row.weight))
    emb = VocabParallelEmbedding(10, 3, Communicator())
    emb.weight.data = torch.randn(10, 3)
    ids = torch.tensor([[0, 9, 4]])
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
