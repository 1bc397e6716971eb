"""The master ships the job's folder; a worker anywhere, without PYTHONPATH, imports the job from it."""

import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from vnodes.runtime import load_checkpoint
from vnodes.runtime.agent import load_job
from vnodes.runtime.code_cache import fetch, install, unpack
from vnodes.runtime.errors import CodePackageError, JobCodeMissing, VnodesError
from vnodes.runtime.master_client import CodeInfo
from vnodes.scheduler.code_package import CHUNK_BYTES, CodePackage
from vnodes.scheduler.errors import CodeTooLarge

HELPER = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


def tiny_model():
    return nn.Linear(4, 2)
'''

JOB = '''
import functools

import torch
import torch.nn.functional as F

from helper import tiny_data, tiny_model  # a sibling module: shipped with the job file
from vnodes.runtime import JobSpec


def per_sample_ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


spec = JobSpec(model=tiny_model, dataset=tiny_data, optimizer=functools.partial(torch.optim.SGD, lr=0.1),
               loss=per_sample_ce, virtual_nodes=2, vnode_batch_size=4, seed=3, device="cpu")
'''

# A script calling train(): its loss pickles as __main__.per_sample_ce, resolved on the workers
# through the shipped main file.
SCRIPT = JOB + '''

if __name__ == "__main__":
    import sys

    from vnodes.runtime import train

    result = train(spec, steps=3, workers=2, checkpoint_dir=sys.argv[1], progress=False)
    print("steps", result.steps)
