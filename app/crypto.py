"""Encryption at rest for BMC passwords (Fernet, from the cryptography package)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

LOG = logging.getLogger(__name__)


class SecretBox:
    """Encrypts and decrypts driver secrets with one Fernet key."""

    def __init__(self, key: str | bytes) -> None:
        self._fernet = Fernet(key)

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ValueError("a stored secret cannot be decrypted with this key") from None


def load_or_create_key(configured: str | None, key_file: Path) -> str:
    """The configured key, else one kept beside the state file (created 0600)."""
    if configured:
        return configured
    if key_file.exists():
        return key_file.read_text().strip()
    key = Fernet.generate_key().decode()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    LOG.warning("no secret_key configured; generated %s for BMC passwords", key_file)
    return key
