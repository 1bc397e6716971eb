"""The Ray launcher: the master in this process, one worker actor per device of a Ray cluster.

    train(spec, steps, launcher="ray", address="auto" | "HOST:PORT" | None)
    vnodes run job.py --launcher ray [--address ...]

The launcher follows the cluster: every ``poll_s`` it compares the free resources of each alive node
with what one worker asks for (``num_gpus=1`` on GPU nodes, else ``num_cpus``, plus any custom
``resources``) and starts workers where they fit, up to the number of virtual nodes; they join at
the next step boundary. A worker actor that dies (``ray.kill``, node removed) breaks its heartbeat
stream, so the master treats it as a crash: the step is redone by the survivors. Nothing here
changes the math: the job's virtual nodes and trajectory stay the same.

Ray is imported only here; ``vnodes.runtime`` never needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from vnodes.runtime.errors import InvalidJobSpec
from vnodes.runtime.events import Callback, RunState
from vnodes.runtime.spec import JobSpec
from vnodes.runtime.train import TrainResult

from .code_package import CodePackage, launching_script, package_for_script
from .driver import drive
from .errors import WorkersGone
from .launcher import job_result, open_run_dir, start_master

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RayWorkerOptions:
    """What each worker actor asks Ray for."""

    num_cpus: float = 1.0
    num_gpus: Optional[float] = None  # None: 1 when the cluster has GPUs (one worker per device), else 0
    resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom, e.g. {"a100": 1}
    slowdown: float = 1.0  # test knob: stretch each step (simulates a slower device)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InvalidJobSpec("launcher", "'ray' needs Ray: pip install 'vnodes[ray]'") from None
    return ray


class WorkerActorBody:
    """Runs one ``WorkerAgent`` inside a Ray actor until the job stops."""

    def run(self, master: str, token: Optional[str], launch_index: int, env: dict[str, str],
            slowdown: float = 1.0) -> int:
        os.environ.update(env)
        for path in env.get("PYTHONPATH", "").split(os.pathsep):  # the job's modules, as on the driver
            if path and path not in sys.path:
                sys.path.append(path)
        from vnodes.runtime.agent import WorkerAgent, master_timeout_from_env
        from vnodes.runtime.watchdog import hang_timeout_from_env

        device = None
        gpu_ids = _gpu_ids()
        if gpu_ids:
            device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        return WorkerAgent(master, device=device, token=token, launch_index=launch_index, slowdown=slowdown,
                           reconnect_timeout_s=master_timeout_from_env(), hang_timeout_s=hang_timeout_from_env()).run()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _gpu_ids() -> list:
    import ray

    return ray.get_gpu_ids()


class RayFleet:
    """The worker actors of one job, kept in step with the cluster's free resources."""

    def __init__(self, address: str, token: Optional[str], options: RayWorkerOptions, max_workers: int,
                 env: dict[str, str], poll_s: float = 1.0, hook=None, max_failures_without_progress: int = 5):
        """``hook(fleet, master)`` runs after every ``tend`` (tests use it to change the cluster)."""
        self.ray = _import_ray()
        self.poll_s, self.hook = poll_s, hook
        self.max_failures_without_progress = max_failures_without_progress
        self._progress, self._failures_at_progress = -1, 0
        self.address = address
        self.token = token
        self.options = options
        self.max_workers = max_workers
        self.env = env
        self.actors: dict[int, tuple[Any, Any]] = {}  # launch index -> (actor, run ref)
        self._next_index = 0
        self._actor_class = self.ray.remote(WorkerActorBody)
        self.failures: list[str] = []  # errors of actors that ended, newest last
        # Actors Ray has not placed on a node yet: launch index -> ref of their node_id()
        self._unplaced: dict[int, Any] = {}

    def _fits(self, available: dict[str, float]) -> bool:
        need = {"CPU": self.options.num_cpus, "GPU": self.options.num_gpus, **self.options.resources}
        return all(available.get(k, 0.0) >= v for k, v in need.items() if v > 0)

    def unplaced(self, wait_s: float = 0.0) -> int:
        """Actors Ray has not placed on a node yet (waiting up to ``wait_s`` for them).

        Free resources are summed over the cluster, so they may fit no single node (two half-free
        nodes are not one free node). Every actor of a job asks for the same resources, so while one
        waits for room no more are started: at most one actor is ever left waiting.
        """
        if self._unplaced:
            refs = {ref: i for i, ref in self._unplaced.items()}
            placed, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
            for ref in placed:
                self._unplaced.pop(refs[ref], None)
        return len(self._unplaced)

    def reap(self) -> None:
        """Forget actors whose ``run`` ended (normally, or because the actor or its node died)."""
        if not self.actors:
            return
        refs = {ref: i for i, (_, ref) in self.actors.items()}
        done, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in done:
            index = refs[ref]
            try:
                self.ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - actor died: the master already redid the step
                log.warning("worker actor %d ended: %s", index, type(exc).__name__)
                self.failures.append(str(exc)[-2000:])
            self.actors.pop(index, None)
            self._unplaced.pop(index, None)

    def grow(self) -> int:
        """Start workers wherever the cluster has room for one; returns how many were started."""
        started = 0
        while len(self.actors) < self.max_workers and not self.unplaced() and \
                self._fits(self.ray.available_resources()):
            index = self._next_index
            self._next_index += 1
            actor = self._actor_class.options(num_cpus=self.options.num_cpus, num_gpus=self.options.num_gpus,
                                              resources=self.options.resources or None,
                                              max_restarts=0).remote()
            self._unplaced[index] = actor.node_id.remote()
            self.actors[index] = (actor, actor.run.remote(self.address, self.token, index, self.env,
                                                          self.options.slowdown))
            started += 1
            # The loop looks again only once Ray has placed it (resources reserved): usually a later
            # poll, so the driver's loop (reaping, commits, progress) is never held waiting here.
        return started

    def tend(self, master) -> None:
        """Reap ended actors, start new ones where there is room, run the hook.

        Raises:
            WorkersGone: ``max_failures_without_progress`` actors failed while the job made no step.
        """
        self.reap()
        if master.step != self._progress:
            self._progress, self._failures_at_progress = master.step, len(self.failures)
        elif len(self.failures) - self._failures_at_progress >= self.max_failures_without_progress:
            raise WorkersGone(f"{len(self.failures) - self._failures_at_progress} worker actors failed without "
                              f"progress; the last one: {self.failures[-1]}")
        self.grow()
        if self.hook is not None:
            self.hook(self, master)

    def stop(self) -> None:
        for actor, _ in self.actors.values():
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors.clear()
        self._unplaced.clear()


