"""The master's Prometheus endpoint: ``vnodes master --metrics-port P`` serves ``/metrics``.

Every value is read from the ``Master`` when Prometheus scrapes (a custom collector), so nothing is
updated on the step path. ``prometheus_client`` is needed only when the endpoint is asked for
(``pip install prometheus-client``, in the ``logging`` extra).

    vnodes_step                              committed steps
    vnodes_steps                             the steps the job runs to
    vnodes_step_time_seconds                 the slowest member's time of the last committed step
    vnodes_samples_per_second                global batch over the time between the last two commits
    vnodes_membership_epoch                  the membership's epoch (one per re-form)
    vnodes_members                           workers in the membership
    vnodes_workers{state}                    registered workers by state
    vnodes_aborted_steps_total{cause}        aborted step attempts by cause (master.ABORT_CAUSES)
    vnodes_worker_throughput{worker}         a member's measured virtual nodes per second
    vnodes_checkpoint_step                   the newest checkpoint's step
    vnodes_checkpoint_seconds_{count,sum}    from a CHECKPOINT plan to the worker's report of it
    vnodes_plugin_seconds_{count,sum}        the plugins' work on the master (commits, snapshots)
    vnodes_job_state{state}                  1 for the job's state
"""

from __future__ import annotations

from typing import Optional

from .errors import MasterError
from .master import ABORT_CAUSES, JobState, Master, WorkerState


class MasterCollector:
    """A ``prometheus_client`` collector of one master's state."""

    def __init__(self, master: Master, global_batch_size: int):
        self.master, self.global_batch_size = master, global_batch_size

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        m = self.master
        with m._cond:  # one consistent reading
            committed = list(m.committed)[-2:]
            membership = m.membership
            workers = list(m.workers.values())
            aborted = dict(m.aborted_by_cause)
            timings = {k: tuple(v) for k, v in m.timings.items()}
            step, steps, checkpoint_step, state = m.step, m.steps, m.checkpoint_step, m.state
            rates = {w: m.workers[w].vnode_rate for w in membership.members} if membership else {}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("vnodes_step", "Committed steps.", step)
        yield gauge("vnodes_steps", "The steps the job runs to.", steps)
        last = committed[-1] if committed else None
        yield gauge("vnodes_step_time_seconds", "The slowest member's time of the last committed step.",
                    last.step_time_s if last else 0.0)
        rate = 0.0
        if len(committed) == 2 and committed[1].committed_at_s > committed[0].committed_at_s:
            rate = self.global_batch_size / (committed[1].committed_at_s - committed[0].committed_at_s)
        yield gauge("vnodes_samples_per_second", "Global batch over the time between the last two commits.", rate)
        yield gauge("vnodes_membership_epoch", "The membership's epoch (one per re-form).",
                    membership.epoch if membership else 0)
        yield gauge("vnodes_members", "Workers in the membership.", len(membership.members) if membership else 0)
        by_state = GaugeMetricFamily("vnodes_workers", "Registered workers by state.", labels=["state"])
        for s in WorkerState:
            by_state.add_metric([s.value], sum(w.state == s for w in workers))
        yield by_state
        aborts = CounterMetricFamily("vnodes_aborted_steps", "Aborted step attempts by cause.", labels=["cause"])
        for cause in ABORT_CAUSES:
            aborts.add_metric([cause], aborted.get(cause, 0))
        yield aborts
        throughput = GaugeMetricFamily("vnodes_worker_throughput",
                                       "A member's measured virtual nodes per second.", labels=["worker"])
        for worker_id, vnode_rate in sorted(rates.items()):
            throughput.add_metric([worker_id], vnode_rate)
        yield throughput
        yield gauge("vnodes_checkpoint_step", "The newest checkpoint's step (-1: none).", checkpoint_step)
        for name, doc in (("checkpoint", "From a CHECKPOINT plan to the worker's report of it."),
                          ("plugins", "The plugins' work on the master (commits, snapshots).")):
            count, total = timings[name]
            yield SummaryMetricFamily(f"vnodes_{'plugin' if name == 'plugins' else name}_seconds", doc,
                                      count_value=count, sum_value=total)
        job_state = GaugeMetricFamily("vnodes_job_state", "1 for the job's state.", labels=["state"])
        for s in JobState:
            job_state.add_metric([s.value], float(state == s))
        yield job_state


class MetricsEndpoint:
    """``/metrics`` over HTTP for one master, on its own registry (not the process-wide one)."""

    def __init__(self, master: Master, global_batch_size: int, host: str, port: int):
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise MasterError("--metrics-port needs prometheus_client: pip install prometheus-client "
                              "(or vnodes[logging])") from None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(master, global_batch_size))
        try:
            self.server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MasterError(f"the metrics endpoint cannot listen on {host}:{port} ({exc.strerror}): pick another "
                              "--metrics-port (0 picks a free one)") from None
        self.port = self.server.server_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(master: Master, global_batch_size: int, host: str, port: Optional[int]) -> Optional[MetricsEndpoint]:
    """The endpoint, or None when no port is given."""
    return None if port is None else MetricsEndpoint(master, global_batch_size, host, port)
