"""The job's code, packed once on the master and shipped to every admitted worker.

A worker started anywhere (``vnodes worker --master HOST:PORT``, a Ray actor, a spawned local
process) must import what the pickled ``JobSpec`` refers to: the job file and the modules beside
it. As Ray's runtime_env ``working_dir`` does, the master packs one folder and hands it out:

- ``vnodes master job.py`` and ``vnodes run job.py --workers N``: the job file's folder;
- ``train(spec, workers=N)`` in a script run as ``python path/to/script.py``: the script's folder,
  with ``main_file`` naming the script (its builders pickle as ``__main__.name``).

The package is a zip whose bytes depend only on the files' paths, contents and executable bits
(sorted entries, fixed timestamps): the same folder gives the same ``digest`` (sha256 of the
archive), the worker's cache key (``runtime/code_cache.py``). Left out, as not code or not the
job's:

- hidden files and folders (``.git``, ``.venv``, ``.env``, ``.ipynb_checkpoints``...): tool state
  and secrets;
- ``__pycache__``, ``*.pyc``, ``*.pyo``: rebuilt on the worker;
- virtual and conda environments (a folder holding ``pyvenv.cfg`` or ``conda-meta``), whatever
  their name: the worker has its own;
- the job's run directory, when it lies inside the folder: checkpoints are not code, and would
  change the digest at every step;
- folders reached through a symbolic link (data mounts, and no cycles; a linked file is packed);
- what the folder's ``.vnodesignore`` lists: one shell pattern (``fnmatch``) per line, ``#``
  comments; a pattern without ``/`` matches a file or folder of that name anywhere, one with a
  ``/`` matches the path from the folder (``data/*.npy``, ``/outputs``); a trailing ``/`` matches
  folders only. No negation (``!``).

The files' total size is capped (``VNODES_MAX_CODE_BYTES``, in bytes; default 100 MiB, Ray's
limit too): packing stops as soon as it is passed and ``CodeTooLarge`` names the folder, the size
counted, the biggest files and the fix. The archive is kept in memory and sent in 1 MiB chunks.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import logging
import os
import re
import stat
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from vnodes.runtime.errors import VnodesError

from .errors import CodeTooLarge

MAX_CODE_BYTES_ENV = "VNODES_MAX_CODE_BYTES"
DEFAULT_MAX_CODE_BYTES = 100 * 2**20
CHUNK_BYTES = 2**20  # one CodeChunk message
IGNORE_FILE = ".vnodesignore"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no clock in the archive
_ENVIRONMENT_MARKERS = ("pyvenv.cfg", "conda-meta")
_BIGGEST_SHOWN = 5

log = logging.getLogger(__name__)


def max_code_bytes() -> int:
    """The cap on the files' total size: ``VNODES_MAX_CODE_BYTES``, else 100 MiB.

    Raises:
        VnodesError: the variable is not a positive whole number of bytes.
    """
    raw = os.environ.get(MAX_CODE_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_CODE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise VnodesError(f"{MAX_CODE_BYTES_ENV}={raw!r} is not a positive whole number of bytes; set e.g. "
                          f"{MAX_CODE_BYTES_ENV}={200 * 2**20} for 200 MiB, or unset it for the default "
                          f"({DEFAULT_MAX_CODE_BYTES})")
    return value


class _IgnoreList:
    """The patterns of a folder's ``.vnodesignore`` (see the module docstring)."""

    def __init__(self, folder: Path):
        self.names: list[tuple[str, bool]] = []  # (pattern, folders only), matched against a name
        self.paths: list[tuple[str, bool]] = []  # matched against the path from the folder
        path = folder / IGNORE_FILE
        if not path.is_file():
            return
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            pattern = line.strip()
            if not pattern or pattern.startswith("#"):
                continue
            if pattern.startswith("!"):
                raise VnodesError(f"{path}, line {number}: {pattern!r} negates a pattern, which {IGNORE_FILE} does "
                                  "not support; list only what to leave out")
            folders_only = pattern.endswith("/")
            pattern = pattern.rstrip("/")
            if "/" in pattern:
                self.paths.append((pattern.lstrip("/"), folders_only))
            elif pattern:
                self.names.append((pattern, folders_only))

    def match(self, relative: str, is_folder: bool) -> bool:
        name = relative.rsplit("/", 1)[-1]
        return (any(fnmatch.fnmatchcase(name, p) for p, only in self.names if is_folder or not only)
                or any(fnmatch.fnmatchcase(relative, p) for p, only in self.paths if is_folder or not only))


def _is_environment(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in _ENVIRONMENT_MARKERS)


@dataclasses.dataclass(frozen=True)
class _File:
    relative: str  # POSIX path inside the package
    path: Path
    size_bytes: int
    executable: bool


