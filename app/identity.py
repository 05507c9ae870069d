"""crashlab's embedded Keystone: password authentication, lockout and tokens.

A token is ``<id>.<secret>``, both random (``secrets.token_urlsafe``). Its row
in the state file (``identity_tokens``) holds the id, a SHA-256 digest of the
secret, the credentials, the expiry and the audit id; the secret is checked
with ``hmac.compare_digest``, so timing reveals nothing of it. Every
``crashlab serve`` on one state file honours and revokes the same tokens, and
a token outlives a restart until it expires, as a Keystone token does.

A failed login costs one bcrypt check whether or not the user exists: an
unknown user is checked against a dummy hash at the highest cost among the
configured users' hashes. The checks run on one dedicated thread, never on
the threads that serve the API, so a flood of logins queues behind itself;
past ``MAX_PENDING_LOGINS`` a login is refused at once (503) rather than queued.

Keystone's account lockout (``[security_compliance] lockout_failure_attempts``
and ``lockout_duration``), as Keystone's SQL identity backend does it:
failed logins are counted per user in ``identity_failed_logins``; once a user
has ``lockout_failure_attempts`` of them, it is refused, right password or
not and without a password check, until ``lockout_duration`` seconds have
passed since the last one; a successful login resets the count.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import bcrypt
from sqlalchemy import JSON, DateTime, Engine, Integer, String, delete
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.config import (
    DEFAULT_DOMAIN_ID,
    DEFAULT_DOMAIN_NAME,
    IdentityConfig,
    ProjectConfig,
    UserConfig,
)
from app.exceptions import ServiceUnavailable
from app.policy import Credentials
from app.store import Base

DEFAULT_ROUNDS = 10
# One bcrypt at a time leaves the other cores to the API; more logins than
# this waiting are refused rather than queued for seconds.
HASH_WORKERS = 1
MAX_PENDING_LOGINS = 32


def hash_password(password: str, rounds: int = DEFAULT_ROUNDS) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


class AuthenticationFailed(Exception):
    """Wrong user, password or scope; Keystone answers 401 without saying which."""


class AccountLocked(AuthenticationFailed):
    """Too many failed logins; Keystone names the user in its answer."""

    def __init__(self, user_id: str) -> None:
        super().__init__(user_id)
        self.user_id = user_id


class LoginsBusy(ServiceUnavailable):
    default_message = "Too many logins are waiting for a password check; try again shortly."


@dataclass(frozen=True)
class Domain:
    """A domain as a request names it; Keystone looks a name up first, else the id."""

    id: str | None = None
    name: str | None = None

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_DOMAIN_NAME if self.name else self.id == DEFAULT_DOMAIN_ID


@dataclass(frozen=True)
class Reference:
    """A user or a project as a request names it: by name within a domain, else by id."""

    id: str | None = None
    name: str | None = None
    domain: Domain | None = None


@dataclass(frozen=True)
class PasswordAuth:
    """A v3 password authentication request.

    ``scope`` is "default" (none asked: the user's default project), "project",
    or a scope crashlab cannot grant: "domain", "system", "unscoped" or
    "OS-TRUST:trust".
    """

    user: Reference
    password: str | None
    scope: str = "default"
    project: Reference | None = None


@dataclass(frozen=True)
class Token:
    secret_digest: str
    credentials: Credentials
    issued_at: dt.datetime
    expires_at: dt.datetime
    audit_id: str


class TokenRecord(Base):
    """An issued token; the secret itself is never stored."""

    __tablename__ = "identity_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_digest: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(255))
    user_name: Mapped[str] = mapped_column(String(255))
    project_id: Mapped[str] = mapped_column(String(255))
    project_name: Mapped[str] = mapped_column(String(255))
    roles: Mapped[list[str]] = mapped_column(JSON)
    issued_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    audit_id: Mapped[str] = mapped_column(String(32))


class FailedLogins(Base):
    """Keystone's local_user.failed_auth_count and failed_auth_at, per user."""

    __tablename__ = "identity_failed_logins"

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    last_failed_at: Mapped[dt.datetime] = mapped_column(DateTime)


class TokenStore:
    """Authenticates the users in the config and issues, validates and revokes tokens."""

    def __init__(self, identity: IdentityConfig, engine: Engine) -> None:
        self.identity = identity
        self.engine = engine
        tables = [
            Base.metadata.tables[t] for t in (TokenRecord.__tablename__, FailedLogins.__tablename__)
        ]
        Base.metadata.create_all(engine, tables=tables)
        self._dummy_hash = _dummy_hash(identity.users)
        self._hashing = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="crashlab-login")
        self._pending = 0
        self._pending_lock = threading.Lock()

    async def login(self, auth: PasswordAuth) -> tuple[str, Token]:
        """Authenticate on the login thread and issue a token; LoginsBusy when it is full."""
        with self._pending_lock:
            if self._pending >= MAX_PENDING_LOGINS:
                raise LoginsBusy()
            self._pending += 1
        future = self._hashing.submit(self.login_now, auth)
        future.add_done_callback(self._login_done)
        return await asyncio.wrap_future(future)

    def _login_done(self, _future: Future[Any]) -> None:
        with self._pending_lock:
            self._pending -= 1

    def login_now(self, auth: PasswordAuth, now: dt.datetime | None = None) -> tuple[str, Token]:
        """Keystone's order: lockout, password, then scope; one bcrypt check in any case."""
        now = now or dt.datetime.now(dt.UTC)
        user = self._find_user(auth.user)
        failures = self._check_lockout(user, now) if user is not None else 0
        stored = user.password_hash.encode() if user is not None else self._dummy_hash
        if not _password_matches(auth.password or "", stored) or user is None:
            if user is not None:
                self._record_failure(user.user_id, now)
            raise AuthenticationFailed()
        if failures:
            self._reset_failures(user.user_id)
        return self._issue(user, self._scoped_project(user, auth), now)

    def validate(self, value: str | None, now: dt.datetime | None = None) -> Token | None:
        """The token's data if it is known and unexpired, else None."""
        token_id, _, secret = (value or "").partition(".")
        if not token_id or not secret:
            return None
        with Session(self.engine) as session:
            record = session.get(TokenRecord, token_id)
        if record is None or not hmac.compare_digest(record.secret_digest, _digest(secret)):
            return None
        token = _token(record)
        if (now or dt.datetime.now(dt.UTC)) >= token.expires_at:
            return None
        return token

    def revoke(self, value: str) -> bool:
        if self.validate(value) is None:
            return False
        with Session(self.engine) as session, session.begin():
            gone = session.execute(delete(TokenRecord).where(TokenRecord.id == value.split(".")[0]))
            return bool(gone.rowcount)  # type: ignore[attr-defined]

    def _find_user(self, ref: Reference) -> UserConfig | None:
        if ref.name:
            if ref.domain is None or not ref.domain.is_default:
                return None
            return self.identity.user_by_name(ref.name)
        return self.identity.user_by_id(ref.id or "")

    def _scoped_project(self, user: UserConfig, auth: PasswordAuth) -> ProjectConfig:
        """The default project, or the one asked for if it is the user's; else 401.

        A crashlab user has a role on its default project only, so any other
        scope is one Keystone would refuse as "no access" (a 401).
        """
        default = self.identity.project_by_name(user.project)
        assert default is not None, "config validation guarantees the project"
        if auth.scope == "default":
            return default
        ref = auth.project
        if auth.scope != "project" or ref is None:
            raise AuthenticationFailed()
        if ref.name:
            in_default = ref.domain is not None and ref.domain.is_default
            project = self.identity.project_by_name(ref.name) if in_default else None
        else:
            project = self.identity.project_by_id(ref.id or "")
        if project is None or project.name != default.name:
            raise AuthenticationFailed()
        return project

    def _check_lockout(self, user: UserConfig, now: dt.datetime) -> int:
        """The user's failed logins; AccountLocked while it is locked out."""
        with Session(self.engine) as session:
            record = session.get(FailedLogins, user.user_id)
        if record is None:
            return 0
        policy = self.identity.security_compliance
        attempts = policy.lockout_failure_attempts
        if attempts and record.count >= attempts:
            until = record.last_failed_at + dt.timedelta(seconds=policy.lockout_duration)
            if until > _naive(now):
                raise AccountLocked(user.user_id)
            self._reset_failures(user.user_id)
            return 0
        return record.count

    def _record_failure(self, user_id: str, now: dt.datetime) -> None:
        # One statement, so that processes sharing the state file never lose a count.
        new = insert(FailedLogins).values(user_id=user_id, count=1, last_failed_at=_naive(now))
        counted = new.on_conflict_do_update(
            index_elements=[FailedLogins.user_id],
            set_={
                FailedLogins.count: FailedLogins.count + 1,
                FailedLogins.last_failed_at: _naive(now),
            },
        )
        with Session(self.engine) as session, session.begin():
            session.execute(counted)

    def _reset_failures(self, user_id: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(delete(FailedLogins).where(FailedLogins.user_id == user_id))

    def _issue(
        self, user: UserConfig, project: ProjectConfig, now: dt.datetime
    ) -> tuple[str, Token]:
        token_id, secret = secrets.token_urlsafe(12), secrets.token_urlsafe(32)
        record = TokenRecord(
            id=token_id,
            secret_digest=_digest(secret),
            user_id=user.user_id,
            user_name=user.name,
            project_id=project.project_id,
            project_name=project.name,
            roles=list(user.effective_roles),
            issued_at=_naive(now),
            expires_at=_naive(now + dt.timedelta(seconds=self.identity.token_ttl_seconds)),
            audit_id=secrets.token_urlsafe(16),
        )
        token = _token(record)
        with Session(self.engine) as session, session.begin():
            session.execute(delete(TokenRecord).where(TokenRecord.expires_at <= _naive(now)))
            session.add(record)
        return f"{token_id}.{secret}", token


def _token(record: TokenRecord) -> Token:
    return Token(
        secret_digest=record.secret_digest,
        credentials=Credentials(
            user_id=record.user_id,
            user_name=record.user_name,
            project_id=record.project_id,
            project_name=record.project_name,
            roles=tuple(record.roles),
        ),
        issued_at=record.issued_at.replace(tzinfo=dt.UTC),
        expires_at=record.expires_at.replace(tzinfo=dt.UTC),
        audit_id=record.audit_id,
    )


def _naive(moment: dt.datetime) -> dt.datetime:
    """UTC without tzinfo, as the state file stores times (app.store.utcnow)."""
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def _dummy_hash(users: list[UserConfig]) -> bytes:
    """A hash as costly to check as the costliest stored one (its cost is ``$2b$<cost>$``)."""
    cost = max((int(u.password_hash.split("$")[2]) for u in users), default=DEFAULT_ROUNDS)
    return bcrypt.hashpw(b"crashlab", bcrypt.gensalt(rounds=cost))


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
