"""What an operator sees: the master's Prometheus endpoint (scraped over HTTP while a real job runs and
loses a worker) and JSON log lines that carry the job, the membership epoch and the step."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from vnodes.runtime.logs import JsonFormatter, set_log_context  # noqa: E402

pytestmark = [pytest.mark.multiprocess]

JOB = f"{Path(__file__).parent / 'jobs.py'}:slow_det_spec"
STEPS = 80
KILLED_AT = 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vnodes(*args, env=None, **kw):
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env, **kw)


def scrape(port):
    """name -> [(labels, value)] of every sample on the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples, name, **labels):
    return next(v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items()))


def test_the_metrics_endpoint_and_json_logs_follow_a_job_that_loses_a_worker(tmp_path):
    port, metrics_port = free_port(), free_port()
    master = vnodes("--log-format", "json", "master", JOB, "--steps", str(STEPS), "--port", str(port),
                    "--run-dir", str(tmp_path), "--min-workers", "2", "--checkpoint-every", "20",
                    "--metrics-port", str(metrics_port), stdout=subprocess.PIPE, text=True)
    doomed = vnodes("worker", "--master", f"127.0.0.1:{port}", env={"VNODES_FAULT": f"reduce:{KILLED_AT}"})
    survivor = vnodes("--log-format", "json", "worker", "--master", f"127.0.0.1:{port}", stderr=subprocess.PIPE,
                      text=True)
    try:
        deadline, samples = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            try:
                samples = scrape(metrics_port)
            except OSError:  # not listening yet
                samples = {}
            if samples and value(samples, "vnodes_step") >= KILLED_AT + 5:
                break
            time.sleep(0.2)
        assert samples and value(samples, "vnodes_step") >= KILLED_AT + 5, samples
        assert value(samples, "vnodes_steps") == STEPS
        assert value(samples, "vnodes_members") == 1  # the survivor alone, after the loss
        assert value(samples, "vnodes_membership_epoch") >= 2
        assert value(samples, "vnodes_aborted_steps_total", cause="worker_lost") == 1
        assert value(samples, "vnodes_aborted_steps_total", cause="reduce_failed") == 0
        assert value(samples, "vnodes_job_state", state="running") == 1
        assert value(samples, "vnodes_step_time_seconds") > 0 and value(samples, "vnodes_samples_per_second") > 0
        (worker, rate), = [(lab["worker"], v) for lab, v in samples["vnodes_worker_throughput"]]
        assert len(worker) == 12 and rate > 0
        assert value(samples, "vnodes_workers", state="member") == 1
        assert value(samples, "vnodes_workers", state="dead") == 1
        assert value(samples, "vnodes_checkpoint_seconds_count") >= 0
        out, _ = master.communicate(timeout=120)
        assert master.returncode == 0 and f"metrics on http://127.0.0.1:{metrics_port}/metrics" in out
        _, err = survivor.communicate(timeout=60)
        assert survivor.returncode == 0
        assert doomed.wait(timeout=30) == -9
    finally:
        for p in (master, doomed, survivor):
            if p.poll() is None:
                p.kill()
                p.wait()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    failed = [r for r in records if r["level"] == "WARNING" and "reduction failed" in r["message"]]
    assert failed, records
    assert failed[0]["step"] == KILLED_AT and failed[0]["membership_epoch"] >= 1
    assert failed[0]["job"] and failed[0]["worker"] and failed[0]["logger"] == "vnodes.runtime.agent"


def test_a_json_record_carries_the_context_and_the_exception():
    import logging

    set_log_context(job="train.py:spec", membership_epoch=3, step=17)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("vnodes.x", logging.ERROR, __file__, 1, "failed at %s", ("here",),
                                   sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    set_log_context(job=None, membership_epoch=None, step=None)
    assert line["message"] == "failed at here" and line["level"] == "ERROR" and line["logger"] == "vnodes.x"
    assert (line["job"], line["membership_epoch"], line["step"]) == ("train.py:spec", 3, 17)
    assert "RuntimeError: boom" in line["exception"] and line["time"].endswith("Z")
    assert "step" not in json.loads(JsonFormatter().format(logging.LogRecord("x", 20, "", 1, "m", (), None)))


def test_a_bad_log_format_in_the_environment_is_named_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "status", "--master", "127.0.0.1:1"],
                          env={**os.environ, "VNODES_LOG_FORMAT": "yaml"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "VNODES_LOG_FORMAT='yaml'" in done.stderr and "text, json" in done.stderr
