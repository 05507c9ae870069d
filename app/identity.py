"""crashlab's embedded Keystone: password authentication and tokens.

A token is ``<id>.<secret>``, both random (``secrets.token_urlsafe``). It is
found by its id and its secret is checked against a stored SHA-256 digest with
``hmac.compare_digest``, so timing reveals nothing of the secret. Tokens expire
and live in memory only: a restarted service asks clients to authenticate
again (401), which keystoneauth does by itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

import bcrypt

from app.config import IdentityConfig, UserConfig
from app.policy import Credentials

# bcrypt.checkpw on a dummy hash keeps failed look-ups as slow as real ones.
_DUMMY_HASH = bcrypt.hashpw(b"crashlab", bcrypt.gensalt(rounds=4))


def hash_password(password: str, rounds: int = 10) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


class AuthenticationFailed(Exception):
    """Wrong user, password or project; Keystone answers 401 without saying which."""


@dataclass(frozen=True)
class Token:
    secret_digest: str
    credentials: Credentials
    issued_at: dt.datetime
    expires_at: dt.datetime
    audit_id: str


class TokenStore:
    """Issues and validates tokens for the users in the config."""

    def __init__(self, identity: IdentityConfig) -> None:
        self.identity = identity
        self._tokens: dict[str, Token] = {}
        self._lock = threading.Lock()

    def authenticate(self, user_name: str, password: str, project_name: str | None) -> UserConfig:
        user = next((u for u in self.identity.users if u.name == user_name), None)
        stored = user.password_hash.encode() if user else _DUMMY_HASH
        if not _password_matches(password, stored) or user is None:
            raise AuthenticationFailed()
        if project_name is not None and project_name != user.project:
            raise AuthenticationFailed()
        return user

    def issue(self, user: UserConfig, now: dt.datetime | None = None) -> tuple[str, Token]:
        now = now or dt.datetime.now(dt.UTC)
        project = self.identity.project_by_name_or_id(user.project)
        assert project is not None, "config validation guarantees the project"
        token_id, secret = secrets.token_urlsafe(12), secrets.token_urlsafe(32)
        token = Token(
            secret_digest=_digest(secret),
            credentials=Credentials(
                user_id=user.user_id,
                user_name=user.name,
                project_id=project.project_id,
                project_name=project.name,
                roles=tuple(user.effective_roles),
            ),
            issued_at=now,
            expires_at=now + dt.timedelta(seconds=self.identity.token_ttl_seconds),
            audit_id=secrets.token_urlsafe(16),
        )
        with self._lock:
            self._purge_expired(now)
            self._tokens[token_id] = token
        return f"{token_id}.{secret}", token

    def validate(self, value: str | None, now: dt.datetime | None = None) -> Token | None:
        """The token's data if it is known and unexpired, else None."""
        token_id, _, secret = (value or "").partition(".")
        token = self._tokens.get(token_id)
        if token is None or not hmac.compare_digest(token.secret_digest, _digest(secret)):
            return None
        if (now or dt.datetime.now(dt.UTC)) >= token.expires_at:
            return None
        return token

    def project_of(self, value: str | None) -> str | None:
        """The project a valid token is scoped to, else None."""
        token = self.validate(value)
        return token.credentials.project_id if token else None

    def revoke(self, value: str) -> bool:
        if self.validate(value) is None:
            return False
        with self._lock:
            return self._tokens.pop(value.partition(".")[0], None) is not None

    def _purge_expired(self, now: dt.datetime) -> None:
        for token_id in [i for i, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[token_id]


def _password_matches(password: str, stored: bytes) -> bool:
    """bcrypt's verdict; a password bcrypt cannot take is a wrong password, not a 500."""
    try:
        return bcrypt.checkpw(password.encode(), stored)
    except ValueError:
        # bcrypt 5 refuses passwords over 72 bytes (and hash_password with
        # it), so no stored hash can match one.
        return False


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
