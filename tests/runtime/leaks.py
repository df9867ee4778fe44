"""Leak checks shared by the real-process Flower tests: nothing may outlive a deployment."""

from __future__ import annotations

import os
import time
from pathlib import Path

from medfed.runtime.flower.deploy import LocalDeployment


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def live_under(workdir: Path) -> list[tuple[int, str]]:
    """Live processes whose FLWR_HOME is inside ``workdir`` (catches grandchildren too)."""
    needle = f"FLWR_HOME={workdir.resolve()}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if alive(int(entry)) and any(v.startswith(needle) for v in env.split(b"\0")):
            found.append((int(entry), cmd[:120]))
    return found


def assert_no_leaks(dep: LocalDeployment, pids: list[int]) -> None:
    assert dep.survivors == []
    if not Path("/proc/self/environ").exists():
        return
    deadline = time.monotonic() + 5.0
    while (leaks := live_under(dep.workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leaks == [], f"stray Flower processes: {leaks}"
    assert [p for p in pids if alive(p)] == []
