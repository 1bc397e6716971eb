"""The header line every benchmark prints above its table: the machine, the versions, the commit, the date."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def header(*packages: str, extra: str = "") -> str:
    """``host: cpu, N CPU(s), Python x, <package> <version> ..., commit c, date``. ``packages``:
    module names whose ``__version__`` goes in the line (imported here); ``extra``: appended after them."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    names = {"sklearn": "scikit-learn"}
    versions = ", ".join(f"{names.get(p, p)} {__import__(p).__version__}" for p in packages)
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, {versions}"
            f"{', ' + extra if extra else ''}, commit {commit}, {time.strftime('%Y-%m-%d %H:%M')}")
