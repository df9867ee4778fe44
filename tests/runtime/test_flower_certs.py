"""Development certificates for a Flower deployment (``medfed flower certs``, issue #8).

Every check uses an independent reference rather than re-reading what the generator meant to
write: ``cryptography``'s X.509 path validator (Web PKI server policy), the ``openssl verify``
command line, the exact key loaders the installed Flower calls for node authentication, and a
real TLS handshake against a running ``flower-superlink``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from medfed.runtime.flower.certs import DevCertificates, generate_dev_certificates

OPENSSH_HEADER = b"-----BEGIN OPENSSH PRIVATE KEY-----"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    out = tmp_path_factory.mktemp("certs") / "dev"
    return generate_dev_certificates(
        out, hosts=("localhost", "127.0.0.1", "::1", "superlink.example.org"), num_nodes=2
    )


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(certs: DevCertificates, subject: x509.verification.Subject) -> None:
    ca = _cert(certs.ca_cert)
    verifier = (
        PolicyBuilder()
        .store(Store([ca]))
        .time(dt.datetime.now(dt.timezone.utc))
        .build_server_verifier(subject)
    )
    chain = verifier.verify(_cert(certs.server_cert), [])
    assert chain[-1] == ca  # the chain ends at our CA, not at some system root


# --- TLS certificates ---------------------------------------------------------------------


def test_files_and_layout(certs: DevCertificates) -> None:
    out = certs.ca_cert.parent
    assert {p.name for p in out.iterdir()} == {
        "ca.crt",
        "superlink.crt",
        "superlink.key",
        "supernode-1",
        "supernode-1.pub",
        "supernode-2",
        "supernode-2.pub",
        "README.txt",
    }
    assert certs.node_keys == (
        (out / "supernode-1", out / "supernode-1.pub"),
        (out / "supernode-2", out / "supernode-2.pub"),
    )
    readme = (out / "README.txt").read_text()
    assert "not for production" in readme.lower()
    for flag in (
        "--ssl-ca-certfile ca.crt",
        "--ssl-certfile superlink.crt",
        "--ssl-keyfile superlink.key",
        "--root-certificates ca.crt",
        "--auth-supernode-private-key supernode-N",
        "flwr supernode register supernode-N.pub",
    ):
        assert flag in readme


@pytest.mark.parametrize(
    "subject",
    [
        x509.DNSName("localhost"),
        x509.DNSName("superlink.example.org"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
    ids=str,
)
def test_server_cert_verifies_against_ca(
    certs: DevCertificates, subject: x509.verification.Subject
) -> None:
    _verify(certs, subject)


@pytest.mark.parametrize(
    "subject",
    [
        x509.DNSName("wrong.example.org"),
        x509.DNSName("example.org"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
    ],
    ids=str,
)
def test_server_cert_rejected_for_other_hosts(
    certs: DevCertificates, subject: x509.verification.Subject
) -> None:
    with pytest.raises(VerificationError):
        _verify(certs, subject)


def test_server_cert_rejected_by_another_ca(certs: DevCertificates, tmp_path: Path) -> None:
    other = generate_dev_certificates(tmp_path / "other", num_nodes=1)
    verifier = (
        PolicyBuilder()
        .store(Store([_cert(other.ca_cert)]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(_cert(certs.server_cert), [])


def test_certificate_extensions(certs: DevCertificates) -> None:
    ca, server = _cert(certs.ca_cert), _cert(certs.server_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)  # self-signed

    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    # EC P-256 for both TLS keys; the key file holds the certificate's key.
    for cert in (ca, server):
        pub = cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert isinstance(pub.curve, ec.SECP256R1)
    server_key = serialization.load_pem_private_key(certs.server_key.read_bytes(), None)
    assert server_key.public_key() == server.public_key()


def test_validity_window(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.timezone.utc)
    out = generate_dev_certificates(tmp_path / "c", days=30, num_nodes=1)
    cert = _cert(out.server_cert)
    assert cert.not_valid_before_utc <= before
    assert (
        dt.timedelta(days=29, hours=23)
        < cert.not_valid_after_utc - before
        < dt.timedelta(days=30, minutes=1)
    )
    # 31 days from now the path validator must refuse it: the days option is honoured.
    later = before + dt.timedelta(days=31)
    verifier = (
        PolicyBuilder()
        .store(Store([_cert(out.ca_cert)]))
        .time(later)
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(cert, [])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")
def test_openssl_verify(certs: DevCertificates, tmp_path: Path) -> None:
    def openssl_verify(*extra: str, ca: Path = certs.ca_cert) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca), *extra, str(certs.server_cert)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = openssl_verify("-purpose", "sslserver", "-verify_hostname", "localhost")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith(": OK")
    assert openssl_verify("-verify_ip", "127.0.0.1").returncode == 0
    assert openssl_verify("-verify_hostname", "wrong.example.org").returncode != 0
    other = generate_dev_certificates(tmp_path / "other", num_nodes=1)
    assert openssl_verify(ca=other.ca_cert).returncode != 0


# --- SuperNode keys -------------------------------------------------------------------------


def test_node_keys_are_openssh_secp384r1_pairs(certs: DevCertificates) -> None:
    publics = []
    for private_path, public_path in certs.node_keys:
        private_bytes = private_path.read_bytes()
        assert private_bytes.startswith(OPENSSH_HEADER)  # not "BEGIN PRIVATE KEY" (PKCS8)
        with pytest.raises(ValueError):
            serialization.load_pem_private_key(private_bytes, None)  # PKCS8/SEC1 loaders refuse
        private = serialization.load_ssh_private_key(private_bytes, None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)

        public_text = public_path.read_text()
        assert public_text.startswith("ecdsa-sha2-nistp384 ")
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert public == private.public_key()
        publics.append(public)
    assert publics[0] != publics[1]  # one distinct identity per SuperNode


def test_pkcs8_node_key_is_what_flower_rejects() -> None:
    """The failure mode the OpenSSH format avoids: Flower's loader refuses PKCS8 keys."""
    key = ec.generate_private_key(ec.SECP384R1())
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError):
        serialization.load_ssh_private_key(pkcs8, None)


