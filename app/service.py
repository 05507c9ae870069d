"""The compute service: decides what may happen to a server and records it.

It follows nova/compute/api.py: look the instance up (project-scoped unless
admin), check policy, the lock and the state, record the instance action,
then hand the driver call to the dispatcher. It knows nothing of HTTP.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from app import exceptions as exc
from app import policy as rules
from app.backends import Backends, encrypt_secrets
from app.config import Config, IdentityConfig
from app.crypto import SecretBox
from app.policy import Credentials, PolicyEnforcer
from app.store import InstanceAction, ServerRecord, Store, utcnow
from drivers import UnknownDriver, driver_class
from drivers.base import PowerState

LOG = logging.getLogger(__name__)

TRIGGER_CRASH_DUMP = "trigger_crash_dump"
CRASH_DUMP_EVENT = "compute_trigger_crash_dump"
# nova/compute/vm_states.py ALLOW_TRIGGER_CRASH_DUMP
ALLOW_TRIGGER_CRASH_DUMP = ("active", "paused", "rescued", "resized", "error")

# How a live power state reads as a vm_state (Nova keeps vm_state in its
# database; crashlab derives it, except for ERROR set by os-resetState).
VM_STATE_FOR_POWER = {
    PowerState.RUNNING: "active",
    PowerState.PAUSED: "paused",
    PowerState.SHUTDOWN: "stopped",
    PowerState.CRASHED: "active",
    PowerState.SUSPENDED: "suspended",
    PowerState.NOSTATE: "active",
}
RESET_STATES = {"active": None, "error": "error"}


@dataclass(frozen=True)
class Context:
    """The caller of one request: credentials, admin-ness and request id."""

    credentials: Credentials
    is_admin: bool
    request_id: str

    @property
    def project_id(self) -> str:
        return self.credentials.project_id

    @property
    def user_id(self) -> str:
        return self.credentials.user_id


@dataclass(frozen=True)
class ServerView:
    """A server with its live state, what the API layer renders."""

    record: ServerRecord
    power_state: PowerState
    vm_state: str

    @property
    def host_id(self) -> str:
        return hashlib.sha224((self.record.project_id + self.record.driver).encode()).hexdigest()


@dataclass(frozen=True)
class PendingCrashDump:
    """An accepted trigger_crash_dump whose driver call is still to run."""

    server: ServerRecord
    action: InstanceAction
    event_id: int


class ComputeService:
    def __init__(
        self,
        config: Config,
        store: Store,
        policy: PolicyEnforcer,
        backends: Backends,
        box: SecretBox,
    ) -> None:
        self.config = config
        self.store = store
        self.policy = policy
        self.backends = backends
        self.box = box
        self.state_timeout = min(3.0, config.driver_timeout_seconds)
        self._server_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # Lookup

    def get_instance(self, ctx: Context, server_id: str) -> ServerRecord:
        """Nova's common.get_instance: 404 for unknown ids and other projects."""
        record = self.store.get_server(server_id) if _is_uuid_like(server_id) else None
        if record is None or (not ctx.is_admin and record.project_id != ctx.project_id):
            raise exc.InstanceNotFound(server_id)
        return record

    def show(self, ctx: Context, server_id: str) -> ServerView:
        record = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.SERVERS_SHOW, _target(record), ctx.credentials)
        return self._views([record])[0]

    def list_servers(
        self,
        ctx: Context,
        *,
        detail: bool,
        name: str | None = None,
        all_tenants: bool = False,
    ) -> list[ServerView]:
        rule = rules.SERVERS_DETAIL if detail else rules.SERVERS_INDEX
        self.policy.authorize(rule, {"project_id": ctx.project_id}, ctx.credentials)
        project_id: str | None = ctx.project_id
        if all_tenants:
            all_rule = (
                rules.SERVERS_DETAIL_ALL_TENANTS if detail else rules.SERVERS_INDEX_ALL_TENANTS
            )
            self.policy.authorize(all_rule, {"project_id": ctx.project_id}, ctx.credentials)
            project_id = None
        records = self.store.list_servers(project_id=project_id, name=name)
        return self._views(records) if detail else [_static_view(r) for r in records]

    def live_view(self, record: ServerRecord) -> ServerView:
        return self._views([record])[0]

    def _views(self, records: list[ServerRecord]) -> list[ServerView]:
        states = self.backends.power_states(records, timeout=self.state_timeout)
        views = []
        for record in records:
            power = states[record.uuid]
            if power is None:
                power = PowerState(record.last_power_state)
            elif power != record.last_power_state:
                self.store.update_server(record.uuid, last_power_state=int(power))
            vm_state = record.vm_state_override or VM_STATE_FOR_POWER[power]
            views.append(ServerView(record, power, vm_state))
        return views

    # Actions

    def trigger_crash_dump(
        self,
        ctx: Context,
        server_id: str,
        *,
        rule: str = rules.TRIGGER_CRASH_DUMP,
        ignore_nmi_guard: bool = False,
    ) -> PendingCrashDump:
        """Nova's compute API trigger_crash_dump, plus crashlab's NMI storm guard.

        ``rule`` is the policy rule of the API that was called: Nova's, or the
        extension's; each option then passes its own rule.
        """
        record = self.get_instance(ctx, server_id)
        self.policy.authorize(rule, _target(record), ctx.credentials)
        if ignore_nmi_guard:
            self.policy.authorize(rules.BYPASS_NMI_GUARD, _target(record), ctx.credentials)
        _check_instance_lock(ctx, record)
        view = self.live_view(record)
        if view.vm_state not in ALLOW_TRIGGER_CRASH_DUMP:
            raise exc.InstanceInvalidState(
                TRIGGER_CRASH_DUMP, record.uuid, "vm_state", view.vm_state
            )
        with self._server_lock(record.uuid):
            if not ignore_nmi_guard:
                self._check_nmi_guard(record)
            action = self.store.start_action(
                request_id=ctx.request_id,
                instance_uuid=record.uuid,
                action=TRIGGER_CRASH_DUMP,
                user_id=ctx.user_id,
                project_id=ctx.project_id,
                event_name=CRASH_DUMP_EVENT,
                host=self.config.host_name,
                stamp_server="last_crash_dump_at",
            )
        return PendingCrashDump(record, action, action.events[0].id)

    def _check_nmi_guard(self, record: ServerRecord) -> None:
        guard = self.config.nmi_guard
        if not guard.enabled:
            return
        if self.store.running_event_count(record.uuid, CRASH_DUMP_EVENT):
            raise exc.NMIGuardActive(
                f"A crash dump of instance {record.uuid} is still in progress; "
                "crashlab sends one NMI at a time."
            )
        last = self.store.get_server(record.uuid)
        if last is not None and last.last_crash_dump_at is not None:
            elapsed = (utcnow() - last.last_crash_dump_at).total_seconds()
            if elapsed < guard.cooldown_seconds:
                raise exc.NMIGuardActive(
                    f"A crash dump of instance {record.uuid} was triggered {elapsed:.0f} s ago; "
                    f"crashlab waits {guard.cooldown_seconds:g} s before another NMI so a "
                    "running kdump is not interrupted."
                )

    def clear_nmi_cooldown(self, server_uuid: str) -> None:
        """After an NMI that certainly was not sent, a retry need not wait."""
        self.store.update_server(server_uuid, last_crash_dump_at=None)

    def lock(self, ctx: Context, server_id: str) -> None:
        record = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.LOCK, _target(record), ctx.credentials)
        is_owner = record.project_id == ctx.project_id
        # nova/compute/api.py lock: an owner re-locking changes nothing, so an
        # admin's lock stays the admin's (and the owner still cannot lift it).
        if record.locked and is_owner:
            return
        self.store.update_server(
            record.uuid, touch=True, locked_by="owner" if is_owner else "admin"
        )
        self._record_instant_action(ctx, record, "lock")

    def unlock(self, ctx: Context, server_id: str) -> None:
        record = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.UNLOCK, _target(record), ctx.credentials)
        # Nova's compute API is_expected_locked_by: an owner cannot lift an
        # admin's lock without unlock_override.
        expected = "owner" if record.project_id == ctx.project_id else "admin"
        if record.locked_by and record.locked_by != expected:
            self.policy.authorize(rules.UNLOCK_OVERRIDE, _target(record), ctx.credentials)
        self.store.update_server(record.uuid, touch=True, locked_by=None)
        self._record_instant_action(ctx, record, "unlock")

    def reset_state(self, ctx: Context, server_id: str, state: str) -> None:
        record = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.RESET_STATE, {"project_id": record.project_id}, ctx.credentials)
        self._record_instant_action(ctx, record, "resetState")
        self.store.update_server(record.uuid, touch=True, vm_state_override=RESET_STATES[state])

    def _record_instant_action(self, ctx: Context, record: ServerRecord, action: str) -> None:
        self.store.start_action(
            request_id=ctx.request_id,
            instance_uuid=record.uuid,
            action=action,
            user_id=ctx.user_id,
            project_id=ctx.project_id,
            finished=True,
        )

    # Instance actions

    def list_actions(self, ctx: Context, server_id: str) -> list[InstanceAction]:
        record = self.get_instance(ctx, server_id)
        self.policy.authorize(
            rules.ACTIONS_LIST, {"project_id": record.project_id}, ctx.credentials
        )
        return self.store.list_actions(record.uuid)

    def get_action(
        self, ctx: Context, server_id: str, request_id: str
    ) -> tuple[InstanceAction, bool]:
        """The action, and whether the caller may see its events."""
        record = self.get_instance(ctx, server_id)
        target = {"project_id": record.project_id}
        self.policy.authorize(rules.ACTIONS_SHOW, target, ctx.credentials)
        action = self.store.get_action(record.uuid, request_id)
        if action is None:
            raise exc.InstanceActionNotFound(request_id, record.uuid)
        return action, self.policy.allowed(rules.ACTIONS_EVENTS, target, ctx.credentials)

    # crashlab extension: the inventory

    def _authorize_manage(self, ctx: Context) -> None:
        self.policy.authorize(rules.MANAGE_SERVERS, {"project_id": ctx.project_id}, ctx.credentials)

    def list_registered(self, ctx: Context) -> list[ServerRecord]:
        self._authorize_manage(ctx)
        return self.store.list_servers()

    def get_registered(self, ctx: Context, server_id: str) -> ServerRecord:
        self._authorize_manage(ctx)
        return self.get_instance(ctx, server_id)

    def register_server(self, ctx: Context, spec: dict[str, Any]) -> ServerRecord:
        """Add a server at run time; ``spec`` is already schema-checked."""
        self._authorize_manage(ctx)
        record = build_server_record(
            self.config.identity,
            self.box,
            uuid=spec.get("uuid") or str(uuidlib.uuid4()),
            name=spec["name"],
            project=spec["project_id"],
            user=spec["user_id"],
            driver=spec["driver"],
            driver_info=spec.get("driver_info", {}),
            source="api",
        )
        if self.store.get_server(record.uuid) is not None:
            raise exc.DuplicateServer(f"A server with uuid {record.uuid} already exists.")
        self.store.add_server(record)
        return record

    def unregister_server(self, ctx: Context, server_id: str) -> None:
        self._authorize_manage(ctx)
        record = self.get_instance(ctx, server_id)
        self.store.delete_server(record.uuid)
        self.backends.forget(record.uuid)

    def _server_lock(self, server_uuid: str) -> threading.Lock:
        with self._locks_guard:
            return self._server_locks.setdefault(server_uuid, threading.Lock())


