"""Flower subprocesses: environment, start, whole-tree teardown, one-shot ``flwr`` CLI calls.

Why a module of its own: Flower's executables start grandchildren in other sessions and process
groups, so stopping what was started needs process discovery through ``/proc`` instead of a
plain ``Popen.terminate``; that side-effectful, Linux-specific code is kept apart from the pure
argument builders (:mod:`medfed.runtime.flower.deploy_args`) and from the orchestration of a
:class:`~medfed.runtime.flower.deploy.LocalDeployment`.

How flwr 1.41 starts its processes
----------------------------------
* In subprocess isolation the SuperLink starts ``flower-superexec`` **in a new session**
  (``start_new_session=True``), which starts ``flwr-serverapp``; each SuperNode starts a
  ``flower-superexec`` in its own process group, which starts ``flwr-clientapp``. They are
  found on ``PATH`` by name, so ``PATH`` must contain the venv's ``bin``. A SuperExec notices
  its parent's death only by polling, so teardown here kills whole process trees instead.

Limitations
-----------
* A SuperExec detects its parent's death with ``os.kill(ppid, 0)``, which also succeeds on an
  unreaped zombie, so after its parent died it can linger for seconds; the teardown here
  does not rely on that and kills it directly.
* Descendant discovery reads ``/proc`` (Linux). Elsewhere only the process groups of the
  processes started here are signalled, which misses the SuperLink's SuperExec (new
  session); it then exits by itself once it notices its parent is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medfed.runtime.flower.deploy_args import LOOPBACK
from medfed.runtime.flower.deploy_errors import (
    _TAIL_LINES,
    FlowerDeploymentError,
    explain_flower_error,
)
from medfed.types import StrEnum

__all__ = [
    "CliResult",
    "Env",
    "ManagedProcess",
    "flower_bin_dir",
    "flower_env",
    "free_ports",
    "terminate_all",
]

logger = logging.getLogger(__name__)


class Env(StrEnum):
    FLWR_HOME = "FLWR_HOME"
    HOME = "HOME"
    PATH = "PATH"
    TELEMETRY = "FLWR_TELEMETRY_ENABLED"
    UPDATE_CHECK = "FLWR_DISABLE_UPDATE_CHECK"
    UNBUFFERED = "PYTHONUNBUFFERED"
    NO_COLOR = "NO_COLOR"


# --------------------------------------------------------------------------- environment


def flower_bin_dir() -> Path:
    """The directory holding this interpreter's Flower executables (the venv's ``bin``)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower subprocess confined to ``flwr_home``.

    ``FLWR_HOME`` and ``HOME`` both point into ``flwr_home`` so nothing touches the user's
    ``~/.flwr`` (config, installed FABs, credentials); telemetry and the PyPI update check are
    off; ``PATH`` starts with the venv's ``bin`` because Flower starts ``flower-superexec``,
    ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    env = dict(os.environ if base is None else base)
    flwr_home.mkdir(parents=True, exist_ok=True)
    env[Env.FLWR_HOME] = str(flwr_home)
    env[Env.HOME] = str(flwr_home)
    env[Env.PATH] = os.pathsep.join([str(flower_bin_dir()), env.get(Env.PATH, "")])
    env[Env.TELEMETRY] = "0"
    env[Env.UPDATE_CHECK] = "1"
    env[Env.UNBUFFERED] = "1"
    env[Env.NO_COLOR] = "1"
    return env


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _ProcId:
    """A pid plus its start time, so a recycled pid is never signalled."""

    pid: int
    start: int
    pgid: int


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, starttime) from /proc/PID/stat, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    # fields[0] = state (field 3), [1] = ppid, [2] = pgrp, [19] = starttime (field 22)
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _alive(proc: _ProcId) -> bool:
    stat = _proc_stat(proc.pid)
    if stat is None:
        if Path("/proc").is_dir():
            return False
        try:  # no /proc: best effort
            os.kill(proc.pid, 0)
        except OSError:
            return False
        return True
    state, _, _, start = stat
    return start == proc.start and state not in ("Z", "X")


