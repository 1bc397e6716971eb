"""The job's code on a worker: fetched once per digest, verified, unpacked into a cache, imported first.

The master ships the job file's folder (``scheduler/code_package.py``); a worker keeps it in

    $VNODES_CACHE_DIR/code/<digest>/      (VNODES_CACHE_DIR defaults to ~/.cache/vnodes)

and puts that folder first on ``sys.path``, so the job file and the modules beside it import on any
machine, whatever the worker's working directory or ``PYTHONPATH``. A folder there is complete or
absent: the archive is checked against the announced size and sha256 and unpacked into a temporary
folder beside it, which is renamed into place in one step. Two workers on one machine may fetch the
same digest at once: the first rename wins, the other drops its identical copy. Nothing in the cache
is removed by vnodes; delete old digests by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

from .errors import CodePackageError
from .master_client import CodeInfo

CACHE_DIR_ENV = "VNODES_CACHE_DIR"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def cache_root() -> Path:
    """``$VNODES_CACHE_DIR``, else ``~/.cache/vnodes``; code lives under its ``code/``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "vnodes").expanduser().absolute()


@dataclasses.dataclass(frozen=True)
class InstalledCode:
    folder: Path  # the unpacked job folder, first on sys.path
    main_file: Optional[Path]  # the launching script in it (None if the package names none)


def install(client, code: CodeInfo, root: Optional[Path] = None) -> InstalledCode:
    """Make the job's code importable: fetch it unless cached, and put its folder first on ``sys.path``.

    Raises:
        CodePackageError: the package is not what the master announced (digest, size), holds a
            path outside its folder, or the cache cannot be written (set ``VNODES_CACHE_DIR``).
        MasterUnavailable: the master cannot be reached during the transfer.
    """
    folder = fetch(client, code, root)
    main_file = None
    if code.main_file:
        main_file = folder / _safe_relative(code.main_file, code.digest, "main file")
        if not main_file.is_file():
            raise CodePackageError(f"the job's code package {code.digest[:12]} has no main file {code.main_file!r} "
                                   f"(unpacked in {folder}); run the same vnodes version on the master and its workers")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
    return InstalledCode(folder, main_file)


def fetch(client, code: CodeInfo, root: Optional[Path] = None) -> Path:
    """The folder of package ``code.digest`` in the cache, fetched from the master if absent.

    ``client`` is a ``MasterClient`` registered with the master (``get_code`` streams the chunks).

    Raises:
        CodePackageError, MasterUnavailable: see ``install``.
    """
    if not _DIGEST.match(code.digest):
        raise CodePackageError(f"the master announced the code package digest {code.digest!r}, not a sha256 hex "
                               "digest; run the same vnodes version on the master and its workers")
    code_root = (root if root is not None else cache_root()) / "code"
    target = code_root / code.digest
    if target.is_dir():
        return target
    try:
        code_root.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(dir=code_root, prefix=f".{code.digest[:12]}-")
    except OSError as exc:
        raise CodePackageError(f"cannot write the code cache {code_root} ({exc.strerror}); set {CACHE_DIR_ENV} to a "
                               "writable directory") from None
    try:
        with scratch as tmp:
            archive = Path(tmp) / "code.zip"
            _download(client, code, archive)
            unpacked = Path(tmp) / "code"
            unpack(archive, unpacked, code.digest)
            try:
                os.rename(unpacked, target)  # atomic: the folder appears complete or not at all
            except OSError:
                if not target.is_dir():
                    raise
                # Another worker on this machine installed the same digest first: the same files.
    except OSError as exc:  # a full or read-only disk
        raise CodePackageError(f"cannot write the code cache {code_root} ({exc.strerror or exc}); free space there "
                               f"or set {CACHE_DIR_ENV} to a writable directory") from None
    return target


def _download(client, code: CodeInfo, archive: Path) -> None:
    digest, received = hashlib.sha256(), 0
    with open(archive, "wb") as out:
        for chunk in client.get_code(code.digest):
            received += len(chunk)
            if received > code.size_bytes:
                raise CodePackageError(f"the job's code package {code.digest[:12]} from {client.address} is longer "
                                       f"than the {code.size_bytes} bytes the master announced; nothing was "
                                       "unpacked. Start the worker again; if it repeats, check what stands "
                                       "between it and the master")
            digest.update(chunk)
            out.write(chunk)
    if received != code.size_bytes or digest.hexdigest() != code.digest:
        raise CodePackageError(f"the job's code package from {client.address} has {received} bytes and sha256 "
                               f"{digest.hexdigest()}, not the {code.size_bytes} bytes and sha256 {code.digest} the "
                               "master announced: it was cut or altered on the way, and nothing was unpacked. "
                               "Start the worker again; if it repeats, check what stands between it and the "
                               "master (a TLS master, --tls-ca, rules out tampering)")


def _safe_relative(name: str, digest: str, what: str) -> PurePosixPath:
    """``name`` as a relative path that stays inside its folder, or ``CodePackageError``."""
    path = PurePosixPath(name)
    if (not name or "\\" in name or path.is_absolute() or re.match(r"^[A-Za-z]:", name)
            or any(part == ".." for part in path.parts)):
        raise CodePackageError(f"the job's code package {digest[:12]} names the {what} {name!r}, which would land "
                               "outside its folder; refusing to unpack it. Point the worker only at a master you "
                               "trust, running the same vnodes version")
    return path


def unpack(archive: Path, destination: Path, digest: str) -> None:
    """Extract ``archive`` into ``destination``, refusing it whole if any entry would escape it.

    Raises:
        CodePackageError: an absolute path, a drive, a backslash or a ``..`` in an entry's name, or
            an archive that is not a zip.
    """
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                _safe_relative(info.filename, digest, "entry")
            z.extractall(destination)
    except zipfile.BadZipFile as exc:
        raise CodePackageError(f"the job's code package {digest[:12]} is not a zip archive ({exc}); run the same "
                               "vnodes version on the master and its workers") from None