def build_server_record(
    identity: IdentityConfig,
    box: SecretBox,
    *,
    uuid: str,
    name: str,
    project: str,
    user: str,
    driver: str,
    driver_info: dict[str, Any],
    source: str,
) -> ServerRecord:
    """A validated server record, secrets encrypted; BadRequest if invalid."""
    if not _is_uuid_like(uuid):
        raise exc.ValidationFailed(f"Invalid input for field/attribute uuid. Value: {uuid}.")
    project_config = identity.project_by_name_or_id(project)
    user_config = identity.user_by_name_or_id(user)
    if project_config is None:
        raise exc.ValidationFailed(f"Unknown project {project!r}.")
    if user_config is None:
        raise exc.ValidationFailed(f"Unknown user {user!r}.")
    try:
        cls = driver_class(driver)
    except UnknownDriver as error:
        raise exc.ValidationFailed(str(error)) from None
    try:
        settings = cls.parse_settings(driver_info)
    except ValueError as error:
        raise exc.ValidationFailed(
            f"Invalid driver_info for driver {driver}: {_brief(error)}"
        ) from None
    stored = encrypt_secrets(driver, settings.model_dump(mode="json", exclude_none=True), box)
    now = utcnow()
    return ServerRecord(
        uuid=str(uuidlib.UUID(uuid)),
        name=name,
        project_id=project_config.project_id,
        user_id=user_config.user_id,
        driver=driver,
        driver_info=stored,
        source=source,
        created_at=now,
        updated_at=now,
        last_power_state=int(PowerState.NOSTATE),
    )


def _brief(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(error)


def _static_view(record: ServerRecord) -> ServerView:
    return ServerView(record, PowerState(record.last_power_state), "active")


def _target(record: ServerRecord) -> dict[str, str]:
    return {"user_id": record.user_id, "project_id": record.project_id}


def _check_instance_lock(ctx: Context, record: ServerRecord) -> None:
    # nova/compute/api.py check_instance_lock: any admin passes, owners do not.
    if record.locked and not ctx.is_admin:
        raise exc.InstanceIsLocked(record.uuid)


def _is_uuid_like(value: str) -> bool:
    try:
        return str(uuidlib.UUID(value)).replace("-", "") == value.replace("-", "").lower()
    except (ValueError, AttributeError, TypeError):
        return False


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="microseconds") if value else None
