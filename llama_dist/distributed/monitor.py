"""No hang without a word: ranks heartbeat through the rendezvous store and watch each other.

A rank that raises reports its error to the store before exiting; a rank that is killed stops
heartbeating. Every other rank's monitor thread notices within `dead_after_s`, prints which rank
failed and why, and exits the process non-zero, whatever the main thread was blocked in
(a collective, a compiled graph, NCCL). Clean shutdown is marked so that it is not mistaken
for a death. A rank on the same host is judged by its process instead: its heartbeat thread can
starve for minutes while its main thread holds the interpreter lock in a GPU wait (a pipeline
stage waiting on a stage that is still compiling), and a process that exited is seen at once.
"""
from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import time

import torch.distributed as dist


class FailureMonitor:
    def __init__(self, store: dist.Store, rank: int, world_size: int, interval_s: float = 1.0,
                 dead_after_s: float = 10.0):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval_s, self.dead_after_s = interval_s, dead_after_s
        self.stopped = threading.Event()
        self.beats = 0
        store.set(f"process/{rank}", f"{machine_id()} {os.getpid()}")
        self.thread = threading.Thread(target=self._run, name="llama-dist-monitor", daemon=True)
        self.thread.start()

    def report_error(self, exc: BaseException) -> None:
        """Tell the other ranks why this one is about to exit."""
        try:
            self.store.set(f"error/{self.rank}", f"{type(exc).__name__}: {exc}"[:2000])
        except Exception:
            pass

    def await_verdict(self, error: BaseException) -> None:
        """A collective failed: give the monitor time to find the rank responsible (it exits the process)."""
        self.stopped.wait(self.dead_after_s + 3 * self.interval_s)

    def stop(self, clean: bool) -> None:
        if clean:
            try:
                self.store.set(f"done/{self.rank}", "1")
            except Exception:
                pass
        self.stopped.set()
        self.thread.join(timeout=2 * self.interval_s)

    def _run(self) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        last_seen = {r: ("", time.monotonic()) for r in others}
        while not self.stopped.wait(self.interval_s):
            try:
                self.beats += 1
                self.store.set(f"heartbeat/{self.rank}", str(self.beats))
                problem = self._check(others, last_seen)
            except Exception as e:  # the store lives on rank 0: losing it means losing rank 0
                if self.stopped.is_set():
                    return
                problem = (f"lost contact with rank 0 (the driver, which hosts the rendezvous store): it died or "
                           f"was killed ({type(e).__name__})")
            if problem:
                self._abort(problem)

    def _check(self, others: list[int], last_seen: dict[int, tuple[str, float]]) -> str | None:
        reported = self._reported(others)
        if reported:
            return reported
        problem = self._gone(others, last_seen)
        # a rank found gone may have left on another rank's verdict, shared just before it exited: the cause first
        return problem and (self._reported(others) or problem)

    def _gone(self, others: list[int], last_seen: dict[int, tuple[str, float]]) -> str | None:
        """A rank whose process exited, or (elsewhere) whose heartbeat stopped for dead_after_s."""
        now = time.monotonic()
        for r in others:
            if self.store.check([f"done/{r}"]):
                continue
            alive = self._process_alive(r)
            if alive is False:
                return f"rank {r} died (its process exited without a word: killed, or out of memory)"
            beat = self.store.get(f"heartbeat/{r}").decode() if self.store.check([f"heartbeat/{r}"]) else ""
            if beat != last_seen[r][0] or alive:
                last_seen[r] = (beat, now)
            elif now - last_seen[r][1] > self.dead_after_s:
                return (f"rank {r} stopped responding (no heartbeat for {now - last_seen[r][1]:.0f} s): it was "
                        "killed, ran out of memory, or its host is unreachable")
        return None

    def _reported(self, others: list[int]) -> str | None:
        """A verdict another rank already shared, or an error a rank reported: the cause, not its echoes."""
        if self.store.check(["verdict"]):
            return self.store.get("verdict").decode()
        for r in others:
            if self.store.check([f"error/{r}"]):
                return f"rank {r} failed: {self.store.get(f'error/{r}').decode()}"
        return None

    def _process_alive(self, rank: int) -> bool | None:
        """Whether a rank's process still runs, where it runs on this machine (None: another machine)."""
        if not self.store.check([f"process/{rank}"]):
            return None
        machine, pid = self.store.get(f"process/{rank}").decode().rsplit(" ", 1)
        return process_alive(int(pid)) if machine == machine_id() else None

    def _abort(self, problem: str) -> None:
        print(f"llama-dist rank {self.rank}: {problem}. Exiting.", file=sys.stderr, flush=True)
        try:  # share the verdict; rank 0 hosts the store, so it stays a moment for the others to read it
            self.store.compare_set("verdict", "", problem)
            if self.rank == 0:
                time.sleep(3 * self.interval_s)
        except Exception:
            pass
        os._exit(1)


@functools.cache  # checked for every rank each second; a machine keeps its id
def machine_id() -> str:
    """This machine's identity: its boot id where Linux gives one (host names repeat across containers)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether process `pid` on this machine runs (an exited process its parent has not reaped yet does not)."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
