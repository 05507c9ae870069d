"""The compute service: decides what may happen to a server and records it.

It follows Nova's compute API: look the instance up (project-scoped unless
admin), check policy, the lock and the state, record the instance action,
then hand the driver call to the dispatcher. It knows nothing of HTTP.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app import exceptions as exc
from app import policy as rules
from app.backends import Backends, encrypt_secrets
from app.capture import PendingCapture, check_free_space, new_dump_id
from app.collector import Collector, KeyPair, make_key_pair, public_key_of
from app.config import Config, IdentityConfig, NMIGuardConfig
from app.crypto import SecretBox
from app.dump_targets import DiskTarget, parse_target, parse_timeouts
from app.events import CAPTURE_ACTION, CRASH_DUMP_EVENT
from app.policy import Credentials, PolicyEnforcer
from app.readiness import NOT_ARMED, UNKNOWN, Readiness, ReadinessChecker, stored_readiness
from app.store import (
    ActionStart,
    CaptureInProgress,
    CrashDump,
    DumpCoolingDown,
    DumpInProgress,
    InstanceAction,
    LockedByOther,
    NMIOnItsWay,
    Server,
    ServerGone,
    ServerLocked,
    Store,
    utcnow,
)
from drivers import UnknownDriver, driver_class
from drivers.base import DriverError, DriverSettings, PowerState, SettingsSource

LOG = logging.getLogger(__name__)

TRIGGER_CRASH_DUMP = "trigger_crash_dump"
# Nova's vm states that allow a crash dump (ALLOW_TRIGGER_CRASH_DUMP)
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

    server: Server
    power_state: PowerState
    vm_state: str

    @property
    def host_id(self) -> str:
        return hashlib.sha224((self.server.project_id + self.server.driver).encode()).hexdigest()


@dataclass(frozen=True)
class PendingCrashDump:
    """An accepted trigger_crash_dump whose driver call is still to run."""

    server: Server
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
        owner: str,
        dump_directory: Path,
        collector: Collector | None = None,
    ) -> None:
        self.config = config
        # The dump collector (app/collector.py), when the config enables it.
        self.collector = collector
        self.store = store
        self.policy = policy
        self.backends = backends
        self.box = box
        self.readiness = ReadinessChecker(
            store, backends, config.readiness.timeout_seconds, collector
        )
        # Where captures are written (app/capture.py), beside the followed dumps' vmcores.
        self.dump_directory = dump_directory
        # The process lease that owns the events this service starts (app/leases.py).
        self.owner = owner
        self.state_timeout = min(
            config.backends.state_timeout_seconds, config.driver_timeout_seconds
        )

    # Lookup

    def get_instance(self, ctx: Context, server_id: str) -> Server:
        """Nova's common.get_instance: 404 for unknown ids and other projects."""
        server = self.store.get_server(server_id) if _is_uuid_like(server_id) else None
        if server is None or (not ctx.is_admin and server.project_id != ctx.project_id):
            raise exc.InstanceNotFound(server_id)
        return server

    def show(self, ctx: Context, server_id: str) -> ServerView:
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.SERVERS_SHOW, _target(server), ctx.credentials)
        return stored_view(server)

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
        servers = self.store.list_servers(project_id=project_id, name=name)
        return [stored_view(s) for s in servers]

    def live_view(self, server: Server) -> ServerView:
        """The server with its state read live, bounded; the stored state if no answer.

        Only the trigger path reads live, and only its own target.
        """
        power = self.backends.power_state(server, timeout=self.state_timeout)
        if power is None:
            return stored_view(server)
        if power != server.last_power_state:
            self.store.record_power_states({server.uuid: int(power)})
        return ServerView(server, power, server.vm_state_override or VM_STATE_FOR_POWER[power])

    # Actions

    def trigger_crash_dump(
        self,
        ctx: Context,
        server_id: str,
        *,
        rule: str = rules.TRIGGER_CRASH_DUMP,
        ignore_nmi_guard: bool = False,
        require_armed: bool = False,
        allow_unknown: bool = False,
    ) -> PendingCrashDump:
        """Nova's compute API trigger_crash_dump, plus crashlab's NMI storm guard.

        The lock and the guard are checked once before the live state read,
        so a storm is refused without reaching the backend, and decided again
        in the transaction that records the action.

        ``rule`` is the policy rule of the API that was called: Nova's, or the
        extension's; each option then passes its own rule. ``require_armed``
        checks the server's crash readiness afresh and refuses, recording and
        sending nothing, unless it is armed (or unknown, with ``allow_unknown``).
        """
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rule, _target(server), ctx.credentials)
        if ignore_nmi_guard:
            self.policy.authorize(rules.BYPASS_NMI_GUARD, _target(server), ctx.credentials)
        if require_armed:
            self.policy.authorize(rules.REQUIRE_ARMED, _target(server), ctx.credentials)
        _check_instance_lock(ctx, server)
        guard = (
            None if ignore_nmi_guard or not self.config.nmi_guard.enabled else self.config.nmi_guard
        )
        if guard is not None:
            self._check_nmi_guard(server, guard)
        if require_armed:
            _refuse_unless_armed(server.uuid, self.readiness.check_now(server), allow_unknown)
        view = self.live_view(server)
        if view.vm_state not in ALLOW_TRIGGER_CRASH_DUMP:
            raise exc.InstanceInvalidState(
                TRIGGER_CRASH_DUMP, server.uuid, "vm_state", view.vm_state
            )
        try:
            action = self.store.start_crash_dump(
                server.uuid,
                start=_start(ctx),
                event_name=CRASH_DUMP_EVENT,
                host=self.config.host_name,
                owner=self.owner,
                refuse_locked=not ctx.is_admin,
                cooldown_seconds=None if guard is None else guard.cooldown_seconds,
            )
        except ServerGone:
            raise exc.InstanceNotFound(server_id) from None
        except ServerLocked:
            raise exc.InstanceIsLocked(server.uuid) from None
        except DumpInProgress:
            raise _dump_in_progress(server.uuid) from None
        except DumpCoolingDown as cooling:
            assert guard is not None
            raise _cooling_down(server.uuid, cooling.elapsed, guard) from None
        return PendingCrashDump(server, action, action.events[0].id)

    def _check_nmi_guard(self, server: Server, guard: NMIGuardConfig) -> None:
        """The storm guard as the state file had it: refuses a storm before any backend read."""
        if self.store.running_event_count(server.uuid, CRASH_DUMP_EVENT):
            raise _dump_in_progress(server.uuid)
        if server.last_crash_dump_at is not None:
            elapsed = (utcnow() - server.last_crash_dump_at).total_seconds()
            if elapsed < guard.cooldown_seconds:
                raise _cooling_down(server.uuid, elapsed, guard)

    def lock(self, ctx: Context, server_id: str) -> None:
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.LOCK, _target(server), ctx.credentials)
        # Nova's compute API (lock): an owner re-locking changes nothing, so an
        # admin's lock stays the admin's (and the owner still cannot lift it).
        by = "owner" if server.project_id == ctx.project_id else "admin"
        try:
            self.store.lock(server.uuid, by=by, start=_start(ctx))
        except ServerGone:
            raise exc.InstanceNotFound(server_id) from None

    def unlock(self, ctx: Context, server_id: str) -> None:
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.UNLOCK, _target(server), ctx.credentials)
        # Nova's compute API is_expected_locked_by: an owner cannot lift an
        # admin's lock without unlock_override.
        expected = "owner" if server.project_id == ctx.project_id else "admin"
        may_lift = {expected}
        if self.policy.allowed(rules.UNLOCK_OVERRIDE, _target(server), ctx.credentials):
            may_lift |= {"owner", "admin"}
        try:
            self.store.unlock(server.uuid, may_lift=frozenset(may_lift), start=_start(ctx))
        except ServerGone:
            raise exc.InstanceNotFound(server_id) from None
        except LockedByOther:
            raise exc.PolicyNotAuthorized(rules.UNLOCK_OVERRIDE) from None

    def reset_state(self, ctx: Context, server_id: str, state: str) -> None:
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.RESET_STATE, {"project_id": server.project_id}, ctx.credentials)
        try:
            self.store.reset_vm_state(server.uuid, RESET_STATES[state], _start(ctx))
        except ServerGone:
            raise exc.InstanceNotFound(server_id) from None

    # Instance actions

    def list_actions(self, ctx: Context, server_id: str) -> list[InstanceAction]:
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(
            rules.ACTIONS_LIST, {"project_id": server.project_id}, ctx.credentials
        )
        return self.store.list_actions(server.uuid)

    def get_action(
        self, ctx: Context, server_id: str, request_id: str
    ) -> tuple[InstanceAction, bool]:
        """The action, and whether the caller may see its events."""
        server = self.get_instance(ctx, server_id)
        target = {"project_id": server.project_id}
        self.policy.authorize(rules.ACTIONS_SHOW, target, ctx.credentials)
        action = self.store.get_action(server.uuid, request_id)
        if action is None:
            raise exc.InstanceActionNotFound(request_id, server.uuid)
        return action, self.policy.allowed(rules.ACTIONS_EVENTS, target, ctx.credentials)

    # crashlab extension: the crash dumps that followed each NMI

    def list_crash_dumps(self, ctx: Context, server_id: str) -> list[CrashDump]:
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.CRASH_DUMPS_LIST, _target(server), ctx.credentials)
        dumps = self.store.list_crash_dumps(server.uuid)
        return [dump for dump in dumps if _may_see(ctx, dump)]

    def get_crash_dump(
        self, ctx: Context, server_id: str, dump_id: str, rule: str = rules.CRASH_DUMPS_SHOW
    ) -> CrashDump:
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rule, _target(server), ctx.credentials)
        dump = self.store.get_crash_dump(server.uuid, dump_id)
        if dump is None or not _may_see(ctx, dump):
            raise exc.CrashDumpNotFound(dump_id, server.uuid)
        return dump

    # crashlab extension: crash readiness and host-side capture

    def get_readiness(self, ctx: Context, server_id: str, *, refresh: bool) -> Readiness:
        """The last check, or a fresh bounded one of this server alone."""
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.CRASH_READINESS_SHOW, _target(server), ctx.credentials)
        return self.readiness.check_now(server) if refresh else stored_readiness(server)

    def capture_memory_dump(
        self, ctx: Context, server_id: str, *, then: str, accept_nmi: Callable[[], Any]
    ) -> PendingCapture:
        """Record a host-side memory capture of a running server; the call runs after the 202."""
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(rules.CAPTURE_MEMORY_DUMP, _target(server), ctx.credentials)
        if "memory_dump" not in driver_class(server.driver).capabilities:
            # A valid request this server cannot take: a conflict with its driver, not bad input.
            raise exc.Conflict(
                f"Capturing a memory dump is not supported by the {server.driver} driver."
            )
        _check_instance_lock(ctx, server)
        view = self.live_view(server)
        if view.power_state not in (PowerState.RUNNING, PowerState.PAUSED):
            raise exc.InstanceInvalidState(CAPTURE_ACTION, server.uuid, "vm_state", view.vm_state)
        check_free_space(self.dump_directory, self._memory_bytes(server))
        try:
            dump = self.store.start_capture(
                server.uuid,
                start=_start(ctx),
                dump_id=new_dump_id(),
                host=self.config.host_name,
                owner=self.owner,
                refuse_locked=not ctx.is_admin,
                options={"then": then},
            )
        except ServerGone:
            raise exc.InstanceNotFound(server_id) from None
        except ServerLocked:
            raise exc.InstanceIsLocked(server.uuid) from None
        except CaptureInProgress:
            raise exc.Conflict(
                f"A memory capture of instance {server.uuid} is still in progress."
            ) from None
        assert dump.request_id is not None, "a capture is an action's"
        action = self.store.get_action(server.uuid, dump.request_id)
        assert action is not None
        return PendingCapture(server, dump, action.events[0].id, then, accept_nmi)

    def _memory_bytes(self, server: Server) -> int:
        driver = self.backends.driver_for(server)
        try:
            future = self.backends.bulkhead(driver).submit(driver.memory_bytes)
            return future.result(timeout=self.state_timeout)
        except concurrent.futures.TimeoutError:
            raise exc.Conflict(
                f"The hypervisor of instance {server.uuid} did not say the server's memory "
                f"size within {self.state_timeout:g} s. Nothing was captured."
            ) from None
        except DriverError as error:
            raise exc.Conflict(f"{error.message}. Nothing was captured.") from None

    # crashlab extension: the inventory

    def _authorize_manage(self, ctx: Context) -> None:
        self.policy.authorize(rules.MANAGE_SERVERS, {"project_id": ctx.project_id}, ctx.credentials)

    def list_registered(self, ctx: Context) -> list[Server]:
        self._authorize_manage(ctx)
        return self.store.list_servers()

    def get_registered(self, ctx: Context, server_id: str) -> Server:
        self._authorize_manage(ctx)
        return self.get_instance(ctx, server_id)

    def register_server(self, ctx: Context, spec: dict[str, Any]) -> Server:
        """Add a server at run time; ``spec`` is already schema-checked."""
        self._authorize_manage(ctx)
        server = build_server(
            self.config.identity,
            self.box,
            uuid=spec.get("uuid") or str(uuidlib.uuid4()),
            name=spec["name"],
            project=spec["project_id"],
            user=spec["user_id"],
            driver=spec["driver"],
            driver_info=spec.get("driver_info", {}),
            source="api",
            test_drivers=self.config.test_drivers,
            dump_target=spec.get("dump_target"),
            dump_timeouts=spec.get("dump_timeouts"),
            expected_kernel_release=spec.get("expected_kernel_release"),
            collector_enabled=self.config.collector.enabled,
        )
        if not self.store.add_server(server):
            raise exc.DuplicateServer(f"A server with uuid {server.uuid} already exists.")
        if server.dump_key is not None:
            self.upload_keys_changed()
        return server

    def unregister_server(self, ctx: Context, server_id: str) -> None:
        """Remove a server and everything it owned; 409 while its NMI is on its way."""
        self._authorize_manage(ctx)
        server = self.get_instance(ctx, server_id)
        try:
            self.store.delete_server(server.uuid)
        except NMIOnItsWay:
            raise exc.Conflict(
                f"An NMI to instance {server.uuid} is being sent; "
                "remove the server once its crash dump event has ended."
            ) from None
        self.backends.forget(server.uuid)
        if server.dump_key is not None and self.collector is not None:
            self.upload_keys_changed()
            # A uuid registered again starts with no uploads of its own.
            shutil.rmtree(self.collector.upload_dir(server.uuid), ignore_errors=True)

    def dump_target_key(self, ctx: Context, server_id: str) -> tuple[KeyPair, Collector]:
        """The key of a server's ssh target, and the collector it logs in to (admins)."""
        server = self.get_instance(ctx, server_id)
        self.policy.authorize(
            rules.DUMP_TARGET_KEY, {"project_id": server.project_id}, ctx.credentials
        )
        if server.dump_key is None or self.collector is None:
            raise exc.NoSshDumpTarget(server.uuid)
        private = self.box.decrypt(server.dump_key)
        return KeyPair(private, public_key_of(private)), self.collector

    def upload_keys_changed(self) -> None:
        """A server with an ssh target came or went: the collector's keys follow."""
        if self.collector is not None:
            self.collector.refresh_keys(self.store, self.box)


