"""Ed25519 keys for the ledger: who signed an entry is a pinned public key, not a name.

``medfed keys new --out DIR --name NAME`` writes ``NAME.key`` (PKCS#8 PEM, unencrypted, mode 0600)
and ``NAME.pub`` (SubjectPublicKeyInfo PEM). A run pins public keys as 64 hex digits (the raw
32-byte Ed25519 key) in its run-start entry; every later signature is checked against those.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key (names the file)."""


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as hex: what a run pins."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_from_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as err:
        raise KeyFileError(f"not an Ed25519 public key (64 hex digits): {text!r}") from err


def _write_private(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def write_keypair(out_dir: Path, name: str, *, key: Ed25519PrivateKey | None = None) -> Path:
    """Write ``NAME.key`` (0600) and ``NAME.pub`` under ``out_dir``; refuses to overwrite."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r}: use a plain file name such as a site name")
    out_dir.mkdir(parents=True, exist_ok=True)
    priv, pub = out_dir / f"{name}{PRIVATE_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for p in (priv, pub):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite a key")
    key = key or new_key()
    _write_private(priv, private_pem(key))
    pub.write_bytes(public_pem(key.public_key()))
    return priv


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path`` (PEM), or a :class:`KeyFileError` naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise KeyFileError(f"ledger key {path}: cannot read ({err.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(
            f"ledger key {path}: not an unencrypted PEM private key ({err})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"ledger key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, generated (0600) on first use; the public key goes beside it."""
    if path.exists():
        return load_private_key(path)
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, private_pem(key))
    path.with_suffix(PUBLIC_SUFFIX).write_bytes(public_pem(key.public_key()))
    return key


def verify_signature(public: Ed25519PublicKey, signature_hex: str, message: bytes) -> bool:
    try:
        public.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True
