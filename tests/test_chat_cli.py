"""The interactive chat, driven as a person would through a pseudo-terminal."""
import sys

import pytest

from .helpers import ROOT

pexpect = pytest.importorskip("pexpect")


def test_two_turns_ctrl_c_and_exit():
    child = pexpect.spawn(sys.executable, ["-m", "llama_dist.cli", "chat", "--model", "smollm2", "--temperature", "0",
                                           "--max_gen_len", "200"], cwd=str(ROOT), encoding="utf-8", timeout=120,
                          env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "TERM": "dumb"})
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
