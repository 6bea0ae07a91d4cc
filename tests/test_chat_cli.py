"""The interactive chat, driven as a person would through a pseudo-terminal."""
import signal
import sys

import pytest

from .helpers import ROOT

pexpect = pytest.importorskip("pexpect")


def test_two_turns_ctrl_c_and_exit():
    # (Ctrl-C's default action restored in the child: a test run started in the background of a script inherits
    # SIGINT ignored, and Python keeps an ignored SIGINT ignored, so the chat would never see the key)
    child = pexpect.spawn(sys.executable, ["-m", "llama_dist.cli", "chat", "--model", "smollm2", "--temperature", "0",
                                           "--max_gen_len", "200"], cwd=str(ROOT), encoding="utf-8", timeout=120,
                          env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("Chat with the model")
        child.expect("> ")
        # (asked "What is the capital of France?" under the default system prompt, SmolLM2 Q4_1 with 8-bit
        # activations answers "L'Etoile, ..." greedily, as llama.cpp does: its top two logits are 0.3 apart)
        child.sendline("Name the capital of France.")
        child.expect("Paris")
        child.expect("> ")
        child.sendline("And what is the capital of Germany?")  # the second turn sees the first
        child.expect("Berlin")
        child.expect("> ")
        child.sendline("Write a very long story about a dragon who learns to bake bread.")
        child.expect("bread.")  # the terminal's echo of the question
        child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_prompts_answered_by_the_engine_over_two_pipeline_ranks_as_metas_generate_answers_them():
    """`chat --prompt` (what `make run` calls) batches its prompts through the serving engine, here over two Gloo
    pipeline stages (rank 1 follows the engine): each answer is Meta-style generate's greedy answer in one process."""
    import json

    from llama_dist import Llama

    from .helpers import check_all_ok, launch_ranks

    prompts = ["Name the capital of France.", "What is 2+2?"]
    ranks = launch_ranks(2, ["-m", "llama_dist.cli", "chat", "--model", "smollm2", "--prompt", json.dumps(prompts),
                             "--max_gen_len", "24", "--backend", "gloo", "--pp", "2"])
    check_all_ok(ranks)
    llama = Llama.build("smollm2", max_seq_len=2048, max_batch_size=2)
    expected = llama.chat_completion([[{"role": "user", "content": p}] for p in prompts], temperature=0,
                                     max_gen_len=24)
    for p, r in zip(prompts, expected):
        assert f"> {p}\n{r['generation']['content']}\n" in ranks[0].stdout, (ranks[0].stdout, r)
    assert ">" not in ranks[1].stdout


def test_generate_command_prints_metas_greedy_completions():
    """`llama-dist generate` completes through the serving engine: prompt + the text Meta-style generate gives."""
    import json
    import subprocess

    from llama_dist import Llama

    prompts = ["The capital of France is", "I believe the meaning of life is"]
    out = subprocess.run([sys.executable, "-m", "llama_dist.cli", "generate", "--prompt", json.dumps(prompts),
                          "--temperature", "0", "--max_gen_len", "16"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    llama = Llama.build("smollm2", max_seq_len=512, max_batch_size=2)
    for p, r in zip(prompts, llama.text_completion(prompts, temperature=0, max_gen_len=16)):
        assert p + r["generation"] + "\n" in out.stdout, (out.stdout, r)
