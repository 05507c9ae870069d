"""Persistent state in SQLite through SQLAlchemy: servers, locks, actions, events.

Every write is its own committed transaction, so a 202 is only sent after its
action is on disk (WAL mode: a killed process loses nothing committed).

Several ``crashlab serve`` processes may share one state file, so every
decision that reads and then writes (the storm guard, a lock, a delete) is one
write transaction begun with ``BEGIN IMMEDIATE``: SQLite's write lock is taken
before the read, and no other process can decide in between. Nothing relies
on a lock inside one process.

The store speaks the domain: it returns frozen objects (Server,
InstanceAction, ActionEvent, ServiceLease), and each write is a method named
for what it does. Its ORM rows never leave this module.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    and_,
    create_engine,
    delete,
    event,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.schema import CreateIndex, CreateTable

from app.events import CAPTURE_ACTION, CAPTURE_EVENT


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# The domain: what the store returns.


@dataclass(frozen=True)
class Server:
    """A server in crashlab's inventory and its runtime state."""

    uuid: str
    name: str
    project_id: str
    user_id: str
    driver: str
    # Driver settings with secret fields encrypted (see app.crypto).
    driver_info: dict[str, Any]
    source: str  # "config" or "api"
    created_at: dt.datetime
    updated_at: dt.datetime
    last_power_state: int
    locked_by: str | None = None
    # Set by os-resetState to "error"; None means the state is read live.
    vm_state_override: str | None = None
    last_crash_dump_at: dt.datetime | None = None
    # Where the crash kernel's dump lands, and how long each phase of following
    # it may take (app/dump_targets.py); None is the "none" target.
    dump_target: dict[str, Any] | None = None
    dump_timeouts: dict[str, Any] | None = None
    expected_kernel_release: str | None = None
    # The last crash readiness check (app/readiness.py), refreshed in the background,
    # and the kernel release the last check that could read it read.
    readiness: dict[str, Any] | None = None
    observed_kernel_release: str | None = None
    # An ssh dump target's private key (app/collector.py), encrypted as driver
    # secrets are; never in any response but the admin's key read.
    dump_key: str | None = None

    @property
    def locked(self) -> bool:
        return self.locked_by is not None


@dataclass(frozen=True)
class ActionEvent:
    """One step of an instance action, as Nova's instance_actions_events has it."""

    id: int
    action_id: int
    event: str
    start_time: dt.datetime
    finish_time: dt.datetime | None
    result: str | None
    traceback: str | None
    details: str | None
    host: str | None
    owner: str | None
    sending_since: dt.datetime | None


@dataclass(frozen=True)
class InstanceAction:
    """An action on a server, as Nova's instance_actions has it, with its events."""

    id: int
    request_id: str
    instance_uuid: str
    action: str
    user_id: str
    project_id: str
    start_time: dt.datetime
    updated_at: dt.datetime | None
    message: str | None
    events: tuple[ActionEvent, ...]


@dataclass(frozen=True)
class ServiceLease:
    """A live ``crashlab serve`` process, renewed while it runs.

    Its unfinished events are failed only once its lease has lapsed, so one
    process never fails the work of a live sibling.
    """

    id: str
    host: str
    pid: int
    # The kernel's start time of that pid (/proc/<pid>/stat), so a reused pid
    # is not mistaken for the process.
    pid_started: int
    renewed_at: dt.datetime


@dataclass(frozen=True)
class ActionStart:
    """Who starts an action, and its request id: the fields Nova records."""

    request_id: str
    user_id: str
    project_id: str


@dataclass(frozen=True)
class CrashDump:
    """What followed one NMI: the evidence of its panic and the vmcore it left.

    ``evidence`` is where the follower looks, decided before the NMI was sent
    (app/dump_targets.py); ``vmcore`` and ``panic`` are what the dump says of
    itself once collected.
    """

    id: str
    server_id: str
    # None for a dump that arrived at the collector with no NMI pending.
    action_id: int | None
    request_id: str | None
    state: str
    target: str
    created_at: dt.datetime
    updated_at: dt.datetime
    nmi_sent_at: dt.datetime | None
    evidence: dict[str, Any]
    error: str | None = None
    vmcore: dict[str, Any] | None = None
    panic: dict[str, Any] | None = None
    stored_bytes: int = 0
    removed_at: dt.datetime | None = None
    owner: str | None = None