def build_server(
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
    test_drivers: bool = False,
    dump_target: dict[str, Any] | None = None,
    dump_timeouts: dict[str, Any] | None = None,
    expected_kernel_release: str | None = None,
    collector_enabled: bool = False,
) -> Server:
    """A validated server, secrets encrypted; BadRequest if invalid.

    ``source`` is "config" or "api": settings from the admin API may not set
    config-only fields, nor use test backends unless ``test_drivers``.
    """
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
    settings_source = SettingsSource(api=source == "api", test_drivers=test_drivers)
    try:
        settings = cls.parse_settings(driver_info, settings_source)
    except ValidationError as error:
        raise exc.ValidationFailed(
            f"Invalid driver_info for driver {driver}: {_brief(error, cls.settings_model)}"
        ) from None
    stored = encrypt_secrets(driver, settings.model_dump(mode="json", exclude_none=True), box)
    target, timeouts = _dump_settings(driver, dump_target, dump_timeouts)
    dump_key = None
    if target is not None and target["type"] == "ssh":
        if not collector_enabled:
            raise exc.ValidationFailed(
                "Invalid dump_target: an ssh target needs crashlab's dump collector "
                "(collector.enabled in the config)."
            )
        dump_key = box.encrypt(make_key_pair(f"crashlab-server-{uuid}").private_key)
    now = utcnow()
    return Server(
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
        dump_target=target,
        dump_timeouts=timeouts,
        expected_kernel_release=expected_kernel_release,
        dump_key=dump_key,
    )