def test_node_keys_load_with_flowers_own_loaders(
    certs: DevCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Call the functions ``flower-supernode`` and ``flwr supernode register`` use.

    Only the success path is exercised in-process: on failure these call ``flwr_exit``, which
    starts a thread that ``os._exit``s the interpreter (it would kill pytest). The failure
    path is covered above with the same ``load_ssh_private_key`` Flower imports.
    """
    pytest.importorskip("flwr")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    supernode_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    register = importlib.import_module("flwr.cli.supernode.register")
    setup_auth = getattr(supernode_cli, "_try_setup_client_authentication", None)
    try_load_public_key = getattr(register, "try_load_public_key", None)
    if setup_auth is None or try_load_public_key is None:
        pytest.skip("this Flower version has no node-auth key loaders at the expected place")
    assert supernode_cli.load_ssh_private_key is serialization.load_ssh_private_key

    for private_path, public_path in certs.node_keys:
        args = argparse.Namespace(
            auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
        )
        result = setup_auth(args)
        assert result is not None
        private, public = result
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        # What `flwr supernode register` sends to the SuperLink for this node.
        registered = try_load_public_key(public_path)
        assert registered == public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


# --- files, permissions, arguments ----------------------------------------------------------


def test_private_keys_are_owner_only(certs: DevCertificates) -> None:
    private = [certs.server_key, *(priv for priv, _ in certs.node_keys)]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Certificates and public keys are meant to be shared, but never group/world-writable.
    for path in [certs.ca_cert, certs.server_cert, *(pub for _, pub in certs.node_keys)]:
        assert not stat.S_IMODE(path.stat().st_mode) & 0o022, path


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "c"
    first = generate_dev_certificates(out, num_nodes=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="ca.crt"):
        generate_dev_certificates(out, num_nodes=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    # Any one existing file is enough to refuse, and the check runs before the first write.
    first.ca_cert.unlink()
    with pytest.raises(FileExistsError, match="superlink.crt"):
        generate_dev_certificates(out, num_nodes=1)
    assert not first.ca_cert.exists()


def test_overwrite_regenerates_and_tightens_permissions(tmp_path: Path) -> None:
    out = tmp_path / "c"
    first = generate_dev_certificates(out, num_nodes=1)
    first_ca = first.ca_cert.read_bytes()
    node_private = first.node_keys[0][0]
    os.chmod(node_private, 0o644)  # loosened by hand; overwriting must not keep that mode
    second = generate_dev_certificates(out, num_nodes=1, overwrite=True)
    assert second.ca_cert.read_bytes() != first_ca
    assert stat.S_IMODE(node_private.stat().st_mode) == 0o600
    _verify(second, x509.DNSName("localhost"))


def test_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    (out / "supernode-1").symlink_to(target)
    with pytest.raises(FileExistsError, match="supernode-1"):
        generate_dev_certificates(out, num_nodes=1)
    generate_dev_certificates(out, num_nodes=1, overwrite=True)
    assert target.read_bytes() == b"untouched"
    assert not (out / "supernode-1").is_symlink()


def test_creates_missing_parent_folders(tmp_path: Path) -> None:
    out = generate_dev_certificates(tmp_path / "a" / "b", num_nodes=1)
    assert out.ca_cert.parent == tmp_path / "a" / "b"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_nodes": 0}, "num_nodes"),
        ({"num_nodes": -2}, "num_nodes"),
        ({"num_nodes": True}, "num_nodes"),
        ({"hosts": ()}, "hosts"),
        ({"hosts": []}, "hosts"),
        ({"hosts": "localhost"}, "single string"),
        ({"hosts": ("localhost", "")}, "non-empty"),
        ({"hosts": ("https://superlink",)}, "host name or IP"),
        ({"hosts": ("superlink:9092",)}, "host name or IP"),
        ({"hosts": ("two words",)}, "host name or IP"),
        ({"days": 0}, "days"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    out = tmp_path / "c"
    with pytest.raises(ValueError, match=message):
        generate_dev_certificates(out, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()  # nothing written on a refused call


def test_options_are_keyword_only(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        generate_dev_certificates(tmp_path, ("localhost",))  # type: ignore[call-arg]


# --- a real TLS handshake with flower-superlink ---------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _superlink_exe() -> Path | None:
    exe = Path(sys.executable).with_name("flower-superlink")
    return exe if exe.exists() else None


@pytest.fixture
def superlink(certs: DevCertificates, tmp_path: Path) -> Iterator[int]:
    """A running ``flower-superlink`` on loopback using the generated certificates.

    Yields the TLS port (the Runtime/Control/Fleet HTTP API, ``--port``). Every address the
    SuperLink can bind is given a free loopback port, ``--isolation process`` keeps it from
    launching a detached SuperExec, and the process is always terminated on teardown.
    """
    exe = _superlink_exe()
    if exe is None:
        pytest.skip("flower-superlink is not installed next to this interpreter")
    help_text = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    tls_port, fleet_port, control_port, health_port = (_free_port() for _ in range(4))
    cmd = [
        str(exe),
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
        "--isolation",
        "process",
        "--fleet-api-address",
        f"127.0.0.1:{fleet_port}",
        "--control-api-address",
        f"127.0.0.1:{control_port}",
    ]
    if "--health-server-address" in help_text:
        cmd += ["--health-server-address", f"127.0.0.1:{health_port}"]
    if "--port" in help_text:  # Flower >= 1.41: one HTTPS API on --host/--port
        cmd += ["--host", "127.0.0.1", "--port", str(tls_port)]
    else:  # older Flower: TLS on the gRPC Fleet API
        tls_port = fleet_port
    if "--database" in help_text:
        cmd += ["--database", ":flwr-in-memory:"]
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
    }
    log_path = tmp_path / "superlink.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flower-superlink exited early:\n{log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", tls_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"flower-superlink did not listen:\n{log_path.read_text()}")
                time.sleep(0.2)
        yield tls_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        assert proc.poll() is not None


@pytest.mark.slow
def test_tls_handshake_with_flower_superlink(certs: DevCertificates, superlink: int) -> None:
    def handshake(server_hostname: str) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        ctx.set_alpn_protocols(["h2", "http/1.1"])  # gRPC asks for h2; uvicorn for http/1.1
        sock = socket.create_connection(("127.0.0.1", superlink), timeout=10)
        try:
            return ctx.wrap_socket(sock, server_hostname=server_hostname)
        except BaseException:
            sock.close()
            raise

    for name in ("localhost", "127.0.0.1"):
        with handshake(name) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            assert x509.load_der_x509_certificate(peer) == _cert(certs.server_cert)
            # Prove the server speaks through the channel, not just that the handshake ended.
            if tls.selected_alpn_protocol() != "h2":
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert tls.recv(16).startswith(b"HTTP/1.1 ")

    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("wrong.example.org").close()