# The rows: private to this module.


class Base(DeclarativeBase):
    pass


class _ServerRow(Base):
    __tablename__ = "servers"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    project_id: Mapped[str] = mapped_column(String(255), index=True)
    user_id: Mapped[str] = mapped_column(String(255))
    driver: Mapped[str] = mapped_column(String(32))
    # Driver settings with secret fields encrypted (see app.crypto).
    driver_info: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16))  # "config" or "api"
    locked_by: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Set by os-resetState to "error"; None means the state is read live.
    vm_state_override: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_power_state: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_crash_dump_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The background power-state sync: when this server is next due, and when
    # its state was last read from the backend.
    power_sync_due_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    power_synced_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    dump_target: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    dump_timeouts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    expected_kernel_release: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The last crash readiness check, and when the next is due (as the power-state sync).
    readiness: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    observed_kernel_release: Mapped[str | None] = mapped_column(String(255), nullable=True)
    readiness_due_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    dump_key: Mapped[str | None] = mapped_column(Text, nullable=True)


class _ActionRow(Base):
    __tablename__ = "instance_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    instance_uuid: Mapped[str] = mapped_column(String(36), index=True)
    action: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(255))
    project_id: Mapped[str] = mapped_column(String(255))
    start_time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    message: Mapped[str | None] = mapped_column(String(255), nullable=True)
    events: Mapped[list[_EventRow]] = relationship(
        back_populates="action", order_by="_EventRow.id", lazy="selectin"
    )


