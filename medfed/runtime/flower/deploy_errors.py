"""Turn Flower's raw output into one message a hospital IT team can act on.

Why a module of its own: the same recognition of known failures (a missing file, an untrusted CA,
an unregistered key, a port in use, an unreachable SuperLink, a failed ServerApp) serves the
``medfed flower`` commands, every ``flwr`` CLI call and every process of a
:class:`~medfed.runtime.flower.deploy.LocalDeployment`; it is pure text matching, testable on
captured output without starting anything.

What flwr 1.41 prints for two common refusals
--------------------------------------------
* An unregistered SuperNode key is refused at activation: the SuperNode exits (code 305)
  with ``[code: 2004] Failed to activate SuperNode.`` and never shows in
  ``flwr supernode list``. A SuperNode that does not trust the SuperLink's CA exits (305)
  with ``CERTIFICATE_VERIFY_FAILED``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medfed.types import StrEnum

__all__ = [
    "FlowerDeploymentError",
    "FlowerErrorKind",
    "FlowerProblem",
    "diagnose_flower_error",
    "explain_flower_error",
]

_TAIL_LINES = 25


class FlowerDeploymentError(RuntimeError):
    """A Flower process failed to start, connect or run; the message says why."""


# --------------------------------------------------------------------------- error translation


class FlowerErrorKind(StrEnum):
    MISSING_FILE = "missing-file"
    UNREACHABLE = "unreachable"
    TLS_UNTRUSTED = "tls-untrusted"
    UNREGISTERED_KEY = "unregistered-key"
    KEY_IN_USE = "key-in-use"
    PORT_IN_USE = "port-in-use"
    SERVERAPP_FAILED = "serverapp-failed"


@dataclass(frozen=True)
class FlowerProblem:
    kind: FlowerErrorKind
    message: str
    evidence: str  # the raw line that matched


# Order matters: the first match wins (a TLS failure also prints "could not establish a
# connection", so the specific causes come before the generic unreachable one).
_PATTERNS: tuple[tuple[FlowerErrorKind, re.Pattern[str], str], ...] = (
    (
        FlowerErrorKind.MISSING_FILE,
        re.compile(
            r"Path argument `(--[\w-]+)` does not point to a file"
            r"|Failed to read certificate file `([^`]+)`"
            r"|Public key file '([^']+)' does not exist"
        ),
        "a certificate/key file does not exist: {detail}",
    ),
    (
        FlowerErrorKind.TLS_UNTRUSTED,
        re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error"),
        "TLS verification failed: the SuperLink's certificate is not signed by the CA given "
        "with --root-certificates (wrong/missing CA file), or it does not name the address "
        "dialled",
    ),
    (
        FlowerErrorKind.UNREGISTERED_KEY,
        re.compile(r"Failed to activate SuperNode|\[code: 2004\]"),
        "the SuperLink refused this SuperNode: its public key is not registered (run "
        "`flwr supernode register KEY.pub` against the SuperLink first) or was unregistered",
    ),
    (
        FlowerErrorKind.KEY_IN_USE,
        re.compile(r"Public key already in use"),
        "this public key is already registered with the SuperLink",
    ),
    (
        FlowerErrorKind.PORT_IN_USE,
        re.compile(r"address already in use|Errno 98", re.IGNORECASE),
        "a port is already taken by another process",
    ),
    (
        FlowerErrorKind.UNREACHABLE,
        re.compile(
            r"Connection refused|Connection to the SuperLink is unavailable"
            r"|Giving up reconnection|could not establish a connection"
        ),
        "the SuperLink is unreachable at the configured address (not running, wrong "
        "host/port, or a firewall in between)",
    ),
    (
        FlowerErrorKind.SERVERAPP_FAILED,
        re.compile(r"ServerApp raised an exception|ServerApp failed with exception"),
        "the ServerApp raised an exception (see the run log)",
    ),
)


def diagnose_flower_error(raw: str) -> FlowerProblem | None:
    """Recognise a known Flower failure in raw stderr/CLI output, or ``None``."""
    for kind, pattern, template in _PATTERNS:
        for line in raw.splitlines():
            m = pattern.search(line)
            if m:
                detail = next((g for g in m.groups() if g), line.strip())
                return FlowerProblem(kind, template.format(detail=detail), line.strip())
    return None


def explain_flower_error(raw: str, *, context: str) -> str:
    """One clear message for Flower's raw output, quoting the tail of the raw text."""
    problem = diagnose_flower_error(raw)
    tail = "\n".join(raw.strip().splitlines()[-_TAIL_LINES:])
    head = f"{context}: {problem.message}" if problem else f"{context} failed"
    return f"{head}\n--- last output ---\n{tail}" if tail else head
