"""Which device each worker gets: the launcher's assignment and a worker's own resolution, as pure
functions (tables), and the refusals a user sees before anything starts. Real CUDA: benchmarks/gpu.py."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vnodes.runtime.devices import choose_device
from vnodes.runtime.errors import InvalidJobSpec
from vnodes.scheduler.devices import assign_devices, parse_device_list
from vnodes.scheduler.errors import DevicesUnavailable


@pytest.mark.parametrize("workers,visible,requested,share,job,expected", [
    (4, 8, None, False, None, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),  # worker i on cuda:i
    (8, 8, None, False, "cuda", [f"cuda:{i}" for i in range(8)]),
    (2, 8, [0, 2], False, None, ["cuda:0", "cuda:2"]),  # --devices 0,2
    (2, 8, [5, 1], False, None, ["cuda:5", "cuda:1"]),  # in the order given
    (3, 8, [0, 2, 4, 6], False, None, ["cuda:0", "cuda:2", "cuda:4"]),
    (4, 2, None, True, None, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),  # --share-devices: i mod G
    (3, 8, [6], True, None, ["cuda:6"] * 3),
    (3, 0, None, False, None, ["cpu"] * 3),  # no GPU: the CPU
    (3, 8, None, False, "cpu", ["cpu"] * 3),  # the job's device fixes the type
    (1, 8, None, False, "cuda:3", ["cuda:3"]),  # the job's index, for its one worker
    (2, 4, None, True, "cuda:3", ["cuda:3", "cuda:3"]),
    (2, 4, [0, 1], False, "cuda:3", ["cuda:0", "cuda:1"]),  # --devices wins over the job's index
])
def test_assign_devices(workers, visible, requested, share, job, expected):
    assert assign_devices(workers, visible, requested, share, job) == expected


@pytest.mark.parametrize("workers,visible,requested,share,job,says", [
    (4, 2, None, False, None, ["--workers 4", "2 are available", "--share-devices", "at most --workers 2"]),
    (3, 8, [0, 2], False, None, ["--workers 3", "2 are available", "--devices 0,2", "--share-devices"]),
    (2, 4, None, False, "cuda:3", ["--workers 2", "1 are available", "the job's device 'cuda:3'", "--share-devices"]),
    (2, 2, [0, 2], False, None, ["--devices 0,2", "no device 2", "2 GPU(s)", "CUDA_VISIBLE_DEVICES"]),
    (2, 4, [1, 1], False, None, ["names 1 more than once", "--share-devices"]),
    (2, 4, [], False, None, ["--devices is empty"]),
    (2, 0, [0], False, None, ["--devices 0", "sees none", "CUDA_VISIBLE_DEVICES"]),
    (2, 0, None, False, "cuda", ["'cuda'", "sees none"]),
    (2, 4, [0], False, "cpu", ["--devices 0", "'cpu'", "--set device=cuda"]),
])
def test_assign_devices_refuses_naming_the_numbers_and_the_fix(workers, visible, requested, share, job, says):
    with pytest.raises(DevicesUnavailable) as info:
        assign_devices(workers, visible, requested, share, job)
    assert [s for s in says if s not in str(info.value)] == []


@pytest.mark.parametrize("job,own,count,local,expected", [
    (None, None, 0, 0, "cpu"),  # no CUDA here
    (None, None, 2, 0, "cuda:0"),  # CUDA here: the local device, indexed
    (None, None, 4, 3, "cuda:3"),  # LOCAL_RANK=3
    ("cuda", None, 4, 2, "cuda:2"),  # a bare "cuda" is the worker's local device
    ("cuda", "cuda:1", 4, 2, "cuda:1"),  # ...its launch assignment first
    (None, "cuda:1", 4, 0, "cuda:1"),
    (None, "cuda", 4, 2, "cuda:2"),
    ("cuda:3", None, 4, 0, "cuda:3"),  # the job's index, without one of the worker's own
    ("cuda:3", "cuda:1", 4, 0, "cuda:1"),  # the launcher's assignment wins over the job's index
    ("cpu", "cuda:1", 4, 0, "cpu"),  # the job's device type is honoured by every worker
    ("cpu", None, 4, 0, "cpu"),
    ("cuda", "cpu", 4, 1, "cuda:1"),
    (None, "cpu", 4, 0, "cpu"),
])
def test_choose_device(job, own, count, local, expected):
    assert choose_device(job, own, count, local) == expected


@pytest.mark.parametrize("job,own,count,local,setting,says", [
    ("cuda", None, 0, 0, "device", "no usable CUDA device"),
    (None, "cuda:1", 0, 0, "--device", "no usable CUDA device"),
    (None, "cuda:7", 2, 0, "--device", "2 CUDA device(s)"),
    ("cuda:5", None, 2, 0, "device", "cuda:5"),
    (None, None, 2, 3, "LOCAL_RANK", "LOCAL_RANK=3"),
    ("gpu", None, 2, 0, "device", "not a device"),
    (None, "meta", 2, 0, "--device", "cpu, cuda or cuda:K"),
])
def test_choose_device_refuses_a_device_this_machine_lacks(job, own, count, local, setting, says):
    with pytest.raises(InvalidJobSpec) as info:
        choose_device(job, own, count, local)
    assert info.value.field == setting and says in str(info.value)


def test_device_lists_parse_and_refuse_what_is_not_one():
    assert parse_device_list("0,2") == [0, 2]
    assert parse_device_list("3") == [3]
    assert parse_device_list("cuda:1, cuda:0") == [1, 0]
    for bad in ("", "a", "0,,1", "-1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_device_list(bad)


JOB = f"{Path(__file__).parent / 'jobs.py'}:det_f32_spec"


def vnodes(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,says", [
    # No GPU here: refused before anything starts.
    (("--workers", "2", "--devices", "0", "--set", "device=none"), ["--devices 0", "sees none"]),
    (("--devices", "0", "--set", "device=none"), ["--devices 0", "sees none"]),  # one worker, in this process
    (("--workers", "2", "--devices", "0"), ["--devices 0", "the job's device is 'cpu'", "--set device=cuda"]),
    (("--workers", "2", "--devices", "x"), ["--devices", "not a list of GPU numbers"]),
])
def test_run_refuses_devices_it_cannot_give(args, says):
    out = vnodes("run", JOB, "--steps", "1", "--no-progress", *args)
    assert out.returncode == 2, out.stderr
    assert [s for s in says if s not in out.stderr] == [], out.stderr
    assert "Traceback" not in out.stderr
