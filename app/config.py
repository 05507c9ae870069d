"""crashlab's one YAML config file: identity, inventory and service settings.

Validated on load; a bad file fails at start-up with the offending key named.
The schema is documented in the README ("Configuration").
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivers import UnknownDriver, driver_class

# Stable ids derived from names, so a config needs no hand-made uuids.
ID_NAMESPACE = uuid.UUID("5b0e7a8e-3c47-4c8a-9d54-7c1f0c2b6a11")
DEFAULT_DOMAIN_ID = "default"
DEFAULT_DOMAIN_NAME = "Default"
# Keystone's default implied roles: admin implies member implies reader.
IMPLIED_ROLES = {"admin": ["member", "reader"], "member": ["reader"]}


def derived_id(kind: str, name: str) -> str:
    return uuid.uuid5(ID_NAMESPACE, f"{kind}:{name}").hex


class ConfigError(Exception):
    """The config file is missing, unreadable or invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserConfig(_Strict):
    name: str
    id: str | None = None
    password_hash: str = Field(
        description="bcrypt hash, from `crashlab hash-password`",
        pattern=r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$",
    )
    project: str = Field(description="the user's default project (name), its tokens' scope")
    roles: list[str]

    @property
    def user_id(self) -> str:
        return self.id or derived_id("user", self.name)

    @property
    def effective_roles(self) -> list[str]:
        roles = list(self.roles)
        for role in self.roles:
            roles += [r for r in IMPLIED_ROLES.get(role, []) if r not in roles]
        return roles


class ProjectConfig(_Strict):
    name: str
    id: str | None = None

    @property
    def project_id(self) -> str:
        return self.id or derived_id("project", self.name)


class SecurityComplianceConfig(_Strict):
    """Keystone's [security_compliance] account lockout; off unless attempts are set."""

    lockout_failure_attempts: int | None = Field(None, ge=1)
    lockout_duration: int = Field(1800, ge=1, description="seconds")


class IdentityConfig(_Strict):
    token_ttl_seconds: int = Field(3600, gt=0)
    region: str = "RegionOne"
    projects: list[ProjectConfig] = []
    users: list[UserConfig] = []
    security_compliance: SecurityComplianceConfig = Field(default_factory=SecurityComplianceConfig)

    @model_validator(mode="after")
    def _projects_from_users(self) -> IdentityConfig:
        known = {p.name for p in self.projects}
        for user in self.users:
            if user.project not in known:
                self.projects.append(ProjectConfig(name=user.project))
                known.add(user.project)
        return self

    def project_by_name_or_id(self, key: str) -> ProjectConfig | None:
        return next((p for p in self.projects if key in (p.name, p.project_id)), None)

    def user_by_name_or_id(self, key: str) -> UserConfig | None:
        return next((u for u in self.users if key in (u.name, u.user_id)), None)

    def project_by_id(self, project_id: str) -> ProjectConfig | None:
        return next((p for p in self.projects if p.project_id == project_id), None)

    def project_by_name(self, name: str) -> ProjectConfig | None:
        return next((p for p in self.projects if p.name == name), None)

    def user_by_id(self, user_id: str) -> UserConfig | None:
        return next((u for u in self.users if u.user_id == user_id), None)

    def user_by_name(self, name: str) -> UserConfig | None:
        return next((u for u in self.users if u.name == name), None)


class ServerConfig(_Strict):
    uuid: str | None = None
    name: str
    project_id: str = Field(description="project name or id")
    user_id: str = Field(description="user name or id")
    driver: str
    driver_info: dict[str, Any] = {}
    dump_target: dict[str, Any] | None = Field(
        None, description="where its crash dump lands (app/dump_targets.py); default none"
    )
    dump_timeouts: dict[str, Any] | None = None
    expected_kernel_release: str | None = Field(None, min_length=1, max_length=255)
    # Initial runtime state, applied when the server is first recorded.
    vm_state: Literal["error"] | None = None
    locked_by: Literal["admin", "owner"] | None = None

    @property
    def server_uuid(self) -> str:
        return self.uuid or str(uuid.uuid5(ID_NAMESPACE, f"server:{self.name}"))


class NMIGuardConfig(_Strict):
    """crashlab's storm guard, beyond Nova: one NMI at a time per server."""

    enabled: bool = True
    cooldown_seconds: float = Field(60.0, ge=0)


class BackendsConfig(_Strict):
    """Each backend (a libvirt URI, a BMC) is a bulkhead of its own (app/backends.py)."""

    concurrency: int = Field(4, gt=0, le=64, description="threads per backend")
    queue: int = Field(64, ge=0, le=10000, description="calls that may wait for them")
    state_timeout_seconds: float = Field(3.0, gt=0, le=60)
    breaker_failures: int = Field(3, gt=0, le=100)
    breaker_reset_seconds: float = Field(30.0, gt=0, le=3600)


