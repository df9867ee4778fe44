"""Development certificates and SuperNode keys for a Flower deployment (``medfed flower certs``).

A real Flower federation needs two separate kinds of key material:

* **TLS** between SuperNodes and the SuperLink: a CA certificate that every SuperNode trusts
  (``flower-supernode --root-certificates``) and a SuperLink certificate/key signed by it
  (``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``). The SuperLink
  certificate must name every host name or IP address the SuperNodes dial, otherwise the TLS
  hostname check fails.
* **Node authentication**: one EC key pair per SuperNode. Flower reads these with
  ``cryptography``'s ``load_ssh_private_key`` / ``load_ssh_public_key``, so they must be in
  OpenSSH format; a PKCS8 PEM key ("BEGIN PRIVATE KEY") is rejected with "Unable to parse the
  private key file".

Key types:

* TLS keys (CA and SuperLink) are **EC P-256** (ECDSA with SHA-256). Every TLS stack in the
  path accepts it (gRPC's BoringSSL/OpenSSL for the Fleet API, Python's ``ssl`` under uvicorn
  for the HTTP APIs, the ``openssl`` command line), it is as strong as RSA-3072, and key
  generation is milliseconds rather than the RSA prime search, which keeps the tests quick.
* SuperNode keys are **EC SECP384R1**, the curve Flower generates for node auth itself
  (``flwr.supercore.primitives.asymmetric.generate_key_pairs``) and the one its docs and error
  messages name; ``flwr supernode register`` accepts any NIST curve.

Everything here is for development and testing: the CA key is written next to the
certificates, nothing is encrypted, and no revocation exists. The README written alongside
says so.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_NAME",
    "README_NAME",
    "SERVER_CERT_NAME",
    "SERVER_KEY_NAME",
    "DevCertificates",
    "generate_dev_certificates",
    "node_key_names",
]

# The CA private key is deliberately not written: nothing here needs it after signing, and a
# CA key lying around a development folder could mint certificates for any host name. To add a
# host, regenerate the folder with overwrite=True and hand out the new ca.crt.
CA_CERT_NAME = "ca.crt"
SERVER_CERT_NAME = "superlink.crt"
SERVER_KEY_NAME = "superlink.key"
README_NAME = "README.txt"

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

# Certificates start a few minutes in the past so a SuperNode whose clock lags the machine
# that generated them slightly does not reject a "not yet valid" certificate.
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_TLS_CURVE = ec.SECP256R1
_NODE_CURVE = ec.SECP384R1
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class DevCertificates:
    """Paths of the files :func:`generate_dev_certificates` wrote.

    ``node_keys`` holds one ``(private key, public key)`` pair per SuperNode, both in OpenSSH
    format: the private key goes to ``flower-supernode --auth-supernode-private-key``, the
    public key to ``flwr supernode register``.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[tuple[Path, Path], ...]
    readme: Path | None = None


def node_key_names(index: int) -> tuple[str, str]:
    """File names of SuperNode ``index``'s (1-based) key pair, like ``ssh-keygen`` names them."""
    return f"supernode-{index}", f"supernode-{index}.pub"


