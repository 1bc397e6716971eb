"""Separate hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

Each host has its own network stack, its interface ``eth0`` with a real (non-loopback) address
10.R.0.i/24, and nothing else but its own loopback. The bridge lives in a namespace of its own, so
the machine's network is not touched. Needs root and ``ip`` (iproute2); ``tc netem`` for latency
needs the kernel's ``sch_netem``.

    with Hosts(3) as hosts:
        hosts[0].popen(["python", "-m", ...])      # runs inside host 0's namespace
        hosts[2].link_down(); hosts[2].link_up()   # a partition of host 2, healed
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def why_not_available() -> Optional[str]:
    """None if namespaces can be made here, else why not (the reason a test is skipped with)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    name = f"vnprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Host:
    def __init__(self, namespace: str, address: str):
        self.namespace, self.address = namespace, address

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kw)

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kw)

    def link_down(self) -> None:
        _ip("-n", self.namespace, "link", "set", "eth0", "down")

    def link_up(self) -> None:
        _ip("-n", self.namespace, "link", "set", "eth0", "up")

    def add_latency(self, ms: int) -> Optional[str]:
        """Delay every packet leaving this host by ``ms``; None, or why it cannot be done here."""
        if shutil.which("tc") is None:
            return "`tc` (iproute2) is not installed"
        done = subprocess.run(["ip", "netns", "exec", self.namespace, "tc", "qdisc", "add", "dev", "eth0", "root",
                               "netem", "delay", f"{ms}ms"], capture_output=True, text=True, timeout=30)
        return None if done.returncode == 0 else f"tc netem is not available here: {done.stderr.strip()}"


class Hosts:
    """``count`` hosts on one bridge; removed on exit (also after a failure)."""

    def __init__(self, count: int):
        tag = f"{os.getpid() % 100000}"
        self.switch = f"vnsw{tag}"
        self.subnet = 10 + os.getpid() % 200  # 10.X.0.0/24: distinct per test process
        self.hosts = [Host(f"vnh{tag}-{i}", f"10.{self.subnet}.0.{i + 1}") for i in range(count)]

    def __enter__(self) -> list[Host]:
        self.__exit__(None, None, None)  # left over by a killed run of a process with the same pid
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                _ip("netns", "add", host.namespace)
                _ip("-n", host.namespace, "link", "set", "lo", "up")
                # the pair is made inside the host's namespace: its ends' names are per-namespace
                _ip("-n", host.namespace, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}",
                    "netns", self.switch)
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.namespace, "link", "set", "eth0", "up")
                _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"port{i}", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.hosts

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            pids = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", host.namespace, check=False)
        _ip("netns", "del", self.switch, check=False)
