"""A master SIGKILLed and restarted on its run directory resumes the job; workers reconnect."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vnodes.runtime import load_checkpoint, train

from jobs import det_f32_spec

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

JOB = f"{Path(__file__).parent / 'jobs.py'}:det_f32_spec"
STEPS = 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vnodes(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env, **kw)


def committed_step(run_dir):
    try:
        return json.loads((run_dir / "master.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def wait_for(predicate, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.1)


def test_master_killed_and_restarted_resumes_bitwise(tmp_path):
    reference = train(det_f32_spec(), steps=STEPS).model_state_dict
    port = free_port()
    master_cmd = ("master", JOB, "--steps", str(STEPS), "--port", str(port), "--run-dir", str(tmp_path),
                  "--min-workers", "2")
    master = vnodes(*master_cmd)
    workers = [vnodes("worker", "--master", f"127.0.0.1:{port}", "--slowdown", "15") for _ in range(2)]
    try:
        wait_for(lambda: committed_step(tmp_path) >= 6)
        master.send_signal(signal.SIGKILL)
        master.wait()
        killed_at = committed_step(tmp_path)
        time.sleep(1.0)  # workers notice and start reconnecting
        master = vnodes(*master_cmd)
        assert master.wait(timeout=180) == 0
        assert [w.wait(timeout=60) for w in workers] == [0, 0]
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.kill()
    assert 6 <= killed_at < STEPS
    final = load_checkpoint(tmp_path)
    assert final["step"] == STEPS
    for k, v in reference.items():
        assert torch.equal(final["model"][k], v), k
    assert len(final["losses"]) == STEPS


def test_master_beyond_loopback_needs_the_token(tmp_path):
    port = free_port()
    master = vnodes("master", JOB, "--steps", "4", "--port", str(port), "--run-dir", str(tmp_path),
                    "--host", "0.0.0.0", "--token", "s3cret")
    try:
        wait_for(lambda: _listening(port), timeout_s=60)
        intruder = vnodes("worker", "--master", f"127.0.0.1:{port}", stderr=subprocess.PIPE, text=True)
        _, err = intruder.communicate(timeout=60)
        assert intruder.returncode == 2 and "refused" in err and "token" in err
        finish_with_a_worker(master, "--master", f"127.0.0.1:{port}", "--token", "s3cret")
    finally:
        kill_if_running(master)
    assert load_checkpoint(tmp_path)["step"] == 4


def finish_with_a_worker(master, *worker_args):
    """A worker with these arguments runs the job to its end; both exit 0."""
    worker = vnodes("worker", *worker_args)
    assert worker.wait(timeout=120) == 0
    assert master.wait(timeout=60) == 0


def kill_if_running(process):
    if process.poll() is None:
        process.kill()


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _self_signed(tmp_path):
    """A CA-less self-signed certificate for 127.0.0.1 (generated here: nothing downloaded)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vnodes-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def test_tls_master_with_token_serves_tls_workers_and_status(tmp_path):
    key_file, cert_file = _self_signed(tmp_path)
    run_dir = tmp_path / "run"
    half = vnodes("master", JOB, "--steps", "3", "--run-dir", str(run_dir), "--tls-cert", str(cert_file),
                  stderr=subprocess.PIPE, text=True)
    _, err = half.communicate(timeout=60)
    assert half.returncode == 2 and "--tls-key" in err
    port = free_port()
    master = vnodes("master", JOB, "--steps", "3", "--port", str(port), "--run-dir", str(run_dir),
                    "--host", "0.0.0.0", "--token", "s3cret", "--tls-cert", str(cert_file), "--tls-key", str(key_file),
                    "--min-workers", "1")
    try:
        wait_for(lambda: _listening(port), timeout_s=60)
        status = vnodes("status", "--master", f"127.0.0.1:{port}", "--token", "s3cret", "--tls-ca", str(cert_file),
                        "--json", stdout=subprocess.PIPE, text=True)
        out, _ = status.communicate(timeout=60)
        assert status.returncode == 0 and json.loads(out)["steps"] == 3
        (tmp_path / "notes.txt").write_text("not a certificate")
        not_pem = vnodes("worker", "--master", f"127.0.0.1:{port}", "--tls-ca", str(tmp_path / "notes.txt"),
                         stderr=subprocess.PIPE, text=True)
        _, err = not_pem.communicate(timeout=60)
        assert not_pem.returncode == 2 and "--tls-ca" in err and "PEM" in err
        finish_with_a_worker(master, "--master", f"127.0.0.1:{port}", "--token", "s3cret", "--tls-ca", str(cert_file))
    finally:
        kill_if_running(master)
    assert load_checkpoint(run_dir)["step"] == 3