'''


def write(folder: Path, files: dict) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return folder


def names(package: CodePackage) -> list:
    return zipfile.ZipFile(io.BytesIO(package.data)).namelist()


class FakeClient:
    """``MasterClient.get_code`` over a package held here."""

    address = "127.0.0.1:0"

    def __init__(self, data: bytes, barrier=None):
        self.data, self.barrier, self.calls = data, barrier, 0

    def get_code(self, digest):
        self.calls += 1
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # every racer is fetching before any renames
        for start in range(0, len(self.data), 7):
            yield self.data[start:start + 7]


def info(package: CodePackage, **overrides) -> CodeInfo:
    fields = dict(digest=package.digest, size_bytes=package.size_bytes, main_file=package.main_file)
    fields.update(overrides)
    return CodeInfo(**fields)


# --- packing (master side) ---

def test_the_same_folder_gives_the_same_digest_and_a_change_another(tmp_path):
    folder = write(tmp_path / "job", {"job.py": JOB, "helper.py": HELPER, "pkg/util.py": "X = 1\n"})
    first = CodePackage.from_folder(folder, folder / "job.py")
    os.utime(folder / "helper.py", (1, 1))  # timestamps are not part of the archive
    (folder / "pkg" / "util.py").write_text("X = 1\n")
    second = CodePackage.from_folder(folder, folder / "job.py")
    assert (second.digest, second.data) == (first.digest, first.data)
    assert first.digest == hashlib.sha256(first.data).hexdigest() and first.size_bytes == len(first.data)
    assert (first.main_file, names(first)) == ("job.py", ["helper.py", "job.py", "pkg/util.py"])
    (folder / "pkg" / "util.py").write_text("X = 2\n")
    assert CodePackage.from_folder(folder).digest != first.digest


def test_packing_leaves_out_what_is_not_the_jobs_code(tmp_path):
    outside = write(tmp_path / "data_mount", {"huge.bin": b"x" * 100})
    folder = write(tmp_path / "job", {
        "job.py": JOB, "helper.py": HELPER, "pkg/__init__.py": "", "pkg/sub.py": "Y = 2\n",
        "run.sh": "#!/bin/sh\n", "notes/readme.txt": "kept\n", "notes/debug.log": "left out\n",
        ".git/config": "[core]\n", ".env": "SECRET=1\n", ".venv/pyvenv.cfg": "home = /usr\n",
        "myenv/pyvenv.cfg": "home = /usr\n", "myenv/lib/site.py": "",  # a venv under any name
        "condaenv/conda-meta/history": "", "condaenv/lib/x.py": "",
        "__pycache__/helper.cpython-311.pyc": b"\0", "pkg/__pycache__/sub.cpython-311.pyc": b"\0",
        "stale.pyc": b"\0", "run/step-00000003.pt": b"checkpoint", "run/master.json": "{}",
        "data/train.npy": b"\0" * 10, "outputs/a/b.log": "log\n", "keep/outputs.py": "",
        ".vnodesignore": "# data and outputs stay here\ndata/\n/outputs\n*.log\n",
    })
    (folder / "run.sh").chmod(0o755)
    (folder / "mount").symlink_to(outside, target_is_directory=True)
    (folder / "linked.py").symlink_to(folder / "pkg" / "sub.py")
    package = CodePackage.from_folder(folder, exclude=[folder / "run"])
    assert names(package) == ["helper.py", "job.py", "keep/outputs.py", "linked.py", "notes/readme.txt",
                              "pkg/__init__.py", "pkg/sub.py", "run.sh"]
    modes = {i.filename: i.external_attr >> 16 for i in zipfile.ZipFile(io.BytesIO(package.data)).infolist()}
    assert (modes["run.sh"] & 0o777, modes["job.py"] & 0o777) == (0o755, 0o644)


def test_a_folder_past_the_cap_names_the_folder_its_size_the_biggest_files_and_the_fix(tmp_path, monkeypatch):
    folder = write(tmp_path / "job", {"job.py": JOB, "weights.bin": b"\0" * 5000, "small.txt": "x" * 300})
    with pytest.raises(CodeTooLarge) as caught:
        CodePackage.from_folder(folder, max_bytes=4096)
    message = str(caught.value)
    for part in (str(folder), "weights.bin (4.9 KiB)", "4.0 KiB", ".vnodesignore", "VNODES_MAX_CODE_BYTES",
                 "Move data"):
        assert part in message, part
    assert caught.value.size_bytes > 4096
    assert pickle.loads(pickle.dumps(caught.value)).biggest == caught.value.biggest

    monkeypatch.setenv("VNODES_MAX_CODE_BYTES", "4096")
    with pytest.raises(CodeTooLarge):
        CodePackage.from_folder(folder)
    monkeypatch.setenv("VNODES_MAX_CODE_BYTES", "10000")
    assert CodePackage.from_folder(folder).file_count == 3
    monkeypatch.setenv("VNODES_MAX_CODE_BYTES", "lots")
    with pytest.raises(VnodesError, match="VNODES_MAX_CODE_BYTES='lots'"):
        CodePackage.from_folder(folder)


def test_chunks_are_at_most_one_mib_and_rebuild_the_archive(tmp_path):
    folder = write(tmp_path / "job", {"blob.bin": os.urandom(CHUNK_BYTES + 5), "job.py": JOB})
    package = CodePackage.from_folder(folder)
    chunks = list(package.chunks())
    assert [len(c) <= CHUNK_BYTES for c in chunks] == [True, True] and b"".join(chunks) == package.data


def test_the_master_command_refuses_a_folder_past_the_cap_before_serving(tmp_path):
    folder = write(tmp_path / "job", {"job.py": JOB, "helper.py": HELPER, "dataset.bin": b"\0" * 4000})
    env = dict(os.environ, VNODES_MAX_CODE_BYTES="3000")
    out = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "master", str(folder / "job.py"),
                          "--steps", "1", "--port", "0", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert out.stderr.startswith("vnodes: error: the job's folder") and "dataset.bin" in out.stderr
    assert "listening" not in out.stdout


# --- the worker's cache ---

def test_install_unpacks_once_and_puts_the_folder_first_on_sys_path(tmp_path, monkeypatch):
    folder = write(tmp_path / "job", {"job.py": JOB, "helper.py": HELPER})
    package = CodePackage.from_folder(folder, folder / "job.py")
    client = FakeClient(package.data)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("VNODES_CACHE_DIR", str(tmp_path / "cache"))
    installed = install(client, info(package))
    assert installed.folder == tmp_path / "cache" / "code" / package.digest
    assert sys.path[0] == str(installed.folder) and installed.main_file == installed.folder / "job.py"
    assert (installed.folder / "helper.py").read_text() == HELPER
    assert install(client, info(package)).folder == installed.folder and client.calls == 1  # cached
    assert sorted(p.name for p in (tmp_path / "cache" / "code").iterdir()) == [package.digest]  # no leftovers


def test_two_workers_racing_for_one_digest_both_end_up_with_it(tmp_path):
    package = CodePackage.from_folder(write(tmp_path / "job", {"job.py": JOB, "helper.py": HELPER}))
    barrier = threading.Barrier(2)
    results, errors = [], []

    def worker():
        try:
            results.append(fetch(FakeClient(package.data, barrier), info(package), tmp_path / "cache"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert sorted(p.name for p in (tmp_path / "cache" / "code").iterdir()) == [package.digest]
    assert sorted(p.name for p in results[0].iterdir()) == ["helper.py", "job.py"]


def test_a_package_that_is_not_what_the_master_announced_is_refused(tmp_path):
    package = CodePackage.from_folder(write(tmp_path / "job", {"job.py": JOB}))
    tampered = bytearray(package.data)
    tampered[len(tampered) // 2] ^= 0xFF
    for data, code in ((bytes(tampered), info(package)),  # altered on the way
                       (package.data, info(package, digest="0" * 64)),  # not the announced digest
                       (package.data[:-10], info(package)),  # cut short
                       (package.data + b"tail", info(package))):  # longer than announced
        with pytest.raises(CodePackageError, match="announced") as caught:
            fetch(FakeClient(data), code, tmp_path / "cache")
        assert "nothing was unpacked" in str(caught.value)
        assert list((tmp_path / "cache" / "code").iterdir()) == []  # no cache entry, no temporary left
    with pytest.raises(CodePackageError, match="not a sha256"):
        fetch(FakeClient(package.data), info(package, digest="../../etc"), tmp_path / "cache")


@pytest.mark.parametrize("entry", ["../escape.py", "/etc/evil.py", "pkg/../../escape.py", "C:/evil.py",
                                   "pkg\\..\\..\\evil.py"])
def test_an_entry_that_would_land_outside_the_folder_is_refused(tmp_path, entry):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("job.py", "X = 1\n")
        z.writestr(entry, "import os\n")
    with pytest.raises(CodePackageError, match="outside its folder") as caught:
        unpack(archive, tmp_path / "out" / "code", "ab" * 32)
    assert repr(entry) in str(caught.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.py").exists()


def test_a_main_file_outside_the_package_is_refused(tmp_path, monkeypatch):
    package = CodePackage.from_folder(write(tmp_path / "job", {"job.py": JOB}))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(CodePackageError, match="outside its folder"):
        install(FakeClient(package.data), info(package, main_file="../../x.py"), tmp_path / "cache")


def test_a_missing_module_or_name_names_it_and_the_fix(tmp_path):
    script = write(tmp_path, {"script.py": "import vnodes_nowhere_sibling\n"}) / "script.py"
    with pytest.raises(JobCodeMissing) as caught:  # the launching script imports what is not here
        load_job(b"c__main__\nbuild\n.", str(script), code_dir=str(tmp_path))
    assert "'vnodes_nowhere_sibling'" in str(caught.value) and "__vnodes_main__" not in sys.modules
    with pytest.raises(JobCodeMissing) as caught:
        load_job(b"cvnodes_nowhere_module\nbuild\n.")  # a pickled reference to nowhere_module.build
    message = str(caught.value)
    assert "'vnodes_nowhere_module'" in message and "install it" in message and "job's folder" in message
    with pytest.raises(JobCodeMissing) as caught:
        load_job(b"cos\nvnodes_no_such_function\n.", code_dir="/cache/code/abc")
    message = str(caught.value)
    assert "os.vnodes_no_such_function" in message and "/cache/code/abc" in message
    assert pickle.loads(pickle.dumps(caught.value)).name == "vnodes_no_such_function"


# --- real processes: a master in the job's folder, a worker elsewhere without PYTHONPATH ---

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VNODES_MAIN_FILE")}
    env.update(extra)
    return env


def vnodes(*args, cwd, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], cwd=cwd, env=env, **kw)


def stop(*processes):
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_worker_elsewhere_without_pythonpath_imports_the_job_and_its_sibling(tmp_path):
    folder = write(tmp_path / "job", {"job.py": JOB, "helper.py": HELPER})
    elsewhere, run_dir, cache = tmp_path / "elsewhere", tmp_path / "run", tmp_path / "cache"
    elsewhere.mkdir()
    port = free_port()
    master = vnodes("master", "job.py", "--steps", "3", "--port", str(port), "--run-dir", str(run_dir),
                    cwd=folder, env=clean_env())
    worker = vnodes("worker", "--master", f"127.0.0.1:{port}", cwd=elsewhere,
                    env=clean_env(VNODES_CACHE_DIR=str(cache)), stderr=subprocess.PIPE, text=True)
    try:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        assert master.wait(timeout=60) == 0
    finally:
        stop(master, worker)
    assert load_checkpoint(run_dir)["step"] == 3
    digests = list((cache / "code").iterdir())
    assert len(digests) == 1 and sorted(p.name for p in digests[0].iterdir()) == ["helper.py", "job.py"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_module_the_worker_cannot_import_exits_2_naming_it_and_the_fix(tmp_path):
    # The master finds extra_module through its PYTHONPATH; it lies outside the job's folder, so it
    # is not shipped, and the worker's environment does not have it.
    site = write(tmp_path / "site", {"extra_module.py": HELPER})
    folder = write(tmp_path / "job", {"job.py": JOB.replace("from helper import", "from extra_module import")})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    master = vnodes("master", str(folder / "job.py"), "--steps", "3", "--port", str(port), "--run-dir",
                    str(tmp_path / "run"), cwd=tmp_path, env=clean_env(PYTHONPATH=str(site)))
    worker = vnodes("worker", "--master", f"127.0.0.1:{port}", cwd=elsewhere,
                    env=clean_env(VNODES_CACHE_DIR=str(tmp_path / "cache")), stderr=subprocess.PIPE, text=True)
    try:
        _, err = worker.communicate(timeout=120)
    finally:
        stop(master, worker)
    assert worker.returncode == 2, err
    assert err.startswith("vnodes worker: error: the job needs the module 'extra_module'"), err
    assert "install it in this worker's Python environment" in err and "Traceback" not in err


@pytest.mark.multiprocess
@pytest.mark.slow
def test_local_workers_of_a_script_import_its_folder_without_shipping(tmp_path):
    """Workers on this machine share its files: a script run from elsewhere trains, nothing is packed."""
    folder = write(tmp_path / "job", {"train_script.py": SCRIPT, "helper.py": HELPER})
    elsewhere, cache = tmp_path / "elsewhere", tmp_path / "cache"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, str(folder / "train_script.py"), str(tmp_path / "run")], cwd=elsewhere,
                         env=clean_env(VNODES_CACHE_DIR=str(cache)), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "steps 3" in out.stdout and load_checkpoint(tmp_path / "run")["step"] == 3
    assert not (cache / "code").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run_with_local_workers_needs_no_shipping(tmp_path):
    folder = write(tmp_path / "job", {"job.py": JOB, "helper.py": HELPER, "run/notes.txt": "a run directory\n"})
    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "run", "job.py", "--steps", "3", "--workers",
                          "2", "--run-dir", "run", "--no-progress"], cwd=folder,
                         env=clean_env(VNODES_CACHE_DIR=str(cache)), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert load_checkpoint(folder / "run")["step"] == 3
    assert not (cache / "code").exists()


def test_names_a_worker_would_refuse_are_left_out_when_packing(tmp_path):
    """Found by review: legal Linux names like 'C:notes.txt' or 'a\\b.txt' were packed, and every
    worker then refused the whole package."""
    import zipfile

    folder = write(tmp_path / "job", {"job.py": "x = 1\n", "C:notes.txt": "n\n", "a\\b.txt": "b\n"})
    package = CodePackage.from_folder(folder)
    with zipfile.ZipFile(io.BytesIO(b"".join(package.chunks()))) as archive:
        assert archive.namelist() == ["job.py"]
