"""The Ray launcher on a real local Ray cluster (ray.cluster_utils.Cluster): grow, shrink, kill."""

import os
import shutil
import tempfile

import pytest
import torch

from vnodes.runtime import load_checkpoint, train

from jobs import det_f32_spec

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from vnodes.scheduler.launcher_ray import RayWorkerOptions  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 40


def _start_cluster(tmp, attempts=2):
    """A head node with 1 CPU. On a loaded 2-core machine Ray's head can miss its own start-up
    deadline ("Failed to get node info: Deadline Exceeded"); that is Ray's start, not the code
    under test, so it gets one more try."""
    for attempt in range(attempts):
        try:
            return Cluster(initialize_head=True, connect=True,
                           head_node_args={"num_cpus": 1, "temp_dir": tmp, "include_dashboard": False})
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.fixture
def cluster(monkeypatch):
    # Ray's sockets need a short path: a fresh folder under /tmp, removed afterwards, holds every
    # file Ray writes (RAY_TMPDIR also moves its address file there).
    root = tempfile.mkdtemp(prefix="vnr")
    monkeypatch.setenv("RAY_TMPDIR", root)
    tmp = os.path.join(root, "ray")  # Ray's default temp dir under RAY_TMPDIR: one tree for everything
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    c = _start_cluster(tmp)
    try:
        yield c, tmp
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def test_follows_the_cluster_and_matches_local_bitwise(cluster, tmp_path):
    c, tmp = cluster
    reference = train(det_f32_spec(), steps=STEPS).model_state_dict
    events = []

    def hook(fleet, master):
        members = len(master.membership.members) if master.membership else 0
        if not events and master.step >= 2:
            events.append(("add", c.add_node(num_cpus=1, temp_dir=tmp)))
        elif len(events) == 1 and members == 2:
            events.append(("grown", master.step))
            c.remove_node(events[0][1])  # a node leaves: its worker dies mid-run, the step is redone
        elif len(events) == 2 and members == 1 and master.step > events[1][1]:
            events.append(("shrunk", master.step))
            victim = next(iter(fleet.actors.values()))[0]
            ray.kill(victim)  # the last worker dies: the job waits, a new actor resumes from the checkpoint
        elif len(events) == 3 and members == 1 and master.step > events[2][1] + 1:
            events.append(("recovered", master.step))

    result = train(det_f32_spec(), steps=STEPS, checkpoint_dir=tmp_path, checkpoint_every=2, launcher="ray",
                   launch_options={"worker_options": RayWorkerOptions(num_cpus=1, slowdown=25),
                                   "fleet_hook": hook, "poll_s": 0.5})
    assert [e[0] for e in events] == ["add", "grown", "shrunk", "recovered"], events
    for k, v in reference.items():
        assert torch.equal(result.model_state_dict[k], v), k
    assert len(result.losses) == STEPS


def test_free_resources_split_over_nodes_start_one_waiting_actor_not_many(cluster, tmp_path):
    """Two nodes with 1 free CPU each add up to 2, but an actor needing 1.5 fits neither: one actor
    waits for room (no pile of unplaceable actors), and runs once a node with room joins."""
    c, tmp = cluster
    c.add_node(num_cpus=1, temp_dir=tmp)
    seen = []

    def hook(fleet, master):
        seen.append(len(fleet.actors))
        if len(seen) == 12:
            c.add_node(num_cpus=2, temp_dir=tmp)

    result = train(det_f32_spec(), steps=3, launcher="ray",
                   launch_options={"worker_options": RayWorkerOptions(num_cpus=1.5), "fleet_hook": hook,
                                   "poll_s": 0.5})
    assert len(result.losses) == 3
    assert len(seen) > 12 and max(seen[:12]) == 1, seen


def test_plugins_on_ray_record_bitwise_what_one_process_records(cluster, tmp_path):
    """The recorder and a mutator, on two Ray actors: the parameters and every recorded table are
    bitwise those of one in-process worker."""
    from plugin_jobs import STEPS as PLUGIN_STEPS
    from plugin_jobs import mutator_spec
    from test_plugins import assert_same_run

    c, tmp = cluster
    c.add_node(num_cpus=1, temp_dir=tmp)
    train(mutator_spec(), steps=PLUGIN_STEPS, checkpoint_dir=tmp_path / "local", checkpoint_every=4)
    train(mutator_spec(), steps=PLUGIN_STEPS, checkpoint_dir=tmp_path / "ray", checkpoint_every=4, launcher="ray",
          workers=2, launch_options={"worker_options": RayWorkerOptions(num_cpus=1), "poll_s": 0.5})
    assert_same_run(tmp_path / "ray", tmp_path / "local")


def test_the_cluster_service_moves_ray_actors_between_jobs_bitwise(cluster, tmp_path):
    """``vnodes cluster --launcher ray``: the pool is what Ray holds (two CPU nodes: two worker actors,
    placed by Ray); a second job takes a worker from the first at a step boundary; both end
    bitwise equal to their one-worker runs."""
    import dataclasses
    import threading
    import time
    from pathlib import Path

    from vnodes.scheduler.cluster.pools import RayPool
    from vnodes.scheduler.cluster.registry import StateDir
    from vnodes.scheduler.cluster.service import ClusterService, Submission
    from vnodes.scheduler.code_package import CodePackage

    c, tmp = cluster
    c.add_node(num_cpus=1, temp_dir=tmp)
    c.wait_for_nodes()
    state = StateDir(tmp_path / "svc")
    state.open()
    pool = RayPool(None, num_cpus=1)
    assert pool.size == 2
    service = ClusterService(state, pool, policy="wfs", interval_s=0.3)  # equal priorities: one worker each
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(stop,), daemon=True)
    loop.start()
    code = CodePackage.from_folder(Path(__file__).parent).data
    plan = {"j1": (7, 100), "j2": (3, 30)}

    def submit(seed, steps, name):
        return service.submit(Submission(name=name, job="jobs.py:slow_det_spec", code=code, steps=steps, priority=1,
                                         run_dir=str(tmp_path / name), deterministic=True,
                                         overrides=(f"seed={seed}",), virtual_nodes=4, requested_workers=0,
                                         checkpoint_every=0))

    def job(job_id):
        return next(j for j in service.jobs() if j["id"] == job_id)

    def wait(predicate, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, service.jobs()
            time.sleep(0.2)

    try:
        assert submit(*plan["j1"], "j1") == "j1"
        wait(lambda: job("j1")["step"] >= 5 and job("j1")["workers"] == 2, 120)
        assert submit(*plan["j2"], "j2") == "j2"
        wait(lambda: all(j["state"] == "done" for j in service.jobs()), 240)
        jobs = {j["id"]: j for j in service.jobs()}
    finally:
        stop.set()
        loop.join(timeout=10)
        service.close()
        state.close()
    assert jobs["j1"]["resizes"] >= 1  # gave a worker to j2 while it ran
    for name, (seed, steps) in plan.items():
        final = load_checkpoint(tmp_path / name)
        reference = train(dataclasses.replace(det_f32_spec(), seed=seed), steps=steps).model_state_dict
        assert final["step"] == steps
        assert [k for k, v in reference.items() if not torch.equal(final["model"][k], v)] == []