def generate_dev_certificates(
    out_dir: Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    num_nodes: int = 3,
    days: int = 365,
    overwrite: bool = False,
) -> DevCertificates:
    """Write a development CA, a SuperLink certificate and ``num_nodes`` SuperNode key pairs.

    ``hosts`` are the names SuperNodes use to reach the SuperLink; IP literals become
    ``IPAddress`` and anything else ``DNSName`` entries of the certificate's
    SubjectAlternativeName (TLS clients check the SAN, not the common name). Existing files
    are never replaced unless ``overwrite`` is true, because regenerating the CA silently would
    break every SuperNode already holding the old ``ca.crt``; the check covers every file
    before anything is written, so a refused call leaves the folder untouched.
    """
    out_dir = Path(out_dir)
    sans = _parse_hosts(hosts)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be an integer >= 1, got {days!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")

    ca_cert_path = out_dir / CA_CERT_NAME
    server_cert_path = out_dir / SERVER_CERT_NAME
    server_key_path = out_dir / SERVER_KEY_NAME
    readme_path = out_dir / README_NAME
    node_paths = tuple(
        (out_dir / priv, out_dir / pub)
        for priv, pub in (node_key_names(i) for i in range(1, num_nodes + 1))
    )
    all_paths = [ca_cert_path, server_cert_path, server_key_path, readme_path]
    all_paths += [p for pair in node_paths for p in pair]
    if not overwrite:
        for path in all_paths:
            if path.exists() or path.is_symlink():
                raise FileExistsError(
                    f"{path} already exists; refusing to overwrite it "
                    "(pass overwrite=True to regenerate every file in the folder)"
                )

    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _CLOCK_SKEW
    not_after = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_TLS_CURVE())
    ca_cert = _build_ca_cert(ca_key, not_before, not_after)
    server_key = ec.generate_private_key(_TLS_CURVE())
    server_cert = _build_server_cert(
        server_key,
        ca_key,
        ca_cert,
        sans,
        common_name=hosts[0].strip(),
        not_before=not_before,
        not_after=not_after,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, overwrite)
    _write(
        server_cert_path,
        # Full chain is not needed: SuperNodes are given ca.crt as their root.
        server_cert.public_bytes(serialization.Encoding.PEM),
        PUBLIC_MODE,
        overwrite,
    )
    _write(server_key_path, _pem_private(server_key), PRIVATE_MODE, overwrite)

    for index, (priv_path, pub_path) in enumerate(node_paths, start=1):
        node_key = ec.generate_private_key(_NODE_CURVE())
        private_bytes = node_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.OpenSSH,
            encryption_algorithm=serialization.NoEncryption(),
        )
        public_bytes = node_key.public_key().public_bytes(
            encoding=serialization.Encoding.OpenSSH,
            format=serialization.PublicFormat.OpenSSH,
        )
        # A trailing comment, as ssh-keygen writes, so a registered key can be told apart.
        public_line = public_bytes + f" medfed-supernode-{index}\n".encode()
        _write(priv_path, private_bytes, PRIVATE_MODE, overwrite)
        _write(pub_path, public_line, PUBLIC_MODE, overwrite)

    _write(
        readme_path,
        _readme(
            hosts=[h.strip() for h in hosts], num_nodes=num_nodes, not_after=not_after
        ).encode(),
        PUBLIC_MODE,
        overwrite,
    )
    return DevCertificates(
        ca_cert=ca_cert_path,
        server_cert=server_cert_path,
        server_key=server_key_path,
        node_keys=node_paths,
        readme=readme_path,
    )


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hosts``; a bare ``str`` is refused because it would split into chars."""
    if isinstance(hosts, (str, bytes)):
        raise ValueError(f"hosts must be a sequence of host names, not a single string: {hosts!r}")
    if len(hosts) == 0:
        raise ValueError("hosts must name at least one host name or IP address")
    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"hosts must be non-empty strings, got {raw!r}")
        host = raw.strip()
        key = host.lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            # DNS names are ASCII (IDNA) in certificates; letters, digits, '-', '.', a leading
            # '*.' wildcard. Anything else (spaces, URLs, host:port) is a mistake worth naming.
            if not _HOSTNAME.fullmatch(host):
                raise ValueError(
                    f"not a host name or IP address: {raw!r} (give bare names like "
                    "'superlink.example.org' or '10.0.0.5', no port or scheme; IDNA form for "
                    "non-ASCII names)"
                ) from None
            sans.append(x509.DNSName(host))
    return sans


def _build_ca_cert(
    key: ec.EllipticCurvePrivateKey, not_before: _dt.datetime, not_after: _dt.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "medfed development CA (not for production)"),
        ]
    )
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _build_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: list[x509.GeneralName],
    *,
    common_name: str,
    not_before: _dt.datetime,
    not_after: _dt.datetime,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed development"),
            # CN is informational only (clients match the SAN); X.520 caps it at 64 characters.
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                # ECDSA TLS server keys sign the handshake; no key encipherment (that is RSA).
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS8 PEM, unencrypted: what gRPC, Python's ssl and openssl all load without a prompt.
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` with ``mode`` from the first byte, so a private key is never world-readable.

    Without ``overwrite`` the file is created with O_EXCL, which also catches a file that
    appeared after the up-front existence check. With ``overwrite`` an existing file is
    truncated and re-chmodded (os.open's mode applies only to new files). A symlink is never
    followed: a planted link could otherwise redirect a private key elsewhere.
    """
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    if overwrite:
        if path.is_symlink():
            path.unlink()
        flags |= os.O_TRUNC
    else:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it (pass overwrite=True)"
        ) from None
    with os.fdopen(fd, "wb") as fh:
        if hasattr(os, "fchmod"):
            os.fchmod(fh.fileno(), mode)
        fh.write(data)


def _readme(*, hosts: list[str], num_nodes: int, not_after: _dt.datetime) -> str:
    node_range = "1" if num_nodes == 1 else f"1 ... {num_nodes}"
    host = hosts[0]
    if ":" in host:
        host = f"[{host.strip('[]')}]"
    return f"""\
DEVELOPMENT CERTIFICATES - NOT FOR PRODUCTION
=============================================

Written by `medfed flower certs`. No key is encrypted and all of them were
made on one machine: anyone who can read this folder can impersonate the
SuperLink or any SuperNode. Use them on a laptop, in CI or on a closed test
network only; for a real deployment use your organisation's PKI and generate
each SuperNode's key on that node. The CA private key was discarded after
signing; to add a host name, regenerate the whole folder (--overwrite) and
hand out the new ca.crt.

Valid until {not_after:%Y-%m-%d %H:%M} UTC. SuperLink certificate names: {", ".join(hosts)}
(a SuperNode must dial one of these names exactly, or TLS verification fails).

Files and the flags that use them
---------------------------------
ca.crt          CA certificate (EC P-256).
                  flower-superlink --ssl-ca-certfile ca.crt
                  flower-supernode --root-certificates ca.crt
                  flwr CLI (pyproject.toml federation): root-certificates = "ca.crt"
superlink.crt   SuperLink TLS certificate, signed by ca.crt.
                  flower-superlink --ssl-certfile superlink.crt
superlink.key   SuperLink TLS private key (PKCS8 PEM), 0600.
                  flower-superlink --ssl-keyfile superlink.key
supernode-N     SuperNode N's node-authentication private key (EC SECP384R1,
                OpenSSH format, 0600), for N = {node_range}.
                  flower-supernode --auth-supernode-private-key supernode-N
supernode-N.pub SuperNode N's public key (OpenSSH format, `ecdsa-sha2-nistp384 ...`).
                  flwr supernode register supernode-N.pub <federation>
                (with the SuperLink started with --enable-supernode-auth)

Example
-------
  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt \\
      --ssl-keyfile superlink.key --enable-supernode-auth
  flwr supernode register supernode-1.pub <federation>
  flower-supernode --superlink {host}:<port> --root-certificates ca.crt \\
      --auth-supernode-private-key supernode-1

<port> is the SuperLink's Fleet API port for your Flower version (--port,
8000, in Flower 1.41; --fleet-api-address, 9092, in older releases).

Node keys must stay in OpenSSH format: Flower loads them with
load_ssh_private_key / load_ssh_public_key and rejects PKCS8 PEM keys.
"""
