"""The failure monitor's verdicts: a silent rank on another machine, a busy or an exited process on this one."""
import os
import subprocess
import sys
import time

import torch.distributed as dist

from llama_dist.distributed.monitor import FailureMonitor, machine_id


def test_verdicts_by_heartbeat_elsewhere_and_by_process_here():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    monitor = FailureMonitor(store, 0, 3, interval_s=3600, dead_after_s=0.5)  # its thread stays asleep
    try:
        finished = subprocess.Popen([sys.executable, "-c", "pass"])
        finished.wait()
        long_ago = time.monotonic() - 5
        store.set("heartbeat/1", "7")
        store.set("heartbeat/2", "7")

        def verdict(proc1: str, proc2: str) -> str | None:
            store.set("process/1", proc1)
            store.set("process/2", proc2)
            return monitor._check([1, 2], {1: ("7", long_ago), 2: ("7", long_ago)})

        here = machine_id()
        # both silent for 5 s: on this machine and running (a main thread stuck in a GPU wait) is not dead
        assert verdict(f"{here} {os.getpid()}", f"another-machine {finished.pid}") == (
            "rank 2 stopped responding (no heartbeat for 5 s): it was killed, ran out of memory, or its host is "
            "unreachable")
        assert verdict(f"{here} {os.getpid()}", f"{here} {finished.pid}").startswith("rank 2 died")
        assert verdict(f"{here} {os.getpid()}", f"{here} {os.getpid()}") is None
    finally:
        monitor.stop(clean=True)


def test_a_rank_that_left_on_a_shared_verdict_is_not_blamed(monkeypatch):
    """Rank 1 shares "rank 2 failed" and exits between this rank's two reads: the cause is reported, not rank 1."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    monitor = FailureMonitor(store, 0, 3, interval_s=3600)
    try:
        def rank_1_leaves(rank: int) -> bool:
            store.compare_set("verdict", "", "rank 2 failed: RuntimeError: boom")
            return False

        monkeypatch.setattr(monitor, "_process_alive", rank_1_leaves)
        now = time.monotonic()
        assert monitor._check([1, 2], {1: ("", now), 2: ("", now)}) == "rank 2 failed: RuntimeError: boom"
    finally:
        monitor.stop(clean=True)
