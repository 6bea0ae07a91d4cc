"""One rank of a tensor- (and pipeline-) parallel run: load each checkpoint, record logits, greedy tokens and
shard shapes. Flags: --gloo, --quantize=TYPE, --pp=STAGES, --pp-split=A,B, --min-part-tokens=N (pipeline
micro-batches even for the few tokens tests use), --compile (compiled decode steps)."""
import os
import sys

import torch

from llama_dist import Llama, init_distributed
from llama_dist.runner import runner

PROMPTS = [[1, 5, 9, 200, 31, 7], [1, 17, 33]]


def flag(name: str, default: str | None) -> str | None:
    return next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{name}=")), default)


def main(out: str, tokenizer: str, *ckpts: str) -> None:
    """tokenizer "-": the one each model carries."""
    ctx = init_distributed("gloo" if "--gloo" in sys.argv else "auto", pp=int(flag("pp", "1")))
    if flag("min-part-tokens", None):
        runner.MIN_MICRO_BATCH_TOKENS = int(flag("min-part-tokens", None))
    if os.environ.get("LLAMA_DIST_TEST_FAIL_RANK") == str(ctx.rank):
        raise RuntimeError(f"injected failure on rank {ctx.rank}")
    if ckpts == ("PER_RANK",):  # each rank its own checkpoint, for the fingerprint test
        ckpts = (os.environ["LLAMA_DIST_TEST_CKPTS"].split(",")[ctx.rank],)
    results = {}
    for ckpt in ckpts:
        llama = Llama.build(ckpt, None if tokenizer == "-" else tokenizer, max_seq_len=64, max_batch_size=2, ctx=ctx,
                            quantize=flag("quantize", "none"), dtype="float32",  # quantized matmuls run in bf16
                            pp_split=flag("pp-split", None), compile="--compile" in sys.argv)
        vocab = llama.model.args.vocab_size
        tokens = (torch.arange(2 * 12).reshape(2, 12) * 37 + 3) % vocab
        logits = llama.runner.forward(tokens, 0)
        step_rows = set()  # rows per pipeline stage step: interleaved decoding runs one group of rows at a time
        stage_step = llama.runner.step
        llama.runner.step = lambda x, *a: step_rows.add(x.shape[0]) or stage_step(x, *a)
        greedy, _ = llama.generate(PROMPTS, max_gen_len=24, temperature=0.0)
        gaps = []  # top-2 logit gap at each greedy step: where it is tiny, rounding may pick either token
        for prompt, completion in zip(PROMPTS, greedy):
            seq_logits = llama.runner.forward(torch.tensor([prompt + completion]), 0)[0, len(prompt) - 1:-1]
            top = seq_logits.topk(2).values
            gaps.append((top[:, 0] - top[:, 1]).tolist())
        results[ckpt] = {"logits": logits, "greedy": greedy, "gaps": gaps, "step_rows": step_rows,
                         "shapes": {k: tuple(v.shape) for k, v in llama.model.state_dict().items()},
                         "weight_bytes": sum(t.nbytes for t in llama.model.state_dict().values())}
    torch.save(results, f"{out}.rank{ctx.rank}")


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--")])