def _dump_settings(
    driver: str, dump_target: dict[str, Any] | None, dump_timeouts: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The dump target and timeouts as stored; BadRequest naming the field if invalid."""
    try:
        target = parse_target(dump_target)
        timeouts = parse_timeouts(dump_timeouts)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:] if part) or "dump_target"
        message = first["msg"].removeprefix("Value error, ")
        raise exc.ValidationFailed(
            f"Invalid dump_target or dump_timeouts: {where}: {message}"
        ) from None
    if isinstance(target, DiskTarget) and target.domain is None and driver != "libvirt":
        raise exc.ValidationFailed(
            "Invalid dump_target: a disk target of a server whose driver is not libvirt "
            "must name its domain."
        )
    stored_target = None if target.type == "none" else target.model_dump(exclude_none=True)
    return stored_target, None if dump_timeouts is None else timeouts.model_dump()


def _brief(error: ValidationError, model: type[DriverSettings]) -> str:
    """The first error in Nova's words, echoing the value only of a known, non-secret field.

    A missing field's "value" is the whole driver_info, and an unknown key may
    be a misspelt password, so neither is echoed.
    """
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return message
    field = ".".join(str(part) for part in first["loc"])
    value = first["input"]
    if (
        field in model.model_fields
        and field not in model.secret_fields
        and first["type"] != "missing"
        and isinstance(value, str | int | float | bool)
    ):
        return f"Invalid input for field/attribute {field}. Value: {value}. {message}"
    return f"Invalid input for field/attribute {field}. {message}"


def stored_view(server: Server) -> ServerView:
    """The server as the state file has it, kept current by the power-state sync."""
    power = PowerState(server.last_power_state)
    return ServerView(server, power, server.vm_state_override or VM_STATE_FOR_POWER[power])


def _start(ctx: Context) -> ActionStart:
    return ActionStart(request_id=ctx.request_id, user_id=ctx.user_id, project_id=ctx.project_id)


def _cooling_down(server_uuid: str, elapsed: float, guard: NMIGuardConfig) -> exc.NMIGuardActive:
    return exc.NMIGuardActive(
        f"A crash dump of instance {server_uuid} was triggered {elapsed:.0f} s ago; "
        f"crashlab waits {guard.cooldown_seconds:g} s before another NMI so a "
        "running kdump is not interrupted."
    )


def _dump_in_progress(server_uuid: str) -> exc.NMIGuardActive:
    return exc.NMIGuardActive(
        f"A crash dump of instance {server_uuid} is still in progress; "
        "crashlab sends one NMI at a time."
    )


def _refuse_unless_armed(server_uuid: str, readiness: Readiness, allow_unknown: bool) -> None:
    why = "; ".join(readiness.reasons)
    if readiness.verdict == NOT_ARMED:
        raise exc.Conflict(
            f"Instance {server_uuid} is not armed for a crash dump: {why}. Nothing was sent."
        )
    if readiness.verdict == UNKNOWN and not allow_unknown:
        raise exc.Conflict(
            f"The crash readiness of instance {server_uuid} is unknown: {why}. "
            "Nothing was sent; allow_unknown sends anyway."
        )


def _may_see(ctx: Context, dump: CrashDump) -> bool:
    """A dump that arrived with no NMI pending is not tied to any request: admins only."""
    return dump.request_id is not None or ctx.is_admin


def _target(server: Server) -> dict[str, str]:
    return {"user_id": server.user_id, "project_id": server.project_id}


def _check_instance_lock(ctx: Context, server: Server) -> None:
    # Nova's compute API (check_instance_lock): any admin passes, owners do not.
    if server.locked and not ctx.is_admin:
        raise exc.InstanceIsLocked(server.uuid)


def _is_uuid_like(value: str) -> bool:
    try:
        return str(uuidlib.UUID(value)).replace("-", "") == value.replace("-", "").lower()
    except (ValueError, AttributeError, TypeError):
        return False
