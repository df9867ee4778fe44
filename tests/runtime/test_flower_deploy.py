"""Flower deployment runtime on loopback: real SuperLink/SuperNode processes (issue #8).

The slow tests start ``flower-superlink`` (TLS + SuperNode auth) and ``flower-supernode``
subprocesses through :class:`medfed.runtime.flower.deploy.LocalDeployment` and run the tiny
app in ``tests/runtime/flower_app``. Leak checks scan ``/proc`` for any process whose
``FLWR_HOME`` lies under the deployment's work dir, which catches grandchildren
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) even in other sessions.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from medfed.runtime.flower.deploy import (  # noqa: E402
    FlowerDeploymentError,
    FlowerErrorKind,
    InsecureDeploymentWarning,
    LocalDeployment,
    NodeSpec,
    NodeStatus,
    RunStatus,
    SuperLinkConnection,
    SuperLinkOptions,
    SuperNodeOptions,
    TlsFiles,
    diagnose_flower_error,
    explain_flower_error,
    format_config,
    register_args,
    run_args,
)
from tests.runtime.leaks import assert_no_leaks  # noqa: E402

APP_DIR = Path(__file__).parent / "flower_app"
NUMBERS = (1, 2, 4)  # node_config "number" of the three registered SuperNodes


# --------------------------------------------------------------------------- key material


def _generate(out: Path, num_nodes: int) -> tuple[TlsFiles, list[tuple[Path, Path]]]:
    from medfed.runtime.flower.certs import generate_dev_certificates

    c = generate_dev_certificates(out, hosts=("localhost", "127.0.0.1"), num_nodes=num_nodes)
    return TlsFiles(c.ca_cert, c.server_cert, c.server_key), [tuple(k) for k in c.node_keys]


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory):
    tls, keys = _generate(tmp_path_factory.mktemp("certs"), num_nodes=5)
    other_tls, _ = _generate(tmp_path_factory.mktemp("other-ca"), num_nodes=1)
    return tls, keys, other_tls


# --------------------------------------------------------------------------- leak checks


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


# --------------------------------------------------------------------------- shared deployment


@pytest.fixture(scope="class")
def deployment(material, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """SuperLink + 3 registered SuperNodes for TestSharedDeployment, leak-checked afterwards."""
    tls, keys, _ = material
    nodes = [
        NodeSpec(priv, pub, {"number": n, "site": f"hospital-{i}"})
        for i, ((priv, pub), n) in enumerate(zip(keys, NUMBERS, strict=False))
    ]
    dep = LocalDeployment(tmp_path_factory.mktemp("deploy"), tls=tls, nodes=nodes)
    with dep:
        yield dep
    assert_no_leaks(dep, [])


@pytest.mark.slow
@needs_proc
class TestSharedDeployment:
    """One SuperLink (TLS + node auth) + 3 registered SuperNodes, shared by these tests and
    torn down (and leak-checked) right after them, before the other deployments start."""

    def test_round_trip_three_registered_supernodes(
        self, deployment: LocalDeployment, tmp_path
    ) -> None:
        result_path = tmp_path / "result.json"
        result = deployment.run_app(
            APP_DIR, run_config={"result-path": str(result_path), "expected-nodes": 3}
        )
        assert result.status is RunStatus.COMPLETED, result.log
        got = json.loads(result_path.read_text())
        assert got["errors"] == []
        assert sorted(got["numbers"]) == sorted(float(n) for n in NUMBERS)
        assert got["sum"] == [float(sum(NUMBERS))] * 2
        assert sorted(got["node_ids"]) == sorted(str(i) for i in deployment.node_ids.values())

    def test_unregistered_supernode_is_refused(self, deployment: LocalDeployment, material):
        _, keys, _ = material
        priv, pub = keys[3]  # never registered
        proc = deployment.start_supernode(NodeSpec(priv, pub, {"number": 1000}, register=False))
        code = proc.wait_exit(timeout=30)
        assert code != 0
        problem = diagnose_flower_error(proc.output())
        assert problem is not None, proc.tail()
        assert problem.kind is FlowerErrorKind.UNREGISTERED_KEY, proc.tail()
        # The SuperLink knows exactly the registered nodes, all online; the refused one is absent.
        nodes = {int(str(n["node-id"])): n["status"] for n in deployment.nodes()}
        assert nodes == {i: NodeStatus.ONLINE for i in deployment.node_ids.values()}
        message = str(proc.failure("SuperNode"))
        assert "not registered" in message and "Failed to activate SuperNode" in message

    def test_supernode_with_a_different_ca_cannot_connect(
        self, deployment: LocalDeployment, material
    ) -> None:
        _, keys, other_tls = material
        priv, pub = keys[0]  # a registered key: only TLS stands in the way
        proc = deployment.start_supernode(
            NodeSpec(priv, pub, {"number": 1000}, register=False),
            root_certificates=other_tls.ca_cert,
            max_retries=0,
        )
        assert proc.wait_exit(timeout=30) != 0
        problem = diagnose_flower_error(proc.output())
        assert problem is not None, proc.tail()
        assert problem.kind is FlowerErrorKind.TLS_UNTRUSTED, proc.tail()
        assert "CERTIFICATE_VERIFY_FAILED" in proc.output()


# --------------------------------------------------------------------------- failure paths


@pytest.mark.slow
@needs_proc
def test_failing_serverapp_run_is_reported_and_torn_down(material, tmp_path) -> None:
    tls, keys, _ = material
    (priv, pub) = keys[4]
    dep = LocalDeployment(tmp_path / "deploy", tls=tls, nodes=[NodeSpec(priv, pub, {"number": 1})])
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="run failed"), dep:
        result = dep.run_app(APP_DIR, run_config={"fail": True, "expected-nodes": 1})
        seen = dep.all_pids()
        assert len(seen) >= 4  # superlink + superexec, supernode + superexec
        assert result.status is RunStatus.FAILED
        assert "deliberate ServerApp failure" in result.details
        raise RuntimeError("run failed")  # the caller's code blows up inside the block
    assert_no_leaks(dep, seen)


@pytest.mark.slow
@needs_proc
def test_startup_failure_tears_everything_down(material, tmp_path) -> None:
    tls, keys, other_tls = material
    (priv, pub) = keys[4]
    # Registered, but it trusts the wrong CA: it never comes online, start() must fail.
    node = NodeSpec(priv, pub, {"number": 1}, root_certificates=other_tls.ca_cert)
    dep = LocalDeployment(tmp_path / "deploy", tls=tls, nodes=[node], startup_timeout=30)
    with pytest.raises(FlowerDeploymentError, match="TLS verification failed"), dep:
        pytest.fail("start() should have raised")
    assert_no_leaks(dep, [])


def test_missing_certificate_file_is_reported_before_starting(material, tmp_path) -> None:
    tls, keys, _ = material
    broken = TlsFiles(tmp_path / "nope.crt", tls.server_cert, tls.server_key)
    dep = LocalDeployment(tmp_path / "deploy", tls=broken, nodes=[NodeSpec(*keys[0])])
    with pytest.raises(FlowerDeploymentError, match=r"--ssl-ca-certfile .*nope\.crt"), dep:
        pass
    assert dep.processes == []


# --------------------------------------------------------------------------- argv builders


def _tls(tmp_path: Path) -> TlsFiles:
    return TlsFiles(tmp_path / "ca.crt", tmp_path / "s.crt", tmp_path / "s.key")


def test_superlink_args_secure_by_default(tmp_path) -> None:
    argv = SuperLinkOptions(tls=_tls(tmp_path), port=9100, health_address="127.0.0.1:9101").args()
    assert argv[0] == "flower-superlink"
    assert "--insecure" not in argv
    for flag, value in [
        ("--ssl-ca-certfile", str(tmp_path / "ca.crt")),
        ("--ssl-certfile", str(tmp_path / "s.crt")),
        ("--ssl-keyfile", str(tmp_path / "s.key")),
        ("--port", "9100"),
        ("--health-server-address", "127.0.0.1:9101"),
    ]:
        assert argv[argv.index(flag) + 1] == value
    assert "--enable-supernode-auth" in argv
    assert "--disable-runtime-dependency-installation" in argv
    with pytest.raises(ValueError, match="TLS"):
        SuperLinkOptions()


def test_insecure_is_explicit_and_loud(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        SuperLinkOptions(insecure=True)  # auth on by default: Flower refuses it without TLS
    opts = SuperLinkOptions(insecure=True, enable_supernode_auth=False)
    with pytest.warns(InsecureDeploymentWarning, match="WITHOUT TLS"):
        argv = opts.args()
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv
    with pytest.raises(ValueError, match="CA certificate"):
        SuperNodeOptions(superlink="127.0.0.1:9100", auth_private_key=tmp_path / "k")
    with pytest.warns(InsecureDeploymentWarning):
        SuperNodeOptions(superlink="h:1", insecure=True).args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SuperLinkOptions(tls=_tls(tmp_path)).args()  # secure: silent


def test_supernode_register_and_run_args(tmp_path) -> None:
    opts = SuperNodeOptions(
        superlink="127.0.0.1:9100",
        root_certificates=tmp_path / "ca.crt",
        auth_private_key=tmp_path / "node_1",
        node_config={"partition-id": 0, "site": "St. Elsewhere", "frac": 0.5, "on": True},
        port=9200,
    )
    argv = opts.args()
    assert argv[argv.index("--superlink") + 1] == "127.0.0.1:9100"
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node_1")
    assert argv[argv.index("--node-config") + 1] == (
        'partition-id=0 site="St. Elsewhere" frac=0.5 on=true'
    )
    assert register_args(tmp_path / "k.pub") == [
        "flwr", "supernode", "register", str(tmp_path / "k.pub"), "medfed", "--format", "json",
    ]  # fmt: skip
    assert run_args(APP_DIR, run_config={"fail": False}, stream=True, json_output=False) == [
        "flwr", "run", str(APP_DIR), "medfed", "--run-config", "fail=false", "--stream",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="config key"):
        format_config({"bad key": 1})


def test_connection_toml(tmp_path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    path = SuperLinkConnection("127.0.0.1:9100", tmp_path / "ca.crt").write(tmp_path / "home")
    text = path.read_text()
    assert 'default = "medfed"' in text and "[superlink.medfed]" in text
    assert 'address = "127.0.0.1:9100"' in text
    assert f'root-certificates = "{tmp_path / "ca.crt"}"' in text


# --------------------------------------------------------------------------- error translation

# Raw output captured from flwr 1.41 processes and CLI calls.
RAW = {
    FlowerErrorKind.MISSING_FILE: "Path argument `--ssl-ca-certfile` does not point to a file.",
    FlowerErrorKind.UNREACHABLE: (
        "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
        "[Errno 111] Connection refused\n"
        "The SuperNode could not establish a connection to the SuperLink."
    ),
    FlowerErrorKind.TLS_UNTRUSTED: (
        "ERROR :     SSL/TLS handshake error detected.\n[SSL: CERTIFICATE_VERIFY_FAILED] "
        "certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)\n"
        "The SuperNode could not establish a connection to the SuperLink."
    ),
    FlowerErrorKind.UNREGISTERED_KEY: (
        "Failed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.\n"
        "The SuperNode could not establish a connection to the SuperLink."
    ),
    FlowerErrorKind.KEY_IN_USE: "│ [code: 23] Public key already in use.     │",
}


@pytest.mark.parametrize("kind", list(RAW))
def test_flower_errors_are_translated(kind: FlowerErrorKind) -> None:
    problem = diagnose_flower_error(RAW[kind])
    assert problem is not None and problem.kind is kind
    message = explain_flower_error(RAW[kind], context="SuperNode hospital-1")
    assert message.startswith(f"SuperNode hospital-1: {problem.message}")
    assert RAW[kind].splitlines()[-1] in message  # raw evidence is quoted


def test_unknown_error_still_quotes_output() -> None:
    assert diagnose_flower_error("something odd") is None
    assert explain_flower_error("something odd", context="x") == (
        "x failed\n--- last output ---\nsomething odd"
    )


def test_medfed_supernode_passes_its_site_data_and_ledger_folder(tmp_path, monkeypatch) -> None:
    """`medfed flower supernode --ledger-dir` reaches the ClientApp as node config, so the site
    keeps one ledger key across runs (what a resumed deployment needs)."""
    from medfed.cli import main as cli_main
    from medfed.runtime.flower import commands

    seen: list[list[str]] = []
    monkeypatch.setattr(commands, "_foreground", lambda argv, **_: seen.append(argv) or 0)
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text("name: s\ndata: {ultrasound: {num_sites: 2}}\n")
    (tmp_path / "key").write_text("k")
    (tmp_path / "ca.crt").write_text("c")
    argv = ["flower", "supernode", "--superlink", "h:1", "--site", "site1", "--site-data"]
    argv += [str(site_yaml), "--key", str(tmp_path / "key"), "--ca", str(tmp_path / "ca.crt")]
    assert cli_main([*argv, "--ledger-dir", str(tmp_path / "ledger")]) == 0
    node_config = seen[-1][seen[-1].index("--node-config") + 1]
    assert f'ledger-dir="{tmp_path / "ledger"}"' in node_config
    assert (tmp_path / "ledger").is_dir()
    assert 'site="site1"' in node_config and f'data-config="{site_yaml}"' in node_config
    assert cli_main(argv) == 0
    assert "ledger-dir" not in seen[-1][seen[-1].index("--node-config") + 1]