def train_ray(spec: JobSpec, steps: int, checkpoint_dir: Optional[Path], checkpoint_every: Optional[int],
              callbacks: Sequence[Callback] = (), address: Optional[str] = None,
              worker_options: Optional[RayWorkerOptions] = None, max_workers: Optional[int] = None,
              poll_s: float = 1.0, ray_init_kwargs: Optional[dict] = None, fleet_hook=None,
              max_failures_without_progress: int = 5, code: Optional[CodePackage] = None) -> TrainResult:
    """Train on a Ray cluster (``address=None`` starts a local Ray instance).

    ``code``: the job's code, fetched by every actor from the master (default: the launching
    script's folder, if any), so nodes need only vnodes and the job's dependencies installed.
    """
    ray = _import_ray()
    options = worker_options or RayWorkerOptions()
    if code is None:  # before Ray starts: a folder past the cap fails at once
        code = package_for_script(exclude=[checkpoint_dir] if checkpoint_dir is not None else [])
    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            ray.init(address=address, **(ray_init_kwargs or {}))
            stack.callback(ray.shutdown)
        run_dir = open_run_dir(stack, checkpoint_dir)
        # A cluster spanning machines reaches the master on this node's address.
        single_host = len({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}) <= 1
        host = "127.0.0.1" if single_host else ray.util.get_node_ip_address()
        token = secrets.token_hex(16)  # even on one machine: only this job's actors may join it
        handle = start_master(spec, steps, run_dir, checkpoint_every=checkpoint_every or 0, expected_workers=1,
                              await_holders=False,
                              host=host, token=token, start_grace_s=0, code=code)
        stack.callback(handle.stop)
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        for name in ("VNODES_HANG_TIMEOUT", "VNODES_MASTER_TIMEOUT"):  # actors start from the raylet's environment
            if name in os.environ:
                env[name] = os.environ[name]
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file and launching_script() is None:  # run with -m: not shipped, found by path
            env["VNODES_MAIN_FILE"] = os.path.abspath(main_file)
        if options.num_gpus is None:
            options = dataclasses.replace(options, num_gpus=1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
        fleet = RayFleet(handle.address, token, options, max_workers or spec.virtual_nodes, env, poll_s=poll_s,
                         hook=fleet_hook, max_failures_without_progress=max_failures_without_progress)
        stack.callback(fleet.stop)
        master = handle.master
        start = master.step
        state = RunState(step=start, steps=steps, start_step=start, samples_per_step=spec.global_batch_size)
        t0 = time.perf_counter()
        drive(master, fleet, callbacks, state, run_dir)
        handle.wait_for_end()  # before the actors are killed (and the master stops): each hears the end
        return job_result(master, spec, run_dir, checkpoint_dir is not None, start, steps, t0)
