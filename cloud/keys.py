"""The service's Ed25519 signing key (made at first start in the data dir) and device tokens."""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from shared.atomic import atomic_write_bytes, atomic_write_text
from shared.errors import UserError
from shared.hashing import b64, generate_keypair, read_key, sign
from shared.manifest import Manifest

PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class SigningKey:
    """The Ed25519 key that signs manifests: ``DATA/signing.key`` (made at first start), or a key
    file given with ``--signing-key FILE`` / ``HMD_CLOUD_SIGNING_KEY`` kept outside the data folder
    of the process that parses uploads (its public key is written beside it as ``FILE.pub``)."""

    def __init__(self, data_dir: str | os.PathLike, key_file: str | os.PathLike | None = None):
        if key_file is not None:
            priv = Path(key_file)
            pub = priv.with_name(priv.name + ".pub")
            if not priv.is_file():
                raise UserError(f"signing key {priv} not found (make one with `python -m cloud.keys {priv}`, or leave "
                                "--signing-key out to keep one in the data folder)")
        else:
            priv, pub = Path(data_dir) / PRIVATE_KEY, Path(data_dir) / PUBLIC_KEY
            if not priv.exists():
                write_new_key(priv, pub)
        try:
            self.private = read_key(priv)
        except (OSError, ValueError):
            raise UserError(f"signing key {priv} is not readable base64") from None
        if len(self.private) != 32:
            raise UserError(f"signing key {priv} is not a raw 32-byte Ed25519 private key (base64)")
        self.public = public_key_of(self.private)
        if not pub.exists():
            atomic_write_text(pub, b64(self.public) + "\n")
        self.public_path = pub

    @property
    def public_b64(self) -> str:
        return b64(self.public)

    def sign_manifest(self, manifest: Manifest, *, sequence: int | None = None, device: str | None = None) -> Manifest:
        """A signed copy; ``sequence`` and ``device`` (the one it is for; None: all) are signed in."""
        update: dict = {"signature": None}
        if sequence is not None:
            update.update(sequence=sequence, device=device)
        signed = manifest.model_copy(update=update)
        signed.signature = sign(self.private, signed.canonical_bytes())
        return signed


def write_new_key(private_path: str | os.PathLike, public_path: str | os.PathLike | None = None) -> bytes:
    """Make a key pair: the private key (mode 0600) and its public key; returns the public key."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(private_path.name + ".pub")
    private, public = generate_keypair()
    atomic_write_bytes(private_path, (b64(private) + "\n").encode(), mode=0o600)
    atomic_write_text(public_path, b64(public) + "\n")
    return public


def public_key_of(private_raw: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(device_name: str) -> str:
    """``NAME.SECRET``: the name finds the device, the 256-bit secret proves it."""
    return f"{device_name}.{secrets.token_urlsafe(32)}"


def token_device_name(token: str) -> str | None:
    name, sep, secret = token.partition(".")
    return name if sep and secret and DEVICE_NAME.match(name) else None


def token_matches(token: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(token_sha256(token), stored_sha256)


if __name__ == "__main__":  # python -m cloud.keys FILE: a signing key kept outside the service's data folder
    import sys

    if len(sys.argv) != 2 or Path(sys.argv[1]).exists():
        sys.exit("usage: python -m cloud.keys NEW_KEY_FILE (writes NEW_KEY_FILE and NEW_KEY_FILE.pub)")
    print(b64(write_new_key(sys.argv[1])))
