"""The cluster simulator: placement, the clock, resize costs, metrics, fidelity to Pollux's Tiresias,
and the ``vnodes simulate`` command line."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from vnodes.scheduler import cli
from vnodes.scheduler.cluster import apps as A
from vnodes.scheduler.cluster import policies as P
from vnodes.scheduler.cluster import simulator as S
from vnodes.scheduler.cluster.simulator import Cluster, flat_resize, place, simulate, virtualflow_resize, vnodes_resize
from vnodes.scheduler.cluster.workload import TraceJob, load_workload, pollux_workloads

VF_12JPH = A.TRACES_DIR / "virtualflow" / "medium20_12jph.json"
PUBLISHED_TIRESIAS = A.TRACES_DIR / "pollux" / "published" / "tiresias-1.0.json"


class Linear:
    """A job profile whose step takes ``work_s / gpus`` seconds on any placement."""

    name = "linear"

    def __init__(self, work_s: float = 8.0):
        self.work_s = work_s

    def step_time(self, gpus_per_node, global_batch):
        return self.work_s / sum(gpus_per_node)

    def steps_to_complete(self, global_batch):
        raise AssertionError("the simulator takes the work from TraceJob.target_steps")

    def throughput(self, gpus, global_batch, gpus_per_node=4):
        return gpus / self.work_s


def trace(name, arrival=0.0, gpus=4, steps=100, virtual_nodes=None, priority=1):
    return TraceJob(name=name, arrival_s=float(arrival), application="linear", requested_gpus=gpus, global_batch=64,
                    target_steps=steps, priority=priority, virtual_nodes=virtual_nodes)


def run(jobs, policy="fifo", cluster=Cluster(1, 4), resize=flat_resize(30), on_events=False, work_s=8.0):
    return simulate(jobs, policy, cluster, resize, profiles={"linear": Linear(work_s)}, on_events=on_events)


@pytest.fixture
def scripted(monkeypatch):
    """An elastic policy ``"scripted"`` that gives each job ``schedule[name](now)`` GPUs."""
    schedule = {}

    def policy(snapshot, state):
        return {j.name: schedule[j.name](snapshot.now_s) for j in snapshot.jobs}, state

    monkeypatch.setitem(P.POLICIES, "scripted", policy)
    monkeypatch.setattr(S, "ELASTIC", S.ELASTIC | {"scripted"})
    return schedule


# ---- placement ------------------------------------------------------------------------------------

@pytest.mark.parametrize("free,held,count,expected_held,expected_free", [
    pytest.param([4, 4, 4, 4], [0, 0, 0, 0], 8, [4, 4, 0, 0], [0, 0, 4, 4], id="consolidated on whole free nodes"),
    pytest.param([1, 2, 1, 3], [0, 0, 0, 0], 5, [0, 2, 0, 3], [1, 0, 1, 0], id="scattered: most free node first"),
    pytest.param([2, 4, 1, 4], [0, 0, 1, 0], 3, [0, 1, 2, 0], [2, 3, 0, 4],
                 id="own node first, then the most free (ties: lowest index)"),
    pytest.param([0, 0, 0, 0], [3, 1, 0, 2], 4, [3, 0, 0, 1], [0, 1, 0, 1], id="shrink from the fewest first"),
    pytest.param([0, 0], [2, 2], 3, [2, 1], [0, 1], id="shrink tie: the higher index gives back"),
    pytest.param([0, 0], [2, 2], 4, [2, 2], [0, 0], id="same count: unchanged"),
])
def test_place(free, held, count, expected_held, expected_free):
    free = list(free)
    assert place(free, held, count) == expected_held
    assert free == expected_free


def test_place_refuses_more_than_is_free():
    with pytest.raises(RuntimeError, match="more GPUs than are free"):
        place([1, 0], [0, 0], 2)


# ---- one job alone: start cost + steps x step time --------------------------------------------

@pytest.mark.parametrize("resize,start_s", [(flat_resize(30), 30.0), (flat_resize(0), 0.0),
                                            (virtualflow_resize(), 88.0)])
def test_a_job_alone_finishes_at_start_cost_plus_its_steps(resize, start_s):
    result = run([trace("a", gpus=4, steps=100)], resize=resize)
    assert result.jobs[0].finished_s == pytest.approx(start_s + 100 * 8.0 / 4)
    assert result.metrics()["ftf_mean"] == pytest.approx(1.0)


def test_a_pollux_job_alone_matches_its_profile():
    apps = A.load_pollux_applications()
    job = TraceJob("cifar10-0", 0.0, "cifar10", 4, 512, apps["cifar10"].steps_to_complete(512))
    result = simulate([job], "tiresias", Cluster(), flat_resize(30), apps)
    expected = 30 + job.target_steps * apps["cifar10"].step_time((4,), 512)
    assert result.jcts() == {"cifar10-0": pytest.approx(expected)}
    assert result.metrics()["ftf_mean"] == pytest.approx(1.0)


def test_an_arrival_waits_for_the_next_interval_unless_on_events():
    job = trace("a", arrival=10, gpus=4, steps=100)
    assert run([job]).jcts()["a"] == pytest.approx(60 - 10 + 30 + 200)
    assert run([job], on_events=True).jcts()["a"] == pytest.approx(30 + 200)


def test_on_events_decides_at_every_arrival_and_completion():
    jobs = [trace("a", 0, gpus=4, steps=10), trace("b", 7, gpus=4, steps=10)]  # a ends at 30 + 20 = 50
    events = [t for t, _, _ in run(jobs, on_events=True).timeline]
    assert 7.0 in events and 50.0 in events
    assert [t for t, _, _ in run(jobs).timeline] == [0.0, 60.0]  # b starts at 60, ends at 110


# ---- resize costs ---------------------------------------------------------------------------------

def grow_at(t, before, after):
    return lambda now: before if now < t else after


@pytest.mark.parametrize("resize,schedule,finished_s", [
    # flat: every start and every resize stalls 30 s on the new GPUs. 2 GPUs: 4 s/step, 4 GPUs: 2 s/step.
    pytest.param(flat_resize(30), grow_at(60, 2, 4), 90 + (100 - 30 / 4) * 2, id="flat grow"),
    pytest.param(flat_resize(30), grow_at(60, 4, 2), 90 + (100 - 30 / 2) * 4, id="flat shrink"),
    # vnodes: start 20 s; a grow trains on at 2 GPUs while the joiners start (20 s), then pauses 0.05 s.
    pytest.param(vnodes_resize(startup_s=20, bandwidth=0), grow_at(60, 2, 4),
                 80.05 + (100 - 40 / 4 - 20 / 4) * 2, id="vnodes grow"),
    pytest.param(vnodes_resize(startup_s=20, bandwidth=0), grow_at(60, 4, 2),
                 60.13 + (100 - 40 / 2) * 4, id="vnodes shrink: 0.13 s"),
    # VirtualFlow: start 88 s; a grow trains on for 70 s, then pauses 2 s.
    pytest.param(virtualflow_resize(), grow_at(120, 2, 4), 192 + (100 - 32 / 4 - 70 / 4) * 2,
                 id="virtualflow grow"),
])
def test_resize_costs(scripted, resize, schedule, finished_s):
    scripted["a"] = schedule
    result = run([trace("a", gpus=2, steps=100, virtual_nodes=4)], policy="scripted", resize=resize)
    job = result.jobs[0]
    assert job.finished_s == pytest.approx(finished_s)
    assert (job.resizes, job.preemptions) == (1, 0)


def test_vnodes_grow_transfers_the_model_state(scripted):
    scripted["a"] = grow_at(60, 2, 4)
    resize = vnodes_resize(startup_s=20, bandwidth=1e9)
    transfer_s = S.DEFAULT_PARAMS * 4 * 3 / 1e9  # weights and two optimizer slots in float32
    assert resize.transfer_s("linear") == pytest.approx(transfer_s)
    job = run([trace("a", gpus=2, steps=100, virtual_nodes=4)], policy="scripted", resize=resize).jobs[0]
    assert job.finished_s == pytest.approx(80.05 + transfer_s + (100 - 15) * 2)


def test_a_preempted_job_resumes_like_a_start(scripted):
    scripted["a"] = lambda now: 0 if 60 <= now < 120 else 4
    job = run([trace("a", gpus=4, steps=100, virtual_nodes=4)], policy="scripted").jobs[0]
    assert job.finished_s == pytest.approx(150 + (100 - 15) * 2)  # 30..60 at 2 s/step; resumes 120 + 30
    assert (job.resizes, job.preemptions) == (0, 1)


def test_the_policy_sees_the_resize_cost(scripted, monkeypatch):
    seen = []
    scripted["a"] = lambda now: 4
    inner = P.POLICIES["scripted"]

    def watching(snapshot, state):
        seen.append((snapshot.resize_s, snapshot.join_s, snapshot.jobs[0].resize_s))
        return inner(snapshot, state)

    monkeypatch.setitem(P.POLICIES, "scripted", watching)
    run([trace("a", gpus=4, steps=10, virtual_nodes=4)], policy="scripted", resize=virtualflow_resize())
    assert seen and set(seen) == {(2.0, 70.0, 2.0)}  # the pause, the joiners' start-up, no transfer here
    seen.clear()
    resize = vnodes_resize()
    run([trace("a", gpus=4, steps=10, virtual_nodes=4)], policy="scripted", resize=resize)
    assert seen and set(seen) == {(0.05, resize.join_s, 0.05 + resize.transfer_s("linear"))}


# ---- metrics --------------------------------------------------------------------------------------

def test_metrics_of_three_jobs_in_a_row():
    """fifo, one node: each job needs the whole node for 30 + 100 s; they run one after another."""
    jobs = [trace(name, 0, gpus=4, steps=100, virtual_nodes=4) for name in "abc"]
    m = run(jobs, on_events=True, work_s=4.0).metrics()
    assert m["jcts"] == {"a": pytest.approx(130), "b": pytest.approx(260), "c": pytest.approx(390)}
    assert m["avg_jct_s"] == pytest.approx(260) and m["median_jct_s"] == pytest.approx(260)
    assert m["p99_jct_s"] == pytest.approx(float(np.percentile([130, 260, 390], 99)))
    assert m["makespan_s"] == pytest.approx(390)
    assert m["utilization"] == pytest.approx(3 * 4 * 100 / (4 * 390))
    assert (m["ftf_mean"], m["ftf_max"]) == (pytest.approx(2.0), pytest.approx(3.0))
    assert (m["resizes_per_job"], m["preemptions_per_job"], m["jobs"], m["gpus"]) == (0.0, 0.0, 3, 4)


def test_metrics_are_sane_on_a_virtualflow_trace():
    jobs = load_workload(VF_12JPH)
    for policy in P.POLICIES:
        m = simulate(jobs, policy, Cluster.of(8), flat_resize(30), on_events=True).metrics()
        assert 0 < m["utilization"] <= 1, policy
        assert 0 < m["ftf_mean"] <= m["ftf_max"], policy
        assert m["median_jct_s"] <= m["p99_jct_s"] <= max(m["jcts"].values()), policy
        assert len(m["jcts"]) == 20 and m["avg_jct_s"] == pytest.approx(np.mean(list(m["jcts"].values())))


# ---- fidelity: Pollux's Tiresias+TunedJobs on workload-6 ----------------------------------------

def test_tiresias_reproduces_pollux_published_workload_6():
    published = json.loads(PUBLISHED_TIRESIAS.read_text())["jcts"]["workload-6"]
    apps = A.load_pollux_applications()
    result = simulate(load_workload(pollux_workloads()[5], apps), "tiresias", Cluster(), flat_resize(30), apps)
    ours = result.jcts()
    assert set(ours) == set(published)
    published_avg = sum(published.values()) / len(published)
    assert published_avg == pytest.approx(3469.69, abs=0.01)
    assert result.metrics()["avg_jct_s"] == pytest.approx(published_avg, rel=0.05)
    relative = np.array([ours[k] / published[k] - 1 for k in published])
    assert np.median(np.abs(relative)) < 0.05  # most jobs within a few percent (Pollux rounds epochs up)
    for name in ("cifar10-0", "deepspeech2-2", "bert-4", "ncf-6"):  # early jobs, before queues diverge
        assert ours[name] == pytest.approx(published[name], rel=0.05), name


# ---- vnodes simulate ------------------------------------------------------------------------------

def simulate_cli(capsys, *args):
    code = cli.main(["simulate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json(capsys):
    code, out, err = simulate_cli(capsys, VF_12JPH, "--json")
    assert code == 0, err
    doc = json.loads(out)
    for key in ("avg_jct_s", "p99_jct_s", "makespan_s", "utilization", "median_jct_s", "ftf_mean",
                "resizes_per_job", "preemptions_per_job"):
        assert isinstance(doc[key], float) and math.isfinite(doc[key]), key
    assert len(doc["jcts"]) == 20 and all(v > 0 for v in doc["jcts"].values())
    assert doc["avg_jct_s"] == pytest.approx(np.mean(list(doc["jcts"].values())))
    assert (doc["policy"], doc["resize_model"], doc["gpus"], doc["on_events"]) == ("vnodes", "vnodes", 8, True)
    expected = simulate(load_workload(VF_12JPH), "vnodes", Cluster.of(8), vnodes_resize(), on_events=True)
    assert doc["avg_jct_s"] == pytest.approx(expected.metrics()["avg_jct_s"])


@pytest.mark.parametrize("policy,cost,resize_model", [
    ("wfs", None, "virtualflow"), ("priority", None, "flat 30 s"), ("vnodes", "12", "flat 12 s"),
    ("wfs", "0", "flat 0 s"),
])
def test_cli_resize_model_defaults(capsys, policy, cost, resize_model):
    flags = ["--policy", policy] + (["--resize-cost", cost] if cost else [])
    code, out, err = simulate_cli(capsys, VF_12JPH, "--json", *flags)
    assert code == 0, err
    assert json.loads(out)["resize_model"] == resize_model


def test_cli_pollux_csv_defaults_to_64_gpus_and_the_interval(capsys, tmp_path):
    workload = tmp_path / "tiny.csv"
    workload.write_text("name,time,application,num_replicas,batch_size\n"
                        "cifar10-0,0,cifar10,4,512\nncf-1,30,ncf,2,1024\n")
    code, out, err = simulate_cli(capsys, workload, "--json", "--policy", "tiresias")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["gpus"], doc["nodes"], doc["on_events"], doc["resize_model"]) == (64, 16, False, "flat 30 s")
    assert set(doc["jcts"]) == {"cifar10-0", "ncf-1"}


def test_cli_all_policies_table_and_outputs(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, err = simulate_cli(capsys, VF_12JPH, "--policy", "all", "--out", tmp_path / "sim")
    assert code == 0, err
    for name in P.POLICIES:
        assert re.search(rf"^\S {name} ", out, re.M), name
    doc = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert list(doc["policies"]) == list(P.POLICIES)
    for png in ("jct_cdf.png", "gpus_in_use.png"):
        assert (tmp_path / "sim" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,words", [
    pytest.param([VF_12JPH, "--policy", "sjf"], ["--policy 'sjf'", "fifo, priority, tiresias, wfs, vnodes"],
                 id="unknown policy"),
    pytest.param([VF_12JPH, "--gpus", "0"], ["--gpus 0", "not positive"], id="gpus zero"),
    pytest.param([VF_12JPH, "--gpus", "-8"], ["--gpus -8", "not positive"], id="gpus negative"),
    pytest.param([VF_12JPH, "--gpus", "10"], ["--gpus 10", "multiple of 4", "--gpus 12"], id="gpus not x4"),
    pytest.param([VF_12JPH, "--gpus", "eight"], ["--gpus 'eight'", "whole number"], id="gpus not a number"),
    pytest.param([VF_12JPH, "--gpus", "4"], ["asks for 8 GPUs", "--gpus 4", "--gpus 8"], id="job too big"),
    pytest.param([VF_12JPH, "--resize-cost", "-1"], ["--resize-cost '-1'", ">= 0"], id="negative cost"),
    pytest.param([A.TRACES_DIR / "virtualflow" / "3jobs_4gpus_v1.json"], ["no profile named", "durations.csv"],
                 id="no duration known"),
    pytest.param([A.TRACES_DIR / "virtualflow" / "durations.csv"], ["missing column"], id="not a workload"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, args, words):
    code, out, err = simulate_cli(capsys, *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vnodes: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_cli_missing_workload_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nope.csv"
    out = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "simulate", str(missing), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0], out.stderr
