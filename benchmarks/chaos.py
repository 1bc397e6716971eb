"""Chaos soak: a deterministic job under a seeded schedule of faults ends with a fault-free run's bits.

A master and its workers run as separate processes on this machine (``vnodes master``, ``vnodes
worker``). Every few seconds the schedule, drawn from ``--seed``, does one of:

- ``kill``: SIGKILL a worker (a replacement starts when fewer than ``--min-workers`` are left);
- ``stop``: SIGSTOP a worker and SIGCONT it 1 to 15 s later (past the master's 10 s heartbeat
  timeout it has been declared dead, and comes back as a new member);
- ``join``: start one more worker (up to ``--max-workers``);
- ``drain``: SIGTERM a worker (it finishes the step and leaves);
- ``master``: SIGKILL the master and start it again on the same port and run directory (at least
  once per soak, half-way through).

At the end the final checkpoint is compared bit for bit with ``train(job(), steps=STEPS)`` in this
process (one worker, no faults). The table gives the faults by kind, the steps aborted and redone,
the longest time between two commits, the time from each SIGSTOP to the next commit, and the
workers' exit codes.

    python benchmarks/chaos.py                       # 2,000 steps, 4 workers, a fault every ~3 s
    python benchmarks/chaos.py --steps 300 --interval 1.5 --seed 1

``tests/test_chaos.py`` runs a short soak in ``make test``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from vnodes.runtime import JobSpec, load_checkpoint, train

KINDS = ("kill", "stop", "join", "drain", "master")
WEIGHTS = (3, 2, 2, 2, 1)
HEARTBEAT_TIMEOUT_S = 10.0  # the master's default: a longer SIGSTOP is a death
SETTLED_S = 10.0  # a worker this old has joined (its imports and registration take a few seconds)


def job() -> JobSpec:
    """A small deterministic MLP on synthetic data: about 10 ms a step, so faults land mid-step."""
    return JobSpec(model=_model, dataset=_dataset, optimizer=_optimizer, loss=_loss, virtual_nodes=8,
                   vnode_batch_size=8, seed=11, deterministic=True)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _dataset():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 32, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :10].argmax(1) + (x[:, 10] > 1).long()) % 10)


def _loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@dataclasses.dataclass
class SoakResult:
    steps: int
    faults: collections.Counter
    aborted: int  # step attempts aborted (each redone)
    rolled_back: int  # committed steps lost to roll-backs to a checkpoint (every holder of the state gone)
    longest_pause_s: float  # between two commits, master restarts included
    stop_to_commit_s: list[float]  # from each SIGSTOP to the next commit
    exit_codes: collections.Counter  # of the workers, at the end (-9: SIGKILLed by the schedule)
    unexpected_exits: list[str]  # a worker that exited non-zero without being SIGKILLed
    master_restarts: int
    bitwise: Optional[bool]  # None: no final checkpoint
    mismatched: list[str]
    wall_s: float
    reference_s: float  # the fault-free run, in one process (the anchor)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    here = str(Path(__file__).resolve().parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([here, *(p for p in sys.path if p)]))


class Soak:
    """One soak: the processes it started and what the schedule did to them."""

    def __init__(self, run_dir: Path, steps: int, workers: int, seed: int, interval_s: float,
                 min_workers: int, max_workers: int, log, worker_args: tuple = (), start_grace_s: float = 60.0):
        self.run_dir, self.steps, self.seed, self.interval_s = run_dir, steps, seed, interval_s
        self.start_grace_s = start_grace_s
        self.worker_args = tuple(worker_args)
        self.min_workers, self.max_workers, self.log = min_workers, max_workers, log
        self.rng = random.Random(seed)
        self.port = _free_port()
        self.job = f"{Path(__file__).resolve()}:job"
        self.master: Optional[subprocess.Popen] = None
        self.workers: list[subprocess.Popen] = []
        self.started_at: dict[int, float] = {}  # pid -> when it was started
        self.stopped: dict[int, float] = {}  # pid -> when to SIGCONT
        self.killed: set[int] = set()  # pids SIGKILLed by the schedule
        self.drained: set[int] = set()  # pids SIGTERMed by the schedule (leaving)
        self.stopped_at_end: set[int] = set()  # still stopped when the job ended (declared dead by then)
        self.faults: collections.Counter = collections.Counter()
        self.stop_times: list[float] = []
        self.master_restarts = 0
        self.high, self.rolled_back = 0, 0  # the highest committed step seen; steps lost to roll-backs
        self.initial_workers = workers
        self._logs = run_dir / "processes"
        self._logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, *args: str, name: str) -> subprocess.Popen:
        out = open(self._logs / f"{name}.log", "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=_env(),
                                    stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def start_master(self) -> None:
        self.master = self._spawn("master", self.job, "--steps", str(self.steps), "--port", str(self.port),
                                  "--run-dir", str(self.run_dir), "--checkpoint-every", str(max(1, self.steps // 10)),
                                  "--min-workers", str(self.initial_workers), "--start-grace", str(self.start_grace_s),
                                  name=f"master-{self.master_restarts}")

    def start_worker(self) -> None:
        worker = self._spawn("worker", "--master", f"127.0.0.1:{self.port}", *self.worker_args,
                             name=f"worker-{len(self.workers)}")
        self.workers.append(worker)
        self.started_at[worker.pid] = time.monotonic()

    def running(self) -> list[subprocess.Popen]:
        return [w for w in self.workers if w.poll() is None]

    def _live(self) -> list[subprocess.Popen]:
        """Running, not stopped, not leaving: the workers a fault may hit."""
        return [w for w in self.running() if w.pid not in self.stopped and w.pid not in self.drained]

    def committed(self) -> int:
        try:
            return json.loads((self.run_dir / "master.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return 0

    def inject(self, master_kill_due: bool) -> None:
        live = self._live()
        kind = "master" if master_kill_due else self.rng.choices(KINDS, WEIGHTS)[0]
        if kind == "master" and not master_kill_due:
            kind = "kill"  # the master is killed on its own schedule (below); other draws hit a worker
        if kind in ("kill", "stop", "drain") and len(live) <= 1:
            kind = "join"
        if kind == "stop" and self.stopped:
            kind = "kill"  # one stopped worker at a time: the others keep the job going
        if kind == "join" and len(self.running()) >= self.max_workers:
            kind = "drain"
        # a worker that has had time to join (one still importing torch dies of SIGTERM, and killing
        # only newcomers would starve the job instead of testing it)
        live = [w for w in live if time.monotonic() - self.started_at[w.pid] > SETTLED_S] or live
        victim = self.rng.choice(live) if live else None
        if kind == "kill":
            victim.send_signal(signal.SIGKILL)
            self.killed.add(victim.pid)
        elif kind == "stop":
            victim.send_signal(signal.SIGSTOP)
            self.stopped[victim.pid] = time.monotonic() + self.rng.uniform(1.0, 1.5 * HEARTBEAT_TIMEOUT_S)
            self.stop_times.append(time.time())
        elif kind == "drain":
            victim.send_signal(signal.SIGTERM)
            self.drained.add(victim.pid)
        elif kind == "join":
            self.start_worker()
        elif kind == "master":
            self.master.send_signal(signal.SIGKILL)
            self.master.wait()
            self.master_restarts += 1
            time.sleep(0.5)
            self.start_master()
        self.faults[kind] += 1
        target = f" pid {victim.pid}" if kind in ("kill", "stop", "drain") else ""
        self.log(f"step {self.committed():>5}: {kind}{target} ({len(self.running())} workers running)")

    def tend(self) -> None:
        now = time.monotonic()
        for pid, when in list(self.stopped.items()):
            if now >= when:
                os.kill(pid, signal.SIGCONT)
                del self.stopped[pid]
        while len(self._live()) + len(self.stopped) < self.min_workers:
            self.start_worker()

    def run(self, timeout_s: float) -> int:
        started = time.monotonic()
        self.start_master()
        for _ in range(self.initial_workers):
            self.start_worker()
        master_kill_at = self.steps // 2  # at least one master SIGKILL per soak
        next_fault = time.monotonic() + self.interval_s
        while self.master.poll() is None or self.committed() < self.steps:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the soak did not finish within {timeout_s:.0f} s "
                                   f"(step {self.committed()} of {self.steps}); logs in {self._logs}")
            if self.master.poll() is not None:  # exited before the end: a failure, not a fault
                raise RuntimeError(f"the master exited with {self.master.returncode} at step {self.committed()}; "
                                   f"logs in {self._logs}")
            committed = self.committed()
            if committed < self.high:  # a roll-back (to a checkpoint, or one step by a restarted master)
                self.rolled_back += self.high - committed
            self.high = committed
            if committed < self.steps:  # past the end, workers exit: no replacements
                self.tend()
            if committed == 0:  # the first faults hit a running job, not its start
                next_fault = time.monotonic() + self.interval_s
            elif master_kill_at is not None and master_kill_at <= committed < self.steps:
                self.inject(master_kill_due=True)  # half-way, whatever the schedule says
                master_kill_at = None
            elif time.monotonic() >= next_fault and committed < self.steps:
                self.inject(master_kill_due=False)
                next_fault = time.monotonic() + self.interval_s * self.rng.uniform(0.5, 1.5)
            time.sleep(0.05)
        self.ended_at = time.monotonic()
        return self.master.returncode

    def finish(self, timeout_s: float = 90.0) -> None:
        # Still stopped when the job ended: declared dead by then, and woken it would wait out its
        # --master-timeout for a master that has left (exit 4). SIGKILL ends it now.
        self.stopped_at_end = set(self.stopped)
        for pid in list(self.stopped):
            os.kill(pid, signal.SIGKILL)
        self.stopped.clear()
        deadline = time.monotonic() + timeout_s
        for w in self.workers:
            try:
                w.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()

    def cleanup(self) -> None:
        for p in [self.master, *self.workers]:
            if p is not None and p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.kill()
                p.wait()


def soak(run_dir: Path, *, steps: int = 2000, workers: int = 4, seed: int = 0, interval_s: float = 3.0,
         min_workers: int = 2, max_workers: int = 6, timeout_s: float = 3600.0, log=print,
         worker_args: tuple = (), start_grace_s: float = 60.0) -> SoakResult:
    """Run one soak in ``run_dir`` (empty) and compare its final checkpoint with a fault-free run.
    ``worker_args``: extra ``vnodes worker`` arguments (``--slowdown 20`` stretches a step with sleep,
    so that a short soak sees many faults without more CPU). ``start_grace_s``: the restarted
    master's ``--start-grace`` (how long it waits for the previous master's workers)."""
    started = time.monotonic()
    s = Soak(run_dir, steps, workers, seed, interval_s, min_workers, max_workers, log, worker_args, start_grace_s)
    try:
        rc = s.run(timeout_s)
        s.finish()
    finally:
        s.cleanup()
    if rc != 0:
        raise RuntimeError(f"the master exited with {rc}; logs in {run_dir / 'processes'}")
    wall_s = s.ended_at - started  # to the master's exit (not the wait for workers woken at the end)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    commits = sorted(r["time"] for r in rows if "event" not in r)
    pauses = [b - a for a, b in zip(commits, commits[1:])]
    stop_to_commit = [next((t - stop for t in commits if t > stop), float("nan")) for stop in s.stop_times]
    exits = collections.Counter(w.returncode for w in s.workers)
    # SIGKILLed: -9; SIGTERMed before its handler was installed (still importing): -15; started just
    # before the master finished and exited: 2, no master to register with
    expected = collections.defaultdict(lambda: {0})
    for pid in s.killed:
        expected[pid].add(-9)
    for pid in s.drained:
        expected[pid].add(-15)
    for pid, t in s.started_at.items():
        if s.ended_at - t < SETTLED_S:
            expected[pid].add(2)
    for pid in s.stopped_at_end:  # SIGKILLed at the end (see ``finish``); woken before, it gave up: 4
        expected[pid].update((-9, 4))
    unexpected = [f"worker-{i} (pid {w.pid}) exited {w.returncode}" for i, w in enumerate(s.workers)
                  if w.returncode not in expected[w.pid]]
    t0 = time.monotonic()
    reference = train(job(), steps=steps)
    reference_s = time.monotonic() - t0
    final = load_checkpoint(run_dir)
    mismatched = [k for k, v in reference.model_state_dict.items() if not torch.equal(final["model"][k], v)]
    if list(final["losses"]) != list(reference.losses):
        mismatched.append("losses")
    return SoakResult(steps=final["step"], faults=s.faults, aborted=sum(r.get("event") == "aborted" for r in rows),
                      rolled_back=s.rolled_back,
                      longest_pause_s=max(pauses, default=0.0), stop_to_commit_s=stop_to_commit, exit_codes=exits,
                      unexpected_exits=unexpected, master_restarts=s.master_restarts,
                      bitwise=final["step"] == steps and not mismatched, mismatched=mismatched, wall_s=wall_s,
                      reference_s=reference_s)


def table(r: SoakResult) -> str:
    stops = ", ".join(f"{t:.1f}" for t in r.stop_to_commit_s) or "none"
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| faults: {k} | {r.faults.get(k, 0)} |" for k in KINDS]
    lines += [f"| steps | {r.steps} |",
              f"| step attempts aborted and redone | {r.aborted} |",
              f"| committed steps rolled back to a checkpoint and redone | {r.rolled_back} |",
              f"| longest time between two commits | {r.longest_pause_s:.1f} s |",
              f"| SIGSTOP to the next commit | {stops} s |",
              f"| worker exit codes | {dict(sorted(r.exit_codes.items()))} |",
              f"| unexpected worker exits | {len(r.unexpected_exits)} |",
              f"| wall time (the fault-free run in one process: {r.reference_s:.0f} s) | {r.wall_s:.0f} s |",
              f"| final checkpoint bitwise equal to the fault-free run | {'yes' if r.bitwise else 'NO'} |"]
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import header

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4, help="workers at the start")
    parser.add_argument("--seed", type=int, default=0, help="the fault schedule's seed")
    parser.add_argument("--interval", type=float, default=3.0, help="mean seconds between faults")
    parser.add_argument("--run-dir", help="default: a temporary directory")
    parser.add_argument("--start-grace", type=float, default=60.0,
                        help="the restarted master's --start-grace in seconds (default 60)")
    args = parser.parse_args()
    print(header("torch"))
    with tempfile.TemporaryDirectory(prefix="vnodes-chaos-") as tmp:
        run_dir = Path(args.run_dir or tmp)
        result = soak(run_dir, steps=args.steps, workers=args.workers, seed=args.seed, interval_s=args.interval,
                      start_grace_s=args.start_grace, log=lambda line: print(line, flush=True))
        print(f"\nchaos soak: {args.steps} steps, {args.workers} workers at the start, seed {args.seed}, "
              f"a fault every ~{args.interval:g} s\n")
        print(table(result))
        for line in result.unexpected_exits:
            print(f"unexpected: {line}")
        if result.mismatched:
            print(f"differs from the fault-free run: {', '.join(result.mismatched[:10])}")
    return 0 if result.bitwise and not result.unexpected_exits else 1


if __name__ == "__main__":
    sys.exit(main())