class _EventRow(Base):
    __tablename__ = "instance_actions_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int] = mapped_column(ForeignKey("instance_actions.id"), index=True)
    event: Mapped[str] = mapped_column(String(255))
    start_time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finish_time: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    result: Mapped[str | None] = mapped_column(String(32), nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[str | None] = mapped_column(Text, nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The process that runs the event (see ServiceLease), and since when its
    # NMI is being sent: a server is not deleted under an NMI on its way.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sending_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    action: Mapped[_ActionRow] = relationship(back_populates="events")


class _LeaseRow(Base):
    __tablename__ = "service_leases"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # The kernel's start time of that pid (/proc/<pid>/stat), so a reused pid
    # is not mistaken for the process.
    pid_started: Mapped[int] = mapped_column(Integer)
    renewed_at: Mapped[dt.datetime] = mapped_column(DateTime)


class _CrashDumpRow(Base):
    __tablename__ = "crash_dumps"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    server_id: Mapped[str] = mapped_column(String(36), index=True)
    # One dump per NMI: a dump is never attributed twice. None: no NMI was pending.
    action_id: Mapped[int | None] = mapped_column(
        ForeignKey("instance_actions.id"), unique=True, nullable=True
    )
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    target: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    nmi_sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    vmcore: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    panic: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    stored_bytes: Mapped[int] = mapped_column(Integer, default=0)
    removed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The process following the dump (see ServiceLease).
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)


# A dump in one of these states is still being followed.
UNFINISHED_DUMP_STATES = ("waiting", "panicked", "collecting", "collected")
# A host-side capture (app/capture.py) in one of these states is still running;
# its "collected" is terminal, and it is never resumed, only failed.
HOST_MEMORY_TARGET = "host-memory"
UNFINISHED_CAPTURE_STATES = ("capturing", "verifying")


class ServerGone(Exception):
    """The server was deleted before the decision."""


class ServerLocked(Exception):
    """The server is locked, and the caller may not pass a lock."""


class LockedByOther(Exception):
    def __init__(self, locked_by: str) -> None:
        super().__init__(locked_by)
        self.locked_by = locked_by


class DumpInProgress(Exception):
    """A crash dump of the server is still running."""


class DumpCoolingDown(Exception):
    def __init__(self, elapsed: float) -> None:
        super().__init__(elapsed)
        self.elapsed = elapsed


class CaptureInProgress(Exception):
    pass


class NMIOnItsWay(Exception):
    """An NMI to the server is being sent right now."""


class Store:
    """All reads and writes of crashlab's state."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(
            f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(self.engine, "connect", _sqlite_connect)
        event.listen(self.engine, "begin", _sqlite_begin)
        # Connections of this engine begin with BEGIN IMMEDIATE (see _sqlite_begin).
        self._writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        _relax_not_null(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read transaction. Writes use ``transaction``: a read that later writes
        would fail at once ("database is locked") if another process wrote between."""
        with Session(self.engine) as session, session.begin():
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction holding SQLite's write lock from its first statement."""
        with Session(self._writer) as session, session.begin():
            yield session

    # Servers

    def get_server(self, server_uuid: str) -> Server | None:
        with self.session() as session:
            row = session.get(_ServerRow, server_uuid)
            return None if row is None else _server(row)

    def list_servers(self, project_id: str | None = None, name: str | None = None) -> list[Server]:
        query = select(_ServerRow).order_by(_ServerRow.created_at.desc(), _ServerRow.uuid)
        if project_id is not None:
            query = query.where(_ServerRow.project_id == project_id)
        if name is not None:
            query = query.where(_ServerRow.name == name)
        with self.session() as session:
            return [_server(row) for row in session.scalars(query)]

    def add_server(self, server: Server) -> bool:
        """Add a new server; False if its uuid is taken."""
        with self.transaction() as session:
            if session.get(_ServerRow, server.uuid) is not None:
                return False
            session.add(_server_row(server))
            return True

    def upsert_config_server(self, server: Server) -> None:
        """Refresh a config server's static fields, keeping its runtime state."""
        with self.transaction() as session:
            row = session.get(_ServerRow, server.uuid)
            if row is None:
                session.add(_server_row(server))
                return
            row.name = server.name
            row.project_id = server.project_id
            row.user_id = server.user_id
            row.driver = server.driver
            row.driver_info = server.driver_info
            row.source = server.source
            row.dump_target = server.dump_target
            row.dump_timeouts = server.dump_timeouts
            row.expected_kernel_release = server.expected_kernel_release
            # The key its kdump configuration holds stays the same across restarts.
            row.dump_key = row.dump_key or server.dump_key

    def delete_server(self, server_uuid: str) -> bool:
        """Delete a server with all it owned: its actions and their events.

        A re-registered uuid starts with no history. Refused with NMIOnItsWay
        while an NMI to it is being sent, so none reaches a deleted server.
        """
        with self.transaction() as session:
            if session.get(_ServerRow, server_uuid) is None:
                return False
            action_ids = select(_ActionRow.id).where(_ActionRow.instance_uuid == server_uuid)
            sending = session.scalars(
                select(_EventRow.id).where(
                    _EventRow.action_id.in_(action_ids),
                    _EventRow.sending_since.is_not(None),
                    _EventRow.finish_time.is_(None),
                )
            ).first()
            if sending is not None:
                raise NMIOnItsWay()
            session.execute(delete(_CrashDumpRow).where(_CrashDumpRow.server_id == server_uuid))
            session.execute(delete(_EventRow).where(_EventRow.action_id.in_(action_ids)))
            session.execute(delete(_ActionRow).where(_ActionRow.instance_uuid == server_uuid))
            session.execute(delete(_ServerRow).where(_ServerRow.uuid == server_uuid))
            return True

    def record_power_states(self, states: dict[str, int]) -> None:
        """Record states read from the backends (bookkeeping: ``updated_at`` stays)."""
        now = utcnow()
        with self.transaction() as session:
            for server_uuid, power_state in states.items():
                session.execute(
                    update(_ServerRow)
                    .where(_ServerRow.uuid == server_uuid)
                    .values(last_power_state=power_state, power_synced_at=now)
                )

    def clear_nmi_cooldown(self, server_uuid: str) -> None:
        """After an NMI that certainly was not sent, a retry need not wait."""
        with self.transaction() as session:
            session.execute(
                update(_ServerRow)
                .where(_ServerRow.uuid == server_uuid)
                .values(last_crash_dump_at=None)
            )

    def claim_power_syncs(self, interval_seconds: float) -> list[Server]:
        """The servers due a power-state read, each claimed by one process only."""
        return self._claim_due("power_sync_due_at", interval_seconds)

    def claim_readiness_checks(self, interval_seconds: float) -> list[Server]:
        """The servers due a crash readiness check, each claimed by one process only."""
        return self._claim_due("readiness_due_at", interval_seconds)

    def _claim_due(self, due_column: str, interval_seconds: float) -> list[Server]:
        """The servers whose ``due_column`` has passed, made due again an interval later,
        in one write transaction: with several processes, each server goes to one."""
        now = utcnow()
        column = getattr(_ServerRow, due_column)
        with self.transaction() as session:
            due = list(
                session.scalars(select(_ServerRow).where(or_(column.is_(None), column <= now)))
            )
            for row in due:
                setattr(row, due_column, now + dt.timedelta(seconds=interval_seconds))
            return [_server(row) for row in due]

    def record_readiness(
        self, server_uuid: str, readiness: dict[str, Any], kernel_release: str | None
    ) -> None:
        """Bookkeeping, as power states are: ``updated_at`` stays.

        A check that could not read the kernel (a paused guest's agent does not
        answer) leaves the last release read in place.
        """
        values: dict[str, Any] = {"readiness": readiness}
        if kernel_release is not None:
            values["observed_kernel_release"] = kernel_release
        with self.transaction() as session:
            session.execute(
                update(_ServerRow).where(_ServerRow.uuid == server_uuid).values(**values)
            )

    # Decisions: each is one write transaction.

    def lock(self, server_uuid: str, *, by: str, start: ActionStart) -> None:
        """Nova's lock: an owner's lock never replaces a lock; an admin's replaces an owner's."""
        with self.transaction() as session:
            row = session.get(_ServerRow, server_uuid)
            if row is None:
                raise ServerGone()
            if row.locked_by is not None and by == "owner":
                return
            row.locked_by = by
            _instant_action(session, row, "lock", start)

    def unlock(self, server_uuid: str, *, may_lift: frozenset[str], start: ActionStart) -> None:
        """Lift a lock placed by one of ``may_lift``; LockedByOther names any other locker."""
        with self.transaction() as session:
            row = session.get(_ServerRow, server_uuid)
            if row is None:
                raise ServerGone()
            if row.locked_by is not None and row.locked_by not in may_lift:
                raise LockedByOther(row.locked_by)
            row.locked_by = None
            _instant_action(session, row, "unlock", start)

    def reset_vm_state(self, server_uuid: str, vm_state: str | None, start: ActionStart) -> None:
        with self.transaction() as session:
            row = session.get(_ServerRow, server_uuid)
            if row is None:
                raise ServerGone()
            row.vm_state_override = vm_state
            _instant_action(session, row, "resetState", start)

    def start_crash_dump(
        self,
        server_uuid: str,
        *,
        start: ActionStart,
        event_name: str,
        host: str,
        owner: str,
        refuse_locked: bool,
        cooldown_seconds: float | None,
    ) -> InstanceAction:
        """Record a trigger_crash_dump and its running event, if the server takes one.

        Raises ServerGone, ServerLocked (when ``refuse_locked``), and, unless
        ``cooldown_seconds`` is None (the storm guard bypassed or off),
        DumpInProgress or DumpCoolingDown. The guard's verdict and the new
        event are one transaction, so two triggers never both pass.
        """
        now = utcnow()
        with self.transaction() as session:
            row = _server_to_act_on(session, server_uuid, refuse_locked)
            if cooldown_seconds is not None:
                if _running_events(session, server_uuid, event_name):
                    raise DumpInProgress()
                if row.last_crash_dump_at is not None:
                    elapsed = (now - row.last_crash_dump_at).total_seconds()
                    if elapsed < cooldown_seconds:
                        raise DumpCoolingDown(elapsed)
            action = _action_row(start, server_uuid, "trigger_crash_dump", now)
            action.events.append(
                _EventRow(event=event_name, start_time=now, host=host, owner=owner)
            )
            session.add(action)
            row.last_crash_dump_at = now
            session.flush()  # assigns the ids
            return _action(action)

    def start_capture(
        self,
        server_uuid: str,
        *,
        start: ActionStart,
        dump_id: str,
        host: str,
        owner: str,
        refuse_locked: bool,
        options: dict[str, Any],
    ) -> CrashDump:
        """Record a memory capture: its action, its running event and its crash dump.

        Raises ServerGone, ServerLocked (when ``refuse_locked``) and
        CaptureInProgress: one capture of a server at a time.
        """
        now = utcnow()
        with self.transaction() as session:
            _server_to_act_on(session, server_uuid, refuse_locked)
            if _running_events(session, server_uuid, CAPTURE_EVENT):
                raise CaptureInProgress()
            action = _action_row(start, server_uuid, CAPTURE_ACTION, now)
            action.events.append(
                _EventRow(event=CAPTURE_EVENT, start_time=now, host=host, owner=owner)
            )
            session.add(action)
            session.flush()
            dump = _CrashDumpRow(
                id=dump_id,
                server_id=server_uuid,
                action_id=action.id,
                request_id=action.request_id,
                state="capturing",
                target=HOST_MEMORY_TARGET,
                created_at=now,
                updated_at=now,
                nmi_sent_at=now,
                evidence=options,
                owner=owner,
            )
            session.add(dump)
            session.flush()
            return _crash_dump(dump)

    def fail_orphaned_captures(self, live_owners: set[str], details: str) -> int:
        """Fail the captures of every process that is gone, with their running events.

        A capture is never resumed: the hypervisor's call died with its caller.
        """
        now = utcnow()
        with self.transaction() as session:
            rows = list(
                session.scalars(
                    select(_CrashDumpRow).where(
                        _CrashDumpRow.target == HOST_MEMORY_TARGET,
                        _CrashDumpRow.state.in_(UNFINISHED_CAPTURE_STATES),
                        or_(
                            _CrashDumpRow.owner.is_(None),
                            _CrashDumpRow.owner.not_in(live_owners),
                        ),
                    )
                )
            )
            for row in rows:
                row.state, row.error, row.updated_at = "failed", details, now
                session.execute(
                    update(_EventRow)
                    .where(_EventRow.action_id == row.action_id, _EventRow.finish_time.is_(None))
                    .values(finish_time=now, result="Error", details=details)
                )
            return len(rows)

    def running_event_count(self, instance_uuid: str, event_name: str) -> int:
        with self.session() as session:
            return _running_events(session, instance_uuid, event_name)

    def begin_sending(self, event_id: int) -> bool:
        """Mark an event's NMI as on its way; False if the event or its server is gone."""
        now = utcnow()
        with self.transaction() as session:
            row = session.get(_EventRow, event_id)
            if row is None or row.finish_time is not None:
                return False
            if session.get(_ServerRow, row.action.instance_uuid) is None:
                return False
            row.sending_since = now
            return True

    # Instance actions

    def finish_event(
        self,
        event_id: int,
        *,
        result: str,
        details: str | None = None,
        traceback: str | None = None,
    ) -> bool:
        """Finish a running event; a failed one marks its action's message Error.

        Returns False when the event was already finished (the result came too
        late, after a timeout or a restart recorded it) or is gone with its server.
        """
        now = utcnow()
        with self.transaction() as session:
            finished = session.execute(
                update(_EventRow)
                .where(_EventRow.id == event_id, _EventRow.finish_time.is_(None))
                .values(finish_time=now, result=result, details=details, traceback=traceback)
            )
            if finished.rowcount != 1:  # type: ignore[attr-defined]
                return False
            event_row = session.get(_EventRow, event_id)
            assert event_row is not None
            action = event_row.action
            action.updated_at = now
            if result == "Error":
                action.message = "Error"
        return True

    def list_actions(self, instance_uuid: str) -> list[InstanceAction]:
        # Newest first, as Nova's instance_actions_get orders them.
        query = (
            select(_ActionRow)
            .where(_ActionRow.instance_uuid == instance_uuid)
            .order_by(_ActionRow.start_time.desc(), _ActionRow.id.desc())
        )
        with self.session() as session:
            return [_action(row) for row in session.scalars(query)]

    def get_action(self, instance_uuid: str, request_id: str) -> InstanceAction | None:
        query = (
            select(_ActionRow)
            .where(
                _ActionRow.instance_uuid == instance_uuid,
                _ActionRow.request_id == request_id,
            )
            .order_by(_ActionRow.id.desc())
        )
        with self.session() as session:
            row = session.scalars(query).first()
            return None if row is None else _action(row)

    # Service leases

    def renew_lease(self, lease: ServiceLease) -> None:
        """Write the lease, as new or over its earlier renewal."""
        with self.transaction() as session:
            session.merge(_LeaseRow(**dataclasses.asdict(lease)))

    def end_lease(self, lease_id: str) -> None:
        with self.transaction() as session:
            session.execute(delete(_LeaseRow).where(_LeaseRow.id == lease_id))

    def list_leases(self) -> list[ServiceLease]:
        with self.session() as session:
            return [_lease(row) for row in session.scalars(select(_LeaseRow))]

    def fail_orphaned_events(self, live_owners: set[str], details: str, event_name: str) -> int:
        """Fail every running ``event_name`` event whose owner is not among ``live_owners``.

        Never re-sends anything; the dead owners' leases are removed with them.
        (The events that follow a dump are resumed instead: see claim_orphaned_dumps.)
        """
        with self.transaction() as session:
            ids = list(
                session.scalars(
                    select(_EventRow.id).where(
                        _EventRow.finish_time.is_(None),
                        _EventRow.event == event_name,
                        or_(_EventRow.owner.is_(None), _EventRow.owner.not_in(live_owners)),
                    )
                )
            )
            session.execute(delete(_LeaseRow).where(_LeaseRow.id.not_in(live_owners)))
        for event_id in ids:
            self.finish_event(event_id, result="Error", details=details)
        return len(ids)

    # Crash dumps

    def finish_nmi_and_open_dump(
        self, event_id: int, *, dump_id: str, target: str, evidence: dict[str, Any], owner: str
    ) -> CrashDump | None:
        """Finish the NMI's event Success and open the dump it caused, in one transaction.

        None when the event was already finished (a restart recorded it) or
        its server is gone: then no dump is followed.
        """
        now = utcnow()
        with self.transaction() as session:
            event_row = session.get(_EventRow, event_id)
            if event_row is None or event_row.finish_time is not None:
                return None
            action = event_row.action
            if session.get(_ServerRow, action.instance_uuid) is None:
                return None
            event_row.finish_time, event_row.result = now, "Success"
            action.updated_at = now
            row = _CrashDumpRow(
                id=dump_id,
                server_id=action.instance_uuid,
                action_id=action.id,
                request_id=action.request_id,
                state="waiting",
                target=target,
                created_at=now,
                updated_at=now,
                nmi_sent_at=event_row.sending_since or now,
                evidence=evidence,
                owner=owner,
            )
            session.add(row)
            session.flush()
            return _crash_dump(row)

    def has_pending_dump(self, server_uuid: str) -> bool:
        """Is a dump of this server still waiting for its vmcore to arrive?"""
        with self.session() as session:
            pending = session.scalars(
                select(_CrashDumpRow.id).where(
                    _CrashDumpRow.server_id == server_uuid,
                    _CrashDumpRow.state.in_(("waiting", "panicked", "collecting")),
                )
            ).first()
            return pending is not None

    def add_unattributed_dump(
        self, dump_id: str, server_uuid: str, *, state: str, evidence: dict[str, Any], error: str
    ) -> CrashDump:
        """A dump that arrived with no NMI pending: kept, tied to no request."""
        now = utcnow()
        with self.transaction() as session:
            row = _CrashDumpRow(
                id=dump_id,
                server_id=server_uuid,
                action_id=None,
                request_id=None,
                state=state,
                target="ssh",
                created_at=now,
                updated_at=now,
                nmi_sent_at=None,
                evidence=evidence,
                error=error,
            )
            session.add(row)
            session.flush()
            return _crash_dump(row)

    def forget_crash_dump(self, dump_id: str) -> None:
        with self.transaction() as session:
            session.execute(delete(_CrashDumpRow).where(_CrashDumpRow.id == dump_id))

    def start_event(self, action_id: int, event_name: str, *, host: str, owner: str) -> int:
        """A new running event of an action; returns its id."""
        with self.transaction() as session:
            row = _EventRow(
                action_id=action_id, event=event_name, start_time=utcnow(), host=host, owner=owner
            )
            session.add(row)
            session.flush()
            return row.id

    def set_dump_state(self, dump_id: str, state: str, *, error: str | None = None) -> None:
        with self.transaction() as session:
            row = session.get(_CrashDumpRow, dump_id)
            if row is not None:
                row.state, row.error, row.updated_at = state, error, utcnow()

    def record_vmcore(
        self,
        dump_id: str,
        *,
        state: str,
        vmcore: dict[str, Any],
        panic: dict[str, Any] | None,
        stored_bytes: int,
        error: str | None = None,
    ) -> None:
        """What the collected dump says of itself, and the state it earns."""
        with self.transaction() as session:
            row = session.get(_CrashDumpRow, dump_id)
            if row is not None:
                row.state, row.error, row.updated_at = state, error, utcnow()
                row.vmcore, row.panic, row.stored_bytes = vmcore, panic, stored_bytes

    def record_panic(self, dump_id: str, panic: dict[str, Any]) -> None:
        with self.transaction() as session:
            row = session.get(_CrashDumpRow, dump_id)
            if row is not None:
                row.panic, row.updated_at = panic, utcnow()

    def mark_dumps_removed(self, dump_ids: list[str]) -> None:
        """Their files are gone (retention); the records stay, and say so."""
        now = utcnow()
        with self.transaction() as session:
            session.execute(
                update(_CrashDumpRow)
                .where(_CrashDumpRow.id.in_(dump_ids))
                .values(removed_at=now, stored_bytes=0)
            )

    def get_crash_dump(self, server_id: str, dump_id: str) -> CrashDump | None:
        with self.session() as session:
            row = session.get(_CrashDumpRow, dump_id)
            return None if row is None or row.server_id != server_id else _crash_dump(row)

    def list_crash_dumps(self, server_id: str | None = None) -> list[CrashDump]:
        """Newest first; all servers' when ``server_id`` is None."""
        query = select(_CrashDumpRow).order_by(
            _CrashDumpRow.created_at.desc(), _CrashDumpRow.action_id.desc()
        )
        if server_id is not None:
            query = query.where(_CrashDumpRow.server_id == server_id)
        with self.session() as session:
            return [_crash_dump(row) for row in session.scalars(query)]

    def claim_orphaned_dumps(self, live_owners: set[str], owner: str) -> list[CrashDump]:
        """Take over the unfinished dumps whose follower is gone, with their running events."""
        with self.transaction() as session:
            rows = list(
                session.scalars(
                    select(_CrashDumpRow).where(
                        _CrashDumpRow.state.in_(UNFINISHED_DUMP_STATES),
                        _CrashDumpRow.target != HOST_MEMORY_TARGET,
                        _CrashDumpRow.action_id.is_not(None),
                        or_(
                            _CrashDumpRow.owner.is_(None),
                            _CrashDumpRow.owner.not_in(live_owners),
                        ),
                    )
                )
            )
            for row in rows:
                row.owner = owner
                session.execute(
                    update(_EventRow)
                    .where(_EventRow.action_id == row.action_id, _EventRow.finish_time.is_(None))
                    .values(owner=owner)
                )
            return [_crash_dump(row) for row in rows]


def _server_to_act_on(session: Session, server_uuid: str, refuse_locked: bool) -> _ServerRow:
    """The server's row, for an action; ServerGone, or ServerLocked when ``refuse_locked``."""
    row = session.get(_ServerRow, server_uuid)
    if row is None:
        raise ServerGone()
    if refuse_locked and row.locked_by is not None:
        raise ServerLocked()
    return row


def _instant_action(session: Session, row: _ServerRow, action: str, start: ActionStart) -> None:
    # An action that ends as it starts, saving the instance as Nova's does.
    now = utcnow()
    row.updated_at = now
    instant = _action_row(start, row.uuid, action, now)
    instant.updated_at = now
    session.add(instant)


def _action_row(
    start: ActionStart, instance_uuid: str, action: str, now: dt.datetime
) -> _ActionRow:
    return _ActionRow(
        request_id=start.request_id,
        instance_uuid=instance_uuid,
        action=action,
        user_id=start.user_id,
        project_id=start.project_id,
        start_time=now,
    )


# Rows to domain objects and back, field for field.

D = TypeVar("D")


def _domain(cls: type[D], row: Base, **differently: Any) -> D:
    """The domain object of ``row``: each dataclass field read from the column of
    its name, except those given ``differently``."""
    values = {
        field.name: differently[field.name]
        if field.name in differently
        else getattr(row, field.name)
        for field in dataclasses.fields(cls)  # type: ignore[arg-type]
    }
    return cls(**values)


def _server(row: _ServerRow) -> Server:
    return _domain(Server, row, driver_info=dict(row.driver_info))


def _server_row(server: Server) -> _ServerRow:
    values = {field.name: getattr(server, field.name) for field in dataclasses.fields(Server)}
    return _ServerRow(**{**values, "driver_info": dict(server.driver_info)})


def _action(row: _ActionRow) -> InstanceAction:
    return _domain(InstanceAction, row, events=tuple(_event(event) for event in row.events))


def _event(row: _EventRow) -> ActionEvent:
    return _domain(ActionEvent, row)


def _crash_dump(row: _CrashDumpRow) -> CrashDump:
    return _domain(CrashDump, row, evidence=dict(row.evidence))


def _lease(row: _LeaseRow) -> ServiceLease:
    return _domain(ServiceLease, row)


def _running_events(session: Session, instance_uuid: str, event_name: str) -> int:
    query = (
        select(_EventRow.id)
        .join(_ActionRow)
        .where(
            and_(
                _ActionRow.instance_uuid == instance_uuid,
                _EventRow.event == event_name,
                _EventRow.finish_time.is_(None),
            )
        )
    )
    return len(list(session.scalars(query)))


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own implicit BEGIN is turned off; _sqlite_begin emits it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # SQLAlchemy's documented recipe for SQLite transactions, with IMMEDIATE
    # for the write engine: the write lock is held from the first read.
    mode = connection.get_execution_options().get("sqlite_begin", "")
    connection.exec_driver_sql(f"BEGIN {mode}".strip())


def _add_missing_columns(engine: Any) -> None:
    """Columns added since a state file was created, added to it (all nullable)."""
    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=engine.dialect)
                    connection.exec_driver_sql(
                        f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'
                    )


