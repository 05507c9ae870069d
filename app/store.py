"""Persistent state in SQLite through SQLAlchemy: servers, locks, actions, events.

Every write is its own committed transaction, so a 202 is only sent after its
action is on disk (WAL mode: a killed process loses nothing committed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class ServerRecord(Base):
    """A server in crashlab's inventory and its runtime state."""

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

    @property
    def locked(self) -> bool:
        return self.locked_by is not None


class InstanceAction(Base):
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
    events: Mapped[list[ActionEvent]] = relationship(
        back_populates="action", order_by="ActionEvent.id", lazy="selectin"
    )


class ActionEvent(Base):
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
    action: Mapped[InstanceAction] = relationship(back_populates="events")


class Store:
    """All reads and writes of crashlab's state."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(
            f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    # Servers

    def get_server(self, server_uuid: str) -> ServerRecord | None:
        with self.session() as session:
            return session.get(ServerRecord, server_uuid)

    def list_servers(
        self, project_id: str | None = None, name: str | None = None
    ) -> list[ServerRecord]:
        query = select(ServerRecord).order_by(ServerRecord.created_at.desc(), ServerRecord.uuid)
        if project_id is not None:
            query = query.where(ServerRecord.project_id == project_id)
        if name is not None:
            query = query.where(ServerRecord.name == name)
        with self.session() as session:
            return list(session.scalars(query))

    def add_server(self, record: ServerRecord) -> None:
        with self.session() as session:
            session.add(record)

    def upsert_config_server(self, record: ServerRecord) -> None:
        """Refresh a config server's static fields, keeping its runtime state."""
        with self.session() as session:
            existing = session.get(ServerRecord, record.uuid)
            if existing is None:
                session.add(record)
                return
            for field in ("name", "project_id", "user_id", "driver", "driver_info", "source"):
                setattr(existing, field, getattr(record, field))

    def delete_server(self, server_uuid: str) -> bool:
        with self.session() as session:
            record = session.get(ServerRecord, server_uuid)
            if record is None:
                return False
            session.delete(record)
            return True

    def update_server(self, server_uuid: str, *, touch: bool = False, **values: Any) -> None:
        """Set fields; ``touch`` also bumps ``updated_at``, as a Nova instance.save() would.

        Bookkeeping (power state cache, NMI guard) does not touch: Nova's
        trigger_crash_dump never saves the instance.
        """
        if touch:
            values["updated_at"] = utcnow()
        with self.session() as session:
            session.execute(
                update(ServerRecord).where(ServerRecord.uuid == server_uuid).values(**values)
            )

    # Instance actions

    def start_action(
        self,
        *,
        request_id: str,
        instance_uuid: str,
        action: str,
        user_id: str,
        project_id: str,
        event_name: str | None = None,
        host: str | None = None,
        finished: bool = False,
        stamp_server: str | None = None,
    ) -> InstanceAction:
        """Record an action and, optionally, its first event, in one transaction.

        ``stamp_server`` names a column of the instance's server record set to
        the action's start time in the same transaction (one commit, not two).
        """
        now = utcnow()
        record = InstanceAction(
            request_id=request_id,
            instance_uuid=instance_uuid,
            action=action,
            user_id=user_id,
            project_id=project_id,
            start_time=now,
            updated_at=now if finished else None,
        )
        if event_name is not None:
            record.events.append(ActionEvent(event=event_name, start_time=now, host=host))
        with self.session() as session:
            session.add(record)
            if stamp_server is not None:
                session.execute(
                    update(ServerRecord)
                    .where(ServerRecord.uuid == instance_uuid)
                    .values({stamp_server: now})
                )
        return record

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
        late, after a timeout or a restart recorded it).
        """
        now = utcnow()
        with self.session() as session:
            finished = session.execute(
                update(ActionEvent)
                .where(ActionEvent.id == event_id, ActionEvent.finish_time.is_(None))
                .values(finish_time=now, result=result, details=details, traceback=traceback)
            )
            if finished.rowcount != 1:  # type: ignore[attr-defined]
                return False
            event_row = session.get(ActionEvent, event_id)
            assert event_row is not None
            values: dict[str, Any] = {"updated_at": now}
            if result == "Error":
                values["message"] = "Error"
            session.execute(
                update(InstanceAction)
                .where(InstanceAction.id == event_row.action_id)
                .values(**values)
            )
        return True

    def fail_unfinished_events(self, details: str) -> int:
        """Mark every running event Error; run at start-up, never re-sending anything."""
        with self.session() as session:
            ids = list(
                session.scalars(select(ActionEvent.id).where(ActionEvent.finish_time.is_(None)))
            )
        for event_id in ids:
            self.finish_event(event_id, result="Error", details=details)
        return len(ids)

    def running_event_count(self, instance_uuid: str, event_name: str) -> int:
        query = (
            select(ActionEvent.id)
            .join(InstanceAction)
            .where(
                InstanceAction.instance_uuid == instance_uuid,
                ActionEvent.event == event_name,
                ActionEvent.finish_time.is_(None),
            )
        )
        with self.session() as session:
            return len(list(session.scalars(query)))

    def list_actions(self, instance_uuid: str) -> list[InstanceAction]:
        # Newest first, as Nova's instance_actions_get orders them.
        query = (
            select(InstanceAction)
            .where(InstanceAction.instance_uuid == instance_uuid)
            .order_by(InstanceAction.start_time.desc(), InstanceAction.id.desc())
        )
        with self.session() as session:
            return list(session.scalars(query))

    def get_action(self, instance_uuid: str, request_id: str) -> InstanceAction | None:
        query = (
            select(InstanceAction)
            .where(
                InstanceAction.instance_uuid == instance_uuid,
                InstanceAction.request_id == request_id,
            )
            .order_by(InstanceAction.id.desc())
        )
        with self.session() as session:
            return session.scalars(query).first()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