class TenantRequestsConfig(_Strict):
    """Each project's compute requests in flight (app/api/admission.py)."""

    concurrency: int = Field(2, gt=0, le=1000)
    queue: int = Field(1000, ge=0, le=100000, description="more wait than this: 429")


class PowerSyncConfig(_Strict):
    """The background power-state sync, as Nova's _sync_power_states."""

    interval_seconds: float = Field(10.0, gt=0, le=86400)


class ReadinessConfig(_Strict):
    """The crash readiness checks (app/readiness.py), refreshed in the background."""

    interval_seconds: float = Field(60.0, gt=0, le=86400)
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="bound on one check")


class CaptureConfig(_Strict):
    """Host-side memory captures (app/capture.py)."""

    timeout_seconds: float = Field(300.0, gt=0, le=86400, description="then it is aborted")


class CollectorConfig(_Strict):
    """The dump collector (app/collector.py): a private sshd that receives vmcores
    sent the way kdump-tools sends them over SSH, for servers with an ``ssh`` target."""

    enabled: bool = Field(False, description="run it; needed by any server with an ssh target")
    address: str = Field("127.0.0.1", description="it listens here only")
    port: int = Field(8022, ge=1, le=65535)
    directory: Path | None = Field(None, description="default: collector/ beside the state file")
    max_dump_bytes: int = Field(16 * 2**30, ge=1, description="one upload may not exceed this")
    sshd: Path = Field(Path("/usr/sbin/sshd"), description="OpenSSH's server")


class CrashDumpsConfig(_Strict):
    """Following each dump after its NMI (app/follower.py), and keeping the vmcores."""

    directory: Path | None = Field(None, description="default: crash-dumps/ beside the state file")
    retention_count: int = Field(20, ge=1, le=100000, description="vmcores kept, newest first")
    retention_bytes: int = Field(10 * 2**30, ge=1, description="and at most this many bytes")
    clock_skew_seconds: float = Field(
        120.0, ge=0, le=86400, description="how far a guest's clock may be from this host's"
    )
    stall_seconds: float = Field(
        30.0, gt=0, le=3600, description="a dump that stops growing this long is incomplete"
    )


class Config(_Strict):
    state_file: Path | None = None
    policy_file: Path | None = None
    secret_key: str | None = Field(
        None, description="Fernet key for BMC passwords; else $CRASHLAB_SECRET_KEY"
    )
    host_name: str = "crashlab"
    public_endpoint: str | None = Field(
        None, description="root URL clients reach crashlab at; else the address it listens on"
    )
    max_body_bytes: int = Field(65536, gt=0)
    backends: BackendsConfig = Field(default_factory=BackendsConfig)
    power_sync: PowerSyncConfig = Field(default_factory=PowerSyncConfig)
    tenant_requests: TenantRequestsConfig = Field(default_factory=TenantRequestsConfig)
    # A process renews its lease every third of this; a lease this old is lapsed.
    lease_seconds: float = Field(15.0, ge=1, le=3600)
    driver_timeout_seconds: float = Field(60.0, gt=0)
    test_drivers: bool = Field(
        False,
        description="let the admin API register test backends: the fake drivers, test:///default",
    )
    nmi_guard: NMIGuardConfig = Field(default_factory=NMIGuardConfig)
    crash_dumps: CrashDumpsConfig = Field(default_factory=CrashDumpsConfig)
    readiness: ReadinessConfig = Field(default_factory=ReadinessConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    servers: list[ServerConfig] = []

    # Set by load_config: the directory relative paths resolve against.
    base_dir: Path = Path(".")

    @field_validator("public_endpoint")
    @classmethod
    def _check_public_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must have no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        names: set[str] = set()
        for index, server in enumerate(self.servers):
            where = f"servers[{index}] ({server.name})"
            if server.server_uuid in names:
                raise ValueError(f"{where}: duplicate uuid {server.server_uuid}")
            names.add(server.server_uuid)
            if self.identity.project_by_name_or_id(server.project_id) is None:
                raise ValueError(f"{where}.project_id: unknown project {server.project_id!r}")
            if self.identity.user_by_name_or_id(server.user_id) is None:
                raise ValueError(f"{where}.user_id: unknown user {server.user_id!r}")
            if (server.dump_target or {}).get("type") == "ssh" and not self.collector.enabled:
                raise ValueError(f"{where}.dump_target: an ssh target needs collector.enabled")
            try:
                driver_class(server.driver).parse_settings(server.driver_info)
            except UnknownDriver as exc:
                raise ValueError(f"{where}.driver: {exc}") from None
            except ValidationError as exc:
                raise ValueError(f"{where}.driver_info: {_first_error(exc)}") from None
        return self

    def resolve(self, path: Path | None) -> Path | None:
        if path is None:
            return None
        return path if path.is_absolute() else self.base_dir / path

    @property
    def fernet_key(self) -> str | None:
        return self.secret_key or os.environ.get("CRASHLAB_SECRET_KEY")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {error['msg']}" if location else str(error["msg"])


def load_config(path: Path) -> Config:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        config = Config.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from None
    return config
