"""Cluster traces and application profiles: loaders, step times, work (pure, fast)."""

import csv
import json

import pytest

from vnodes.scheduler.cluster import apps as A
from vnodes.scheduler.cluster.workload import TraceJob, load_workload, pollux_workloads

POLLUX_APPS = ("bert", "cifar10", "deepspeech2", "imagenet", "ncf", "yolov3")
VF_DIR = A.TRACES_DIR / "virtualflow"


@pytest.fixture(scope="module")
def applications():
    return A.load_applications()


@pytest.fixture(scope="module")
def pollux(applications):
    return {name: applications[name] for name in POLLUX_APPS}


def placements_rows(app):
    with open(A.POLLUX_APPLICATIONS_DIR / app / "placements.csv", newline="") as f:
        return [(tuple(int(c) for c in r["placement"]), int(r["local_bsz"]),
                 float(r["step_time"]), float(r["sync_time"])) for r in csv.DictReader(f)]


# ---- loaders on the real traces ------------------------------------------------------------

def test_pollux_workloads_load_typed(pollux):
    seen_apps = set()
    for path in pollux_workloads():
        jobs = load_workload(path, pollux)
        assert len(jobs) == 160, path
        assert len({j.name for j in jobs}) == 160
        assert [j.arrival_s for j in jobs] == sorted(j.arrival_s for j in jobs)
        for j in jobs:
            assert type(j.arrival_s) is float and type(j.requested_gpus) is int
            assert type(j.global_batch) is int and type(j.target_steps) is int
            assert j.priority == 1 and j.virtual_nodes is None
            assert j.target_steps == pollux[j.application].steps_to_complete(j.global_batch)
            seen_apps.add(j.application)
    assert seen_apps == set(POLLUX_APPS)


def test_pollux_row_matches_csv(pollux):
    path = pollux_workloads()[0]
    with open(path, newline="") as f:
        first = next(csv.DictReader(f))
    job = next(j for j in load_workload(path, pollux) if j.name == first["name"])
    assert (job.arrival_s, job.application, job.requested_gpus, job.global_batch) == (
        float(first["time"]), first["application"], int(first["num_replicas"]),
        int(first["batch_size"]))


