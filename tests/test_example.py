"""examples/example.py end to end: torchrun with 2 ranks prints what one plain process prints."""
import subprocess
import sys

import pytest

from .helpers import ROOT, free_port


def completions(stdout: str) -> str:
    """Everything but the load report, which names the rank count and time."""
    return "\n".join(line for line in stdout.splitlines() if not line.startswith("Loaded "))


def run_example(launcher: list[str], ckpt, tokenizer, *extra: str) -> str:
    cmd = [*launcher, str(ROOT / "examples" / "example.py"), "--ckpt_dir", str(ckpt),
           "--tokenizer_path", str(tokenizer), "--max_gen_len", "16", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("temperature", ["0", "0.6"])
def test_torchrun_two_ranks_prints_what_one_process_prints(tiny_checkpoints, sp_tokenizer, temperature):
    one = run_example([sys.executable], tiny_checkpoints["mp2"], sp_tokenizer, "--temperature", temperature)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    two = run_example(torchrun, tiny_checkpoints["mp2"], sp_tokenizer, "--temperature", temperature)
    assert "on 1 rank(s) (none" in one and "on 2 rank(s) (gloo" in two
    assert completions(one) == completions(two)
    assert completions(one).count("==================================") == 4  # only rank 0 printed
    assert "I believe the meaning of life is\n> " in one