def _collect(folder: Path, excluded: set[Path], cap_bytes: int) -> list[_File]:
    """The files to pack, sorted by path. Raises ``CodeTooLarge`` as soon as they pass ``cap_bytes``."""
    ignore = _IgnoreList(folder)
    files: list[_File] = []
    total = 0
    for here, folders, names in os.walk(folder):  # folder symlinks are listed, never followed
        here_path = Path(here)
        prefix = here_path.relative_to(folder).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        folders[:] = sorted(
            d for d in folders
            if not d.startswith(".") and d != "__pycache__" and not (here_path / d).is_symlink()
            and not _is_environment(here_path / d) and (here_path / d).resolve() not in excluded
            and not ignore.match(prefix + d, True))
        for name in sorted(names):
            relative = prefix + name
            if name.startswith(".") or name.endswith((".pyc", ".pyo")) or ignore.match(relative, False):
                continue
            if "\\" in relative or re.match(r"^[A-Za-z]:", relative):  # workers refuse such entries (and
                log.warning("leaving %s out of the job's code: workers refuse a name with a backslash or "
                            "a drive letter; rename it if the job needs it", relative)  # Python imports none)
                continue
            path = here_path / name
            try:
                info = path.stat()  # a linked file counts (and is packed) as its target
            except OSError:  # a dangling link
                continue
            if not stat.S_ISREG(info.st_mode):  # sockets, pipes
                continue
            files.append(_File(relative, path, info.st_size, bool(info.st_mode & stat.S_IXUSR)))
            total += info.st_size
            if total > cap_bytes:
                raise _too_large(folder, total, cap_bytes, files)
    return sorted(files, key=lambda f: f.relative)


def _too_large(folder: Path, total: int, cap_bytes: int, files: list[_File]) -> CodeTooLarge:
    biggest = sorted(files, key=lambda f: (-f.size_bytes, f.relative))[:_BIGGEST_SHOWN]
    return CodeTooLarge(str(folder), total, cap_bytes, [(f.relative, f.size_bytes) for f in biggest],
                        MAX_CODE_BYTES_ENV)


@dataclasses.dataclass(frozen=True)
class CodePackage:
    """The job's folder as one deterministic zip (what ``MasterServicer(code=...)`` serves).

    ``digest``: sha256 hex of the archive; ``size_bytes``: the archive's size; ``main_file``: the
    launching script, relative to the folder ("" if none); ``folder``: where it was packed from.
    """

    folder: str
    main_file: str
    digest: str
    size_bytes: int
    file_count: int
    data: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, main_file: str | os.PathLike | None = None, *,
                    exclude: Iterable[str | os.PathLike] = (), max_bytes: Optional[int] = None) -> "CodePackage":
        """Pack ``folder`` (see the module docstring for what is left out).

        ``main_file``: the launching script, inside ``folder``; ``exclude``: folders to leave out
        (the run directory); ``max_bytes``: the cap (default ``max_code_bytes()``).

        Raises:
            CodeTooLarge: the files pass the cap (packing stops there).
            VnodesError: ``folder`` is not a folder, ``main_file`` is not inside it, a file cannot be
                read, or ``.vnodesignore`` holds a negation.
        """
        root = Path(folder).expanduser().absolute()
        if not root.is_dir():
            raise VnodesError(f"the job's folder {root} is not a directory; pass the path of a job file in it")
        relative_main = ""
        if main_file is not None:
            main_path = Path(main_file).expanduser().absolute()
            try:
                relative_main = main_path.relative_to(root).as_posix()
            except ValueError:
                raise VnodesError(f"the main file {main_path} is not inside the job's folder {root}") from None
        cap = max_code_bytes() if max_bytes is None else max_bytes
        files = _collect(root, {Path(p).expanduser().absolute().resolve() for p in exclude}, cap)
        buffer, total = io.BytesIO(), 0
        with zipfile.ZipFile(buffer, "w") as archive:
            for f in files:
                try:
                    with open(f.path, "rb") as source:
                        content = source.read(cap - total + 1)  # a file may have grown since it was listed
                except OSError as exc:
                    raise VnodesError(f"cannot read {f.path} to ship it to the workers ({exc.strerror}); make it "
                                      f"readable, or list {f.relative} in {root / IGNORE_FILE}") from None
                total += len(content)
                if total > cap:
                    raise _too_large(root, total, cap, files)
                info = zipfile.ZipInfo(f.relative, date_time=_ZIP_TIME)
                info.create_system = 3  # Unix, wherever the master runs: the bytes name no platform
                info.external_attr = (0o100755 if f.executable else 0o100644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, content, compresslevel=6)
        data = buffer.getvalue()
        return cls(str(root), relative_main, hashlib.sha256(data).hexdigest(), len(data), len(files), data)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The archive in pieces of at most ``chunk_bytes`` (one ``CodeChunk`` each)."""
        view = memoryview(self.data)
        for start in range(0, len(view), chunk_bytes):
            yield bytes(view[start:start + chunk_bytes])


def launching_script() -> Optional[Path]:
    """The script this process was started as (``python path/to/script.py``), else None.

    None for ``python -m module`` (its folder is a package, importable by name; the spawned and Ray
    workers find its ``__main__`` by path through ``VNODES_MAIN_FILE``), a console script (e.g.
    ``pytest``, ``vnodes``: not a ``.py`` file), a REPL or a notebook (no file).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None or not str(path).endswith(".py"):
        return None
    return Path(path).absolute()


def package_for_script(exclude: Iterable[str | os.PathLike] = ()) -> Optional[CodePackage]:
    """The launching script's folder, packed with the script as ``main_file`` (None without one).

    Raises:
        CodeTooLarge: see ``CodePackage.from_folder``.
    """
    script = launching_script()
    if script is None:
        return None
    return CodePackage.from_folder(script.parent, script, exclude=exclude)
