"""The one sampler: Meta's generate as a preset of llama.cpp's chain, and a batch's rows each by their own history."""
import torch

from llama_dist.generation.sampling import SamplingParams, final_probs, sample


def metas_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Meta's llama/generation.py: softmax at a temperature, then sample_top_p, as written there."""
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > top_p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token).squeeze(-1)


def test_meta_preset_draws_what_metas_generate_draws():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for seed in range(20):
        want = metas_sample(logits, 0.6, 0.9, torch.Generator().manual_seed(seed))
        got = sample(logits, SamplingParams.meta(0.6, 0.9), torch.Generator().manual_seed(seed))
        assert torch.equal(got, want), seed
    assert torch.equal(sample(logits, SamplingParams.meta(0.0)), logits.argmax(-1))


def test_a_batch_row_is_penalised_by_its_own_history_and_kept_to_its_own_top_k():
    logits = torch.ones(2, 10)
    logits[:, 3] = 2.0  # both rows' likeliest token, until a row's history penalises it (to 0.5)
    greedy = SamplingParams(temperature=0.0, repeat_penalty=4.0)
    assert sample(logits, greedy, histories=[[3], []]).tolist() == [0, 3]
    assert sample(logits, greedy, histories=[[], [3]]).tolist() == [3, 0]
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.5, top_k=3, top_p=1.0, min_p=0.0)
    g = torch.Generator().manual_seed(2)
    drawn = torch.stack([sample(logits, params, g) for _ in range(200)])  # [200, 3]
    for row in range(3):
        top3 = set(logits[row].topk(3).indices.tolist())
        assert set(drawn[:, row].tolist()) == top3  # all of them drawn, nothing else
        assert set(final_probs(logits[row], params, []).nonzero().flatten().tolist()) == top3


def test_penalties_are_llama_cpps():
    """Over the last repeat_last_n tokens of the history: a seen token's logit divided by repeat_penalty (multiplied
    where it is not positive), then frequency_penalty subtracted per occurrence and presence_penalty once; -1 counts
    the whole history, 0 none."""
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0,
                            frequency_penalty=0.25, presence_penalty=0.5, repeat_last_n=3)
    history = [3, 0, 1, 1]  # the window: 0 once, 1 twice (3 is outside it)
    want = torch.tensor([2.0 / 2 - 0.25 - 0.5, -1.0 * 2 - 2 * 0.25 - 0.5, 0.5, 3.0, 1.0])
    torch.testing.assert_close(final_probs(logits, params, history), torch.softmax(want, -1))
    whole = SamplingParams(**{**params.__dict__, "repeat_last_n": -1})
    want[3] = 3.0 / 2 - 0.25 - 0.5
    torch.testing.assert_close(final_probs(logits, whole, history), torch.softmax(want, -1))
    none = SamplingParams(**{**params.__dict__, "repeat_last_n": 0})
    assert not none.penalises()
    torch.testing.assert_close(final_probs(logits, none, history), torch.softmax(logits, -1))
