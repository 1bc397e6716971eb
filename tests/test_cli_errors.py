"""Mistakes a user makes on the command line get one clear line and exit code 2, never a traceback."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

JOBS = Path(__file__).parent / "jobs.py"


def vnodes(*args, timeout=120, cwd=None):
    return subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def assert_clear_error(out, *words):
    """Exit code 2, every word in the message, and no Python traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in out.stderr, (word, out.stderr)


def job_file(tmp_path, body):
    """A job file: tests/jobs.py's spec with ``body`` appended (it may override a builder)."""
    path = tmp_path / "job.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(JOBS.parent)!r})\nfrom jobs import *\n"
                    + textwrap.dedent(body))
    return path


@pytest.mark.parametrize("flags,words", [
    (["--steps", "-1"], ["--steps", "-1", "out of range"]),
    (["--steps", "3", "--checkpoint-every", "-5"], ["--checkpoint-every", "-5", "at least 1"]),
    (["--steps", "3", "--min-workers", "0"], ["--min-workers", "0", "at least 1"]),
    (["--steps", "3", "--port", "99999"], ["--port", "99999", "between 0 and 65535"]),
    (["--steps", "3", "--start-grace", "-1"], ["--start-grace", "-1", "at least 0 seconds"]),
    (["--steps", "3", "--heartbeat-timeout", "1"], ["--heartbeat-timeout", "1", "at least 3 seconds"]),
    (["--steps", "3", "--heartbeat-timeout", "nan"], ["--heartbeat-timeout", "nan", "not a finite number of seconds"]),
    (["--steps", "3", "--start-grace", "soon"], ["--start-grace", "'soon' is not a number of seconds"]),
])
def test_master_refuses_out_of_range_numbers(tmp_path, flags, words):
    out = vnodes("master", f"{JOBS}:cnn_spec", "--run-dir", str(tmp_path), *flags, timeout=60)
    assert_clear_error(out, *words)


def test_master_beyond_loopback_without_a_token_is_refused_before_the_job_is_built(tmp_path):
    marker = tmp_path / "built"
    job = job_file(tmp_path, f"""
        def spec():
            open({str(marker)!r}, "w").close()
            return cnn_spec()
    """)
    out = vnodes("master", f"{job}:spec", "--steps", "3", "--run-dir", str(tmp_path), "--host", "0.0.0.0",
                 timeout=60)
    assert_clear_error(out, "0.0.0.0", "--token")
    assert not marker.exists()


def test_master_listens_on_ipv6_loopback(tmp_path):
    master = subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", "master", f"{JOBS}:cnn_spec",
                               "--steps", "2", "--run-dir", str(tmp_path), "--host", "::1", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = master.stdout.readline()
        assert "listening on [::1]:" in line, (line, master.stderr.read() if master.poll() is not None else "")
        address = line.split("listening on ")[1].split()[0]
        status = vnodes("status", "--master", address, "--json", timeout=60)
        assert status.returncode == 0 and '"steps": 2' in status.stdout, status.stderr
    finally:
        master.kill()
        master.wait()


def test_a_model_builder_that_raises_names_itself_and_where(tmp_path):
    job = job_file(tmp_path, """
        def broken_model():
            raise ValueError("no such layer: Conv5d")

        spec = cnn_spec(model=broken_model)
    """)
    out = vnodes("run", str(job), "--steps", "2", "--no-progress")
    assert_clear_error(out, "model builder", "broken_model", "ValueError: no such layer: Conv5d", f"{job}:")


def test_dataset_items_that_are_not_pairs_are_refused(tmp_path):
    job = job_file(tmp_path, """
        class Triples(torch.utils.data.Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, i):
                return torch.zeros(1, 8, 8), 0, "extra"

        spec = cnn_spec(dataset=Triples)
    """)
    out = vnodes("run", str(job), "--steps", "2", "--no-progress")
    assert_clear_error(out, "dataset", "(input, target)", "tuple of 3")


def test_a_device_this_machine_lacks_is_refused(tmp_path):
    out = vnodes("worker", "--master", "127.0.0.1:1", "--device", "cuda:7", timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "cuda:7" in out.stderr and ("no usable CUDA device" in out.stderr or "CUDA device(s)" in out.stderr)


@pytest.mark.slow
def test_a_worker_that_finds_no_master_says_how_long_it_tried(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    out = vnodes("worker", "--master", f"127.0.0.1:{port}", "--device", "cpu", "--connect-timeout", "6", timeout=120)
    waited = time.monotonic() - started
    assert_clear_error(out, f"127.0.0.1:{port}", "attempts", "check that it runs")
    said = int(out.stderr.split("no master answered for ")[1].split(" s")[0])
    assert 5 <= said <= waited + 1  # the whole wait, not the last attempt's


def test_a_master_of_another_protocol_version_is_named_not_a_traceback():
    """A real gRPC server on loopback that answers Register as a master of protocol 2 would."""
    from concurrent import futures

    import grpc

    from vnodes.protos import PROTOCOL_VERSION
    from vnodes.protos import vnodes_pb2 as pb

    def register(request, context):
        return pb.RegisterReply(worker_id="w", protocol_version=PROTOCOL_VERSION - 1).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "vnodes.v1.Master", {"Register": grpc.unary_unary_rpc_method_handler(register)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        out = vnodes("worker", "--master", f"127.0.0.1:{port}", "--device", "cpu", timeout=60)
    finally:
        server.stop(0)
    assert_clear_error(out, f"protocol {PROTOCOL_VERSION - 1}", f"this worker {PROTOCOL_VERSION}", "same vnodes version")


def test_a_port_in_use_is_named_with_the_fix(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = vnodes("master", f"{JOBS}:cnn_spec", "--steps", "2", "--run-dir", str(tmp_path), "--port", str(port),
                     timeout=60)
    assert_clear_error(out, f"127.0.0.1:{port}", "--port", "0 picks a free one")


def test_steps_past_what_a_step_counter_holds_are_refused(tmp_path):
    out = vnodes("master", f"{JOBS}:cnn_spec", "--steps", str(2**64), "--run-dir", str(tmp_path), timeout=60)
    assert_clear_error(out, "--steps", "out of range")
