"""The cluster service (``vnodes cluster``): its decisions table-driven, then the real thing: jobs
submitted with ``vnodes submit`` to a service of local worker processes, resized live, each ending
bitwise equal to its solo one-worker run; a service SIGKILLed (and a job master with it) and
restarted picks its jobs up; cancellation; bad requests refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vnodes.runtime import load_checkpoint, train
from vnodes.scheduler.cluster.policies import policy_named
from vnodes.scheduler.cluster.pools import LocalPool
from vnodes.scheduler.cluster.reconcile import (Drain, Spawn, StartMaster, StopMaster, reconcile, snapshot,
                                                throughput_curve)
from vnodes.scheduler.cluster.registry import (ClusterJobState, JobRecord, ProcessRecord, Registry, SlotRecord,
                                               StateDir, StateDirInUse)
from vnodes.scheduler.cluster.service import ClusterService
from vnodes.scheduler.cluster.service_rpc import ClusterClient, ClusterError, serve_cluster

from jobs import det_f32_spec

TESTS = Path(__file__).parent
SLOW_JOB = f"{TESTS / 'jobs.py'}:slow_det_spec"


# ---- decisions, table-driven ---------------------------------------------------------------------

def job(job_id, state=ClusterJobState.QUEUED, vnodes=4, requested=4, cancel=False, rates=None, priority=1, step=0):
    return JobRecord(id=job_id, name=job_id, job="j.py", steps=10, priority=priority, run_dir=f"/r/{job_id}",
                     deterministic=True, overrides=[], virtual_nodes=vnodes, requested_workers=requested,
                     checkpoint_every=0, submitted_at=float(job_id[1:]), state=state, cancel_requested=cancel,
                     rates=dict(rates or {}), step=step)


def slot(k, job_id, draining=False):
    return SlotRecord(k, job_id, ProcessRecord(1000 + k, 0.0), draining)


@pytest.mark.parametrize("jobs, slots, allocation, up, expected", [
    # a new job: its master, then its workers in the lowest free slots
    ([job("j1")], [], {"j1": 2}, set(), [StartMaster("j1"), Spawn("j1", 0), Spawn("j1", 1)]),
    # a shrink drains the job's highest slots; the freed slots are not free until the workers exit
    ([job("j1"), job("j2")], [slot(0, "j1"), slot(1, "j1"), slot(2, "j1")], {"j1": 1, "j2": 2}, {"j1"},
     [Drain("j1", 2), Drain("j1", 1), StartMaster("j2")]),
    # ... and once they have exited, the other job's workers take them
    ([job("j1"), job("j2")], [slot(0, "j1")], {"j1": 1, "j2": 2}, {"j1", "j2"}, [Spawn("j2", 1), Spawn("j2", 2)]),
    # draining workers are not counted as held: no second drain, and no spawn into their slots
    ([job("j1")], [slot(0, "j1"), slot(1, "j1", draining=True)], {"j1": 1}, {"j1"}, []),
    # a cancelled job: its workers leave; once none is left, its master stops
    ([job("j1", cancel=True)], [slot(0, "j1")], {}, {"j1"}, [Drain("j1", 0)]),
    ([job("j1", cancel=True)], [slot(0, "j1", draining=True)], {}, {"j1"}, []),
    ([job("j1", cancel=True)], [], {}, {"j1"}, [StopMaster("j1")]),
    # a job at its last step keeps its workers until they hear the end; it gets no new one
    ([job("j1", state=ClusterJobState.RUNNING, step=10)], [slot(0, "j1")], {}, {"j1"}, []),
    # a final job's workers still running are stranded: they go
    ([job("j1", state=ClusterJobState.DONE)], [slot(0, "j1")], {}, set(), [Drain("j1", 0)]),
    # more wanted than the pool has free: the first job in order fills first
    ([job("j1"), job("j2")], [slot(0, "j3")], {"j1": 1, "j2": 2}, {"j1", "j2"}, [Spawn("j1", 1), Spawn("j2", 2)]),
])
def test_reconcile(jobs, slots, allocation, up, expected):
    assert reconcile(jobs, slots, allocation, up, pool_size=3) == expected


@pytest.mark.parametrize("rates, most, expected", [
    ({}, 3, (1.0, 2.0, 3.0)),  # nothing measured: linear
    ({"2": 10.0}, 4, (5.0, 10.0, 15.0, 20.0)),  # scaled from the nearest measured count
    ({"1": 4.0, "3": 9.0}, 4, (4.0, 8.0, 9.0, 12.0)),  # 2: a tie between 1 and 3 goes to fewer workers
    ({"9": 50.0, "0": 1.0, "2": -1.0}, 2, (1.0, 2.0)),  # counts outside 1..most and bad rates are ignored
])
def test_throughput_curve(rates, most, expected):
    assert throughput_curve(rates, most) == pytest.approx(expected)


def test_a_job_not_measured_yet_is_guessed_at_the_others_typical_rate():
    """Else a new job (1 step/s per worker, the unit) would look slower than any measured one, and
    least-remaining-service-first would never start it before them."""
    jobs = [job("j1", rates={"2": 40.0}), job("j2", rates={"1": 30.0, "4": 60.0}), job("j3", rates={"1": 10.0}),
            job("j4")]
    snap = snapshot(jobs, [], now_s=0.0, pool_size=4)
    assert snap.jobs[3].throughput == pytest.approx((20.0, 40.0, 60.0, 80.0))  # the median of 20, 30, 10
    assert throughput_curve({}, 2, per_worker=5.0) == (5.0, 10.0)


def test_snapshot_caps_requests_by_the_pool_and_leaves_out_final_finishing_and_cancelled_jobs():
    jobs = [job("j1", vnodes=8, requested=8), job("j2", vnodes=2, requested=4),
            job("j3", state=ClusterJobState.DONE), job("j4", cancel=True), job("j5", step=10)]
    snap = snapshot(jobs, [slot(0, "j1"), slot(1, "j1", draining=True)], now_s=5.0, pool_size=3)
    assert [(v.name, v.requested_gpus, v.max_gpus, v.gpus) for v in snap.jobs] == [("j1", 3, 3, 1), ("j2", 2, 2, 0)]
    assert snap.total_gpus == 3


def test_the_policies_run_on_a_service_snapshot():
    """Each policy's allocation of a live snapshot is one ``reconcile`` can apply; under wfs the
    higher-priority latecomer gets the larger share."""
    jobs = [job("j1", requested=4), job("j2", requested=4), job("j3", requested=4, priority=5)]
    slots = [slot(0, "j1"), slot(1, "j1"), slot(2, "j2"), slot(3, "j2")]
    snap = snapshot(jobs, slots, now_s=10.0, pool_size=4)
    allocation, _ = policy_named("wfs")(snap, {})
    assert allocation == {"j1": 1, "j2": 1, "j3": 2}
    actions = reconcile(jobs, slots, allocation, {"j1", "j2"}, pool_size=4)
    assert actions == [Drain("j1", 1), Drain("j2", 3), StartMaster("j3")]


def test_registry_round_trips_and_one_service_owns_a_state_dir(tmp_path):
    state = StateDir(tmp_path / "svc")
    state.open()
    try:
        registry = Registry(jobs=[job("j1", rates={"2": 3.5})], slots=[slot(0, "j1", draining=True)], next_id=2,
                            policy_state={"demoted": {"j1": 0}}, started_at=1.5)
        state.save(registry)
        assert state.load() == registry
        assert state.token() == state.token() and len(state.token()) == 32
        assert (tmp_path / "svc" / "token").stat().st_mode & 0o777 == 0o600
        with pytest.raises(StateDirInUse, match="another vnodes cluster service runs on"):
            StateDir(tmp_path / "svc").open()
    finally:
        state.close()
    StateDir(tmp_path / "svc").open()  # released with its holder


# ---- bad requests, refused by name (a service in this process; nothing is started) -----------------

@pytest.fixture
def service(tmp_path):
    state = StateDir(tmp_path / "svc")
    state.open()
    svc = ClusterService(state, LocalPool(1, ["cpu"]))
    server, port = serve_cluster(svc, "127.0.0.1", 0, token=None)
    client = ClusterClient(f"127.0.0.1:{port}")
    yield svc, client
    client.close()
    server.stop(grace=0)
    svc.close()
    state.close()


def _submission(tmp_path, **changes):
    from vnodes.scheduler.code_package import CodePackage

    fields = dict(name="job", job="jobs.py:det_f32_spec", code=CodePackage.from_folder(TESTS).data, steps=5,
                  priority=1, run_dir=str(tmp_path / "run"), deterministic=True, overrides=[], virtual_nodes=4,
                  requested_workers=0, checkpoint_every=0)
    fields.update(changes)
    return fields


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps 0 must be between 1"),
    ({"priority": 0}, "priority 0 must be between 1 and 1000"),
    ({"run_dir": "relative/dir"}, "run_dir 'relative/dir' must be an absolute path"),
    ({"job": "../escape.py"}, "must name a .py file inside the submitted folder"),
    ({"job": "missing.py"}, "job file 'missing.py' is not in the submitted folder"),
    ({"overrides": ["no_such_field=1"]}, "no_such_field"),
    ({"code": b"not a zip"}, "is not a zip archive"),
    ({"name": "x" * 200}, "must be 1-128 letters"),
])
def test_bad_submissions_are_refused_naming_the_field(service, tmp_path, changes, message):
    svc, client = service
    with pytest.raises(ClusterError, match=message):
        client.submit(**_submission(tmp_path, **changes))
    assert svc.jobs() == []
    assert not (svc.state_dir.path / "jobs" / "j1").exists()  # nothing kept of a refused job


def test_a_run_dir_inside_the_state_dir_or_in_use_is_refused_and_unknown_ids_are_named(service, tmp_path):
    svc, client = service
    with pytest.raises(ClusterError, match="lies in the service's own --run-dir"):
        client.submit(**_submission(tmp_path, run_dir=str(svc.state_dir.path / "run")))
    first = client.submit(**_submission(tmp_path))  # queued: no tick runs in this test
    with pytest.raises(ClusterError, match=f"is in use by job {first}"):
        client.submit(**_submission(tmp_path))
    with pytest.raises(ClusterError, match="no job 'j99' here"):
        client.cancel("j99")
    assert client.cancel(first) == "cancelled"  # never started
    assert [(j["id"], j["state"], j["message"]) for j in client.jobs()["jobs"]] == \
        [(first, "cancelled", "cancelled before it started")]


def test_submit_to_no_service_says_so(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "jobs", "--cluster", "127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 2
    assert "is `vnodes cluster` running there?" in out.stderr


# ---- the real service -------------------------------------------------------------------------------

def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``vnodes cluster`` as a process, and what a test does with it."""

    def __init__(self, state_dir: Path, workers: int, policy: str, port: int = 0):
        self.state_dir, self.workers, self.policy = state_dir, workers, policy
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vnodes.scheduler.cli", "-v", "cluster", "--workers", str(self.workers),
             "--policy", self.policy, "--run-dir", str(self.state_dir), "--port", str(self.port),
             "--interval", "0.5"], env=_env(), stdout=subprocess.PIPE, stderr=open(self.state_dir.parent /
                                                                                   "service.log", "ab"), text=True)
        line = self.process.stdout.readline()
        assert "vnodes cluster listening on" in line, line
        return self

    def submit(self, run_dir: Path, steps: int, priority: int = 1, seed: int = 7, workers: int = 0) -> str:
        """With ``vnodes submit`` (a process: it imports torch and the job, a few seconds)."""
        args = [sys.executable, "-m", "vnodes.scheduler.cli", "submit", SLOW_JOB, "--cluster", self.address,
                "--steps", str(steps), "--priority", str(priority), "--run-dir", str(run_dir), "--deterministic",
                "--set", f"seed={seed}"] + (["--workers", str(workers)] if workers else [])
        out = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env())
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def submit_here(self, run_dir: Path, steps: int, priority: int = 1, seed: int = 7) -> str:
        """As ``vnodes submit`` sends it, from this process (no start-up to wait for)."""
        client = ClusterClient(self.address)
        try:
            return client.submit(**_submission(run_dir.parent, name="slow", job="jobs.py:slow_det_spec",
                                               steps=steps, run_dir=str(run_dir), priority=priority,
                                               overrides=[f"seed={seed}"]))
        finally:
            client.close()

    def jobs(self) -> dict:
        client = ClusterClient(self.address)
        try:
            return {j["id"]: j for j in client.jobs()["jobs"]}
        finally:
            client.close()

    def registry(self) -> Registry:
        return StateDir(self.state_dir).load()

    def diagnosis(self) -> str:
        """What a timed-out test shows: the jobs, the service's log, each job's master log."""
        parts = [f"jobs: {self.jobs() if self.process.poll() is None else 'service exited'}"]
        for path in [self.state_dir.parent / "service.log", *sorted(self.state_dir.glob("jobs/*/*.log"))]:
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts.append(f"--- {path.name if path.parent == self.state_dir.parent else path.relative_to(self.state_dir)}"
                         + "\n" + "\n".join(lines[-15:]))
        return "\n".join(parts)

    def kill(self):
        self.process.kill()
        self.process.wait()

    def stop_everything(self):
        """The service, and every master and worker it recorded (they outlive it by design)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        registry = self.registry()
        records = [j.master for j in registry.jobs if j.master] + [s.process for s in registry.slots if s.process]
        from vnodes.scheduler.cluster.pools import signal_process

        for record in records:
            signal_process(record, signal.SIGKILL)


def _wait(predicate, timeout_s, what, svc=None):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}\n{svc.diagnosis() if svc is not None else ''}")
        time.sleep(0.25)


def _solo(seed: int, steps: int) -> dict:
    return train(dataclasses.replace(det_f32_spec(), seed=seed), steps=steps).model_state_dict


def _assert_bitwise(run_dir: Path, reference: dict, steps: int) -> None:
    final = load_checkpoint(run_dir)
    assert final["step"] == steps
    assert [k for k, v in reference.items() if not torch.equal(final["model"][k], v)] == []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_three_jobs_resized_live_each_bitwise_equal_to_its_solo_run(tmp_path):
    """wfs on a pool of 4: j1 starts alone on 4 workers; j2 arrives (and would take half), then
    j3, five times the priority, gets 2 while j1 and j2 shrink to 1. Workers move at step
    boundaries; every job ends with the parameters of its one-worker run. j1 comes through
    ``vnodes submit``; j2 and j3 are sent from here, so that they arrive while j1 runs however
    loaded the machine is."""
    svc = Service(tmp_path / "svc", workers=4, policy="wfs").start()
    plan = {"j1": (7, 260, 1), "j2": (3, 80, 1), "j3": (5, 60, 5)}  # seed, steps, priority
    seen: dict[str, set[int]] = {j: set() for j in plan}
    shares: list[dict[str, int]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            with_workers = {j["id"]: j["workers"] for j in svc.jobs().values() if j["state"] == "running"}
            for job_id, n in with_workers.items():
                seen[job_id].add(n)
            shares.append(with_workers)
            time.sleep(0.2)

    try:
        ids = [svc.submit(tmp_path / "j1", plan["j1"][1], plan["j1"][2], seed=plan["j1"][0])]
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _wait(lambda: svc.jobs()["j1"]["step"] >= 10, 120, "j1 running", svc)
        ids.append(svc.submit_here(tmp_path / "j2", plan["j2"][1], plan["j2"][2], seed=plan["j2"][0]))
        ids.append(svc.submit_here(tmp_path / "j3", plan["j3"][1], plan["j3"][2], seed=plan["j3"][0]))
        assert ids == ["j1", "j2", "j3"]
        _wait(lambda: all(j["state"] == "done" for j in svc.jobs().values()), 240, "every job done", svc)
        stop.set()
        watcher.join()
        jobs = svc.jobs()
    finally:
        stop.set()
        svc.stop_everything()
    assert [(j["state"], j["step"]) for j in jobs.values()] == [("done", plan[i][1]) for i in jobs]
    assert len(seen["j1"]) >= 2 and jobs["j1"]["resizes"] >= 1, seen  # resized while it ran
    # the high-priority latecomer held more workers than the first job while both ran
    assert any(s.get("j3", 0) > s.get("j1", 0) > 0 for s in shares), shares
    for job_id, (seed, steps, _) in plan.items():
        _assert_bitwise(tmp_path / job_id, _solo(seed, steps), steps)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_service_and_master_restart_and_the_job_ends_bitwise(tmp_path):
    """SIGKILL the service mid-job, and the job's master too; a new service on the same state
    directory adopts the workers, restarts the master on its port (the workers reconnect to it)."""
    steps = 160
    svc = Service(tmp_path / "svc", workers=2, policy="vnodes").start()
    try:
        job_id = svc.submit_here(tmp_path / "run", steps)
        _wait(lambda: svc.jobs()[job_id]["step"] >= 20, 120, "the job running", svc)
        svc.kill()
        record = svc.registry().job(job_id)
        os.kill(record.master.pid, signal.SIGKILL)
        svc.start()  # the same state directory and port
        _wait(lambda: svc.jobs()[job_id]["state"] == "done", 300, "the job done after the restart", svc)
        record = svc.registry().job(job_id)
    finally:
        svc.stop_everything()
    assert record.master_starts == 2 and record.step == steps
    _assert_bitwise(tmp_path / "run", _solo(7, steps), steps)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cancel_a_running_and_a_queued_job(tmp_path):
    svc = Service(tmp_path / "svc", workers=1, policy="fifo").start()
    try:
        running = svc.submit_here(tmp_path / "a", 100_000)
        queued = svc.submit_here(tmp_path / "b", 10)  # fifo on one worker: waits behind the first
        _wait(lambda: svc.jobs()[running]["step"] >= 5, 90, "the first job running", svc)
        assert svc.jobs()[queued]["state"] == "queued"
        out = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "cancel", queued, "--cluster",
                              svc.address], capture_output=True, text=True, timeout=60, env=_env())
        assert out.returncode == 0 and out.stdout.strip() == f"{queued}: cancelled", out
        client = ClusterClient(svc.address)
        assert client.cancel(running) == "running"  # its worker leaves at the step boundary first
        client.close()
        _wait(lambda: svc.jobs()[running]["state"] == "cancelled", 60, "the running job cancelled", svc)
        listing = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "jobs", "--cluster", svc.address,
                                  "--json"], capture_output=True, text=True, timeout=60, env=_env())
        record = svc.registry()
    finally:
        svc.stop_everything()
    rows = json.loads(listing.stdout)
    assert [(r["id"], r["state"], r["workers"]) for r in rows] == [(running, "cancelled", 0), (queued, "cancelled", 0)]
    assert set(rows[0]) >= {"id", "name", "state", "priority", "workers", "step", "steps"}
    assert record.slots == [] and not (tmp_path / "b").exists()  # the queued job never ran
