"""The service's Ed25519 signing key (made at first start in the data dir) and device tokens."""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from shared.atomic import atomic_write_bytes, atomic_write_text
from shared.hashing import b64, generate_keypair, read_key, sign
from shared.manifest import Manifest

PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class SigningKey:
    def __init__(self, data_dir: str | os.PathLike):
        data_dir = Path(data_dir)
        priv, pub = data_dir / PRIVATE_KEY, data_dir / PUBLIC_KEY
        if not priv.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            private, public = generate_keypair()
            atomic_write_bytes(priv, (b64(private) + "\n").encode(), mode=0o600)
            atomic_write_text(pub, b64(public) + "\n")
        self.private = read_key(priv)
        self.public = read_key(pub)
        self.public_path = pub

    @property
    def public_b64(self) -> str:
        return b64(self.public)

    def sign_manifest(self, manifest: Manifest) -> Manifest:
        signed = manifest.model_copy(update={"signature": None})
        signed.signature = sign(self.private, signed.canonical_bytes())
        return signed


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