def _descendants(root: int) -> list[_ProcId]:
    """Live descendants of ``root`` (any session) and live members of its process group, from
    /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, int, int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                info[int(entry)] = stat
                children.setdefault(stat[1], []).append(int(entry))
    out: list[_ProcId] = []
    # Members of root's own process group too (every process here is a group leader): they
    # stay findable after root exited and they were re-parented to init (e.g. the SuperExec
    # of a SuperNode that was refused and quit by itself).
    stack = list(children.get(root, []))
    stack += [pid for pid, st in info.items() if st[2] == root and pid != root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        state, _, pgid, start = info[pid]
        if state not in ("Z", "X"):
            out.append(_ProcId(pid, start, pgid))
        stack.extend(children.get(pid, []))
    return out


def _identify(pid: int) -> _ProcId:
    stat = _proc_stat(pid)
    if stat is None:
        return _ProcId(pid, -1, pid)
    return _ProcId(pid, stat[3], stat[2])


def _signal(procs: Sequence[_ProcId], sig: signal.Signals) -> None:
    own_pgid = os.getpgrp()
    groups = {p.pgid for p in procs if p.pgid > 1 and p.pgid != own_pgid}
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for p in procs:
        if p.pid > 1 and p.pid != os.getpid() and _alive(p):
            with contextlib.suppress(OSError):
                os.kill(p.pid, sig)


@dataclass
class ManagedProcess:
    """A Flower process started here, in its own session, output going to ``log_path``."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    _ident: _ProcId | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = _TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; raise if it is still up after ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise FlowerDeploymentError(
                f"{self.name} (pid {self.pid}) still running after {timeout:.0f}s\n"
                f"--- last output ---\n{self.tail()}"
            ) from err

    def tree(self) -> list[_ProcId]:
        """This process and its live descendants (SuperExec, flwr-serverapp/-clientapp)."""
        if self._ident is None:
            self._ident = _identify(self.pid)
        root = [self._ident] if _alive(self._ident) else []
        return root + _descendants(self.pid)

    def failure(self, context: str) -> FlowerDeploymentError:
        code = self.popen.poll()
        status = f"exited with code {code}" if code is not None else "is running"
        msg = explain_flower_error(self.output(), context=f"{context} ({self.name} {status})")
        return FlowerDeploymentError(msg)


def _spawn(name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(log_path.parent),
            start_new_session=True,  # own process group: killpg reaches its children
        )
    proc = ManagedProcess(name, argv, popen, log_path)
    proc._ident = _identify(popen.pid)
    return proc


def terminate_all(procs: Sequence[ManagedProcess], grace: float = 5.0) -> list[int]:
    """SIGTERM every process tree, wait ``grace`` s, SIGKILL the rest; return survivors' pids.

    Trees are collected BEFORE signalling: once a parent dies its children are re-parented
    to init and can no longer be found from it.
    """
    trees: list[_ProcId] = []
    for proc in procs:
        trees.extend(proc.tree())
    _signal(trees, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        # A dying SuperExec may still start a child; pick those up too.
        for proc in procs:
            trees.extend(d for d in _descendants(proc.pid) if d not in trees)
        if not any(_alive(p) for p in trees):
            break
        time.sleep(0.1)
    leftover = [p for p in trees if _alive(p)]
    if leftover:
        logger.warning("killing Flower processes that ignored SIGTERM: %s", leftover)
        _signal(leftover, signal.SIGKILL)
    for proc in procs:  # reap our direct children
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5.0)
    time.sleep(0.05)
    return [p.pid for p in trees if _alive(p)]


# --------------------------------------------------------------------------- CLI calls


@dataclass(frozen=True)
class CliResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"{self.stdout}\n{self.stderr}".strip()

    def json(self) -> dict[str, object]:
        """The JSON object in stdout (the CLI may print a banner line before it)."""
        start = self.stdout.find("{")
        if start < 0:
            raise ValueError(f"no JSON in output of {' '.join(self.argv)}:\n{self.output}")
        obj = json.JSONDecoder().raw_decode(self.stdout[start:])[0]
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object from {' '.join(self.argv)}")
        return obj


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _run_cli(argv: list[str], env: Mapping[str, str], timeout: float) -> CliResult:
    try:
        cp = subprocess.run(
            argv,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as err:
        out = "\n".join(_text(x) for x in (err.stdout, err.stderr))
        raise FlowerDeploymentError(
            explain_flower_error(out, context=f"`{' '.join(argv)}` timed out")
        ) from err
    return CliResult(argv, cp.returncode, cp.stdout, cp.stderr)