def test_virtualflow_medium20_12jph(applications):
    jobs = load_workload(VF_DIR / "medium20_12jph.json")
    assert len(jobs) == 20
    first = jobs[0]
    assert first == TraceJob(name="resnet-0", arrival_s=1.0,
                             application="vf-resnet-imagenet-8gpu-2048bs-1vn-2ep",
                             requested_gpus=8, global_batch=2048,
                             target_steps=2 * (1_281_167 // 2048), priority=5, virtual_nodes=8)
    assert {j.priority for j in jobs} == {1, 5, 10}
    # every job of the 12 jobs/hour trace was measured by VirtualFlow's priority run
    profiles = [A.application_for(j, applications) for j in jobs]
    assert {p.duration_source for p in profiles} == {"measured"}
    bert = next(j for j in jobs if j.name == "bert-3")  # CoLA, 10 epochs of 8,551 at 16
    assert bert.target_steps == 10 * int(8551 / 16) and bert.virtual_nodes == 2
    transformer = next(j for j in jobs if j.name == "transformer-1")
    assert transformer.target_steps == 1000 and transformer.virtual_nodes == 8


def test_virtualflow_10jph_and_3jobs(applications):
    jobs = load_workload(VF_DIR / "medium20_10jph.json")
    assert len(jobs) == 20
    sources = [A.application_for(j, applications).duration_source for j in jobs]
    assert sources.count("measured") == 11 and sources.count("estimate") == 9
    three = load_workload(VF_DIR / "3jobs_4gpus_v1.json")
    # bert: num_steps is steps per epoch (run_classifier.py): 105 x 10 epochs
    assert [j.target_steps for j in three] == [1050, 100 * (50_000 // 128), 327 * 15]
    with pytest.raises(ValueError, match="durations.csv"):
        A.application_for(three[0], applications)


# ---- malformed input -----------------------------------------------------------------------

GOOD_ROW = "cifar10-0,0,cifar10,8,2048"


@pytest.mark.parametrize("text, message", [
    ("name,time,application,batch_size\nx,0,cifar10,2048\n", r"missing column.*num_replicas"),
    ("name,time,application,num_replicas,batch_size\n" + "x,0,cifar10,eight,2048\n",
     r":2: field 'num_replicas' = 'eight' is not a positive integer"),
    ("name,time,application,num_replicas,batch_size\n" + "x,0,cifar10,0,2048\n",
     r":2: field 'num_replicas' = '0'"),
    ("name,time,application,num_replicas,batch_size\n" + "x,-5,cifar10,8,2048\n",
     r":2: field 'time' = '-5'"),
    ("name,time,application,num_replicas,batch_size\n" + "x,0,resnet,8,2048\n",
     r":2: field 'application' = 'resnet' is unknown; expected one of \['bert'"),
    ("name,time,application,num_replicas,batch_size\n" + GOOD_ROW + "\n" + GOOD_ROW + "\n",
     r":3: job name 'cifar10-0' appears twice"),
    ("name,time,application,num_replicas,batch_size\n" + "x,0,bert,8,5000\n",
     r":2: field 'batch_size' = 5000.*outside the validated batch sizes 12..384"),
    ("name,time,application,num_replicas,batch_size\n" + "x,0,cifar10,8\n",
     r":2: expected 5 fields"),
    ("name,time,application,num_replicas,batch_size\n", r"no jobs after the header"),
])
def test_malformed_pollux_csv(tmp_path, pollux, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_workload(path, pollux)
    assert str(path) in str(info.value)


GOOD_JOB = {"arrival_time": 1, "workload": "resnet", "priority": 5, "gpu_demand": 8,
            "batch_size": 2048, "num_epochs": 2, "dataset": "imagenet"}


@pytest.mark.parametrize("change, message", [
    ({"workload": "gpt"}, r"job #0: field 'workload' = 'gpt' is unknown"),
    ({"gpu_demand": None}, r"job #0: field 'gpu_demand' = None must be a positive integer"),
    ({"batch_size": "2048"}, r"job #0: field 'batch_size' = '2048'"),
    ({"arrival_time": -1}, r"job #0: field 'arrival_time' = -1"),
    ({"priority": True}, r"job #0: field 'priority' = True"),
    ({"dataset": "mnist"}, r"job #0: unknown resnet dataset/task 'mnist'"),
    ({"num_epochs": None}, r"job #0: a resnet job needs num_epochs or num_steps"),
])
def test_malformed_virtualflow_job(tmp_path, change, message):
    entry = {k: v for k, v in {**GOOD_JOB, **change}.items() if v is not None}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message):
        load_workload(path)


@pytest.mark.parametrize("text, message", [
    ("[{\"arrival_time\": 1,}]", r"bad.json:1: not valid JSON"),
    ("{\"jobs\": []}", r"expected a non-empty JSON list of job objects, got dict"),
    ("[3]", r"job #0: expected a JSON object, got int"),
])
def test_malformed_virtualflow_file(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_workload(path)


def test_unknown_format(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"trace.txt: unknown trace format '.txt'"):
        load_workload(path)


def test_trace_job_validates():
    with pytest.raises(ValueError, match="requested_gpus must be a positive integer, got 0"):
        TraceJob("j", 0.0, "cifar10", requested_gpus=0, global_batch=64, target_steps=1)
    with pytest.raises(ValueError, match="virtual_nodes must be an integer >= requested_gpus"):
        TraceJob("j", 0.0, "cifar10", 4, 64, 1, virtual_nodes=2)


# ---- Pollux step times ---------------------------------------------------------------------

@pytest.mark.parametrize("app", POLLUX_APPS)
def test_measured_step_equals_placements_csv(pollux, app):
    model = pollux[app]
    for placement, bsz, step, sync in placements_rows(app):
        assert model.measured_step(placement, bsz) == (step, sync)


def test_step_time_at_measured_points(pollux):
    # global = local x GPUs with no accumulation: the iteration time is the measured step time
    for app in POLLUX_APPS:
        model = pollux[app]
        checked = 0
        for placement, bsz, step, _ in placements_rows(app):
            gpus = sum(placement)
            if gpus > 1 and bsz <= model.max_local_bsz and bsz * gpus <= model.max_batch_size:
                assert model.micro_batches(gpus, bsz * gpus) == (bsz, 0)
                assert model.step_time(placement, bsz * gpus) == step
                checked += 1
        assert checked > 50, app


def test_placement_rotation_and_empty_nodes(pollux):
    cifar = pollux["cifar10"]
    # placements.csv writes (4, 2) as its smallest rotation "24"; empty nodes are dropped
    assert cifar.step_time((4, 2), 2048) == cifar.step_time((2, 4), 2048)
    assert cifar.step_time((4, 0, 2), 2048) == cifar.step_time((2, 4), 2048)
    assert cifar.step_time((2, 1, 1), 1024) == cifar.step_time((1, 1, 2), 1024)
    with pytest.raises(ValueError, match="places no GPU"):
        cifar.step_time((0, 0), 2048)
    with pytest.raises(ValueError, match="non-negative integers"):
        cifar.step_time((2, -1), 2048)


def test_step_time_between_measured_points(pollux):
    cifar = pollux["cifar10"]
    rows = sorted((b, s) for p, b, s, _ in placements_rows("cifar10") if p == (4, 4))
    pairs = [(lo, hi) for lo, hi in zip(rows, rows[1:]) if hi[0] * 8 <= cifar.max_batch_size]
    assert len(pairs) >= 5
    for (b0, s0), (b1, s1) in pairs:
        mid = (b0 + b1) // 2
        t = cifar.step_time((4, 4), mid * 8)
        assert min(s0, s1) <= t <= max(s0, s1)
        if b1 - b0 > 1:  # linear in the local batch, as Pollux's interp1d
            assert t == pytest.approx(s0 + (s1 - s0) * (mid - b0) / (b1 - b0), rel=1e-12)


def test_step_time_beyond_four_nodes_is_interpolated(pollux):
    imagenet = pollux["imagenet"]
    grid = {}
    with open(A.POLLUX_APPLICATIONS_DIR / "imagenet" / "scalability.csv", newline="") as f:
        for r in csv.DictReader(f):
            grid[(int(r["num_nodes"]), int(r["num_replicas"]), int(r["local_bsz"]))] = \
                float(r["step_time"])
    # 6 whole nodes, 24 GPUs, local batch 134: between the measured 115 and 163 on that grid line
    t = imagenet.step_time((4,) * 6, 3200)
    assert min(grid[6, 24, 115], grid[6, 24, 163]) <= t <= max(grid[6, 24, 115], grid[6, 24, 163])
    # at a grid point exactly
    assert imagenet.step_time((4,) * 6, 24 * 163) == pytest.approx(grid[6, 24, 163], rel=1e-9)
    # more GPUs on the same batch: faster steps
    assert imagenet.step_time((4,) * 12, 6400) < imagenet.step_time((4,) * 8, 6400)


def test_accumulation_beyond_max_local_batch(pollux):
    yolo = pollux["yolov3"]  # Pollux caps its local batch at 8
    assert yolo.max_local_bsz == 8
    assert yolo.micro_batches(4, 32) == (8, 0)
    assert yolo.micro_batches(4, 64) == (8, 1)
    step, sync = yolo.measured_step((4,), 8)
    assert yolo.step_time((4,), 32) == step
    assert yolo.step_time((4,), 64) == pytest.approx(step + (step - sync))
    assert yolo.micro_batches(4, 96) == (8, 2)
    assert yolo.step_time((4,), 96) == pytest.approx(step + 2 * (step - sync))
    bert = pollux["bert"]  # 384 on 8 GPUs: 48 per GPU as 4 micro-batches of 12
    assert bert.micro_batches(8, 384) == (12, 3)


def test_single_gpu_quirk(pollux):
    # Pollux makes a 1-GPU job above the initial batch accumulate at least once
    ncf = pollux["ncf"]
    assert ncf.micro_batches(1, 32768) == (16384, 1)
    assert ncf.micro_batches(1, 256) == (256, 0)
    assert ncf.micro_batches(2, 32768) == (16384, 0)


def test_too_many_gpus_for_the_batch(pollux):
    cifar = pollux["cifar10"]
    assert cifar.max_gpus(2048) == 64
    with pytest.raises(ValueError, match=r"outside the measured range \[32, 1024\]"):
        cifar.step_time((4,), 64)
    with pytest.raises(ValueError, match="exceeds the largest validated batch size 4096"):
        cifar.step_time((4, 4), 8192)


def test_throughput_uses_consolidated_placement(pollux):
    assert A.consolidated_placement(10) == (4, 4, 2)
    assert A.consolidated_placement(8, gpus_per_node=8) == (8,)
    with pytest.raises(ValueError, match="gpus must be a positive integer"):
        A.consolidated_placement(0)
    cifar = pollux["cifar10"]
    assert cifar.throughput(6, 2048) == 1.0 / cifar.step_time((4, 2), 2048)


# ---- Pollux work ---------------------------------------------------------------------------

def test_steps_to_complete_matches_validation_csv(pollux):
    for app in POLLUX_APPS:
        model = pollux[app]
        init = model.init_batch_size
        path = A.POLLUX_APPLICATIONS_DIR / app / f"validation-{init}.csv"
        with open(path, newline="") as f:
            last = list(csv.DictReader(f))[model.max_epochs - 1]
        # at the initial batch size the gain is 1: the work is the progress of the last epoch
        assert abs(model.steps_to_complete(init) - float(last["progress"])) <= 1, app
        assert abs(model.steps_to_complete(init) - int(last["iteration"])) <= 1, app
        assert model.measured_iterations(init) == int(last["iteration"])


def test_steps_to_complete_fixed_batch(pollux):
    # Values a job alone reaches in Pollux's own simulator (osdi21-artifact Job.step):
    # yolov3 64 on (4,): 14,102 s = 15,971 x 0.8829 s; cifar10 2048 on (1,): 4,693 s.
    assert pollux["yolov3"].steps_to_complete(64) == 15971
    assert pollux["cifar10"].steps_to_complete(2048) == 3344
    assert pollux["yolov3"].steps_to_complete(64) * pollux["yolov3"].step_time((4,), 64) \
        == pytest.approx(14102, rel=1e-3)
    assert pollux["cifar10"].steps_to_complete(2048) * pollux["cifar10"].step_time((1,), 2048) \
        == pytest.approx(4693, rel=1e-3)
    for app in POLLUX_APPS:
        model = pollux[app]
        sizes = model.validated_batch_sizes
        steps = [model.steps_to_complete(b) for b in sizes]
        assert steps == sorted(steps, reverse=True), app  # bigger batches: fewer steps
        for b in sizes[1:]:  # but more samples: statistical efficiency < 1
            assert model.steps_to_complete(b) * b >= model.steps_to_complete(sizes[0]) * sizes[0]
    cifar = pollux["cifar10"]
    # between validated sizes the gradient statistics are interpolated
    assert cifar.steps_to_complete(2048) < cifar.steps_to_complete(3000) * 3000 / 2048
    assert cifar.steps_to_complete(4096) < cifar.steps_to_complete(3000) \
        < cifar.steps_to_complete(2048)
    with pytest.raises(ValueError, match="outside the validated batch sizes 128..4096"):
        cifar.steps_to_complete(8192)


# ---- VirtualFlow profiles ------------------------------------------------------------------

def test_virtualflow_profile_reproduces_measured_duration(applications):
    profile = applications["vf-resnet-imagenet-8gpu-2048bs-1vn-2ep"]
    assert profile.duration_source == "measured" and profile.duration_s == 655.4
    full = profile.startup_s + profile.target_steps * profile.step_time((8,), 2048)
    assert full == pytest.approx(655.4)
    # 8 virtual nodes on 4 GPUs: two per GPU in turn; on 3 GPUs the slowest holds 3
    assert profile.step_time((4,), 2048) == pytest.approx(2 * profile.step_time((8,), 2048))
    assert profile.step_time((3,), 2048) == pytest.approx(3 * profile.step_time((8,), 2048))
    assert profile.step_time((2, 2), 2048) == profile.step_time((4,), 2048)
    assert profile.throughput(8, 2048) == pytest.approx(1 / profile.step_time((8,), 2048))
    with pytest.raises(ValueError, match="has 8 virtual nodes and cannot use 16 GPUs"):
        profile.step_time((8, 8), 2048)
    with pytest.raises(ValueError, match="measured at global batch 2048, not 4096"):
        profile.step_time((8,), 4096)


def test_virtualflow_profile_virtual_nodes_per_device(applications):
    profile = applications["vf-resnet-imagenet-2gpu-2048bs-4vn-1ep"]  # 8 VNs on 2 GPUs
    assert profile.virtual_nodes == 8 and profile.gpu_demand == 2
    assert profile.step_time((1,), 2048) == pytest.approx(2 * profile.step_time((2,), 2048))
    assert profile.step_time((8,), 2048) == pytest.approx(profile.step_time((2,), 2048) / 4)


def test_virtualflow_estimates_are_calibrated(applications):
    vf = [p for p in applications.values() if isinstance(p, A.VirtualFlowProfile)]
    assert len(vf) == 48 and sum(p.duration_source == "measured" for p in vf) == 20
    ratios = sorted(p.duration_s / (60 * est) for p, est in _estimates(vf) if
                    p.duration_source == "measured")
    median = (ratios[9] + ratios[10]) / 2
    for p, est in _estimates(vf):
        if p.duration_source == "estimate":
            assert p.duration_s == pytest.approx(60 * est * median)


def _estimates(profiles):
    with open(VF_DIR / "durations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_name = {A.virtualflow_profile_name(
        r["workload"], r["dataset"], int(r["gpu_demand"]), int(r["batch_size"]),
        int(r["num_virtual_nodes_per_device"]), int(r["num_epochs"]) if r["num_epochs"] else None,
        int(r["num_steps"]) if r["num_steps"] else None): float(r["estimate_min"]) for r in rows}
    return [(p, by_name[p.name]) for p in profiles]


def test_measured_rows_are_the_12jph_jobs():
    # measured_job is the job index in medium20_12jph: its configuration must be the row's
    trace = json.loads((VF_DIR / "medium20_12jph.json").read_text())
    with open(VF_DIR / "durations.csv", newline="") as f:
        measured = [r for r in csv.DictReader(f) if r["measured_s"]]
    assert sorted(int(r["measured_job"]) for r in measured) == list(range(20))
    for r in measured:
        job = trace[int(r["measured_job"])]
        assert (job["workload"], job.get("dataset") or job.get("glue_task", ""),
                job["gpu_demand"], job["batch_size"], job.get("num_epochs"), job.get("num_steps"),
                job.get("num_virtual_nodes_per_device", 1)) == (
            r["workload"], r["dataset"], int(r["gpu_demand"]), int(r["batch_size"]),
            int(r["num_epochs"]) if r["num_epochs"] else None,
            int(r["num_steps"]) if r["num_steps"] else None,
            int(r["num_virtual_nodes_per_device"]))