def _relax_not_null(engine: Any) -> None:
    """Tables whose columns have become nullable since a state file was created,
    rebuilt with SQLite's documented procedure (rename, create, copy, drop)."""
    inspector = inspect(engine)
    stale = []
    for table in Base.metadata.sorted_tables:
        stored = {column["name"]: column for column in inspector.get_columns(table.name)}
        if any(column.nullable and not stored[column.name]["nullable"] for column in table.columns):
            stale.append((table, [index["name"] for index in inspector.get_indexes(table.name)]))
    if not stale:
        return
    # On the DBAPI connection: foreign_keys cannot change inside a transaction.
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA foreign_keys=OFF")
        cursor.execute("BEGIN IMMEDIATE")
        for table, indexes in stale:
            old = f"_old_{table.name}"
            cursor.execute(f'ALTER TABLE "{table.name}" RENAME TO "{old}"')
            for index in indexes:
                cursor.execute(f'DROP INDEX "{index}"')
            cursor.execute(str(CreateTable(table).compile(engine)))
            for new_index in table.indexes:
                cursor.execute(str(CreateIndex(new_index).compile(engine)))
            columns = ", ".join(f'"{column.name}"' for column in table.columns)
            cursor.execute(f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "{old}"')
            cursor.execute(f'DROP TABLE "{old}"')
        cursor.execute("COMMIT")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        raw.close()
