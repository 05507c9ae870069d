"""Builds the crashlab ASGI application from a config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI

from app.api import (
    crash_dumps,
    crash_readiness,
    dump_target,
    extension,
    identity,
    instance_actions,
    servers,
    versions,
)
from app.api.admission import TenantAdmission
from app.api.faults import install_fault_handlers
from app.api.middleware import NovaHeadersMiddleware
from app.api.openapi import install_openapi
from app.backends import Backends
from app.capture import CaptureRunner
from app.collector import Collector
from app.config import Config, ConfigError
from app.crypto import SecretBox, load_or_create_key
from app.dispatch import CrashDumpDispatcher
from app.follower import CrashDumpFollower
from app.identity import TokenStore
from app.leases import ProcessLease
from app.policy import PolicyEnforcer
from app.service import ComputeService, build_server
from app.store import Store
from app.sync import TICK_SECONDS, PowerStateSync

LOG = logging.getLogger(__name__)

DEFAULT_STATE_FILE = Path("var/crashlab.db")
# How often the collector's directories are swept for dumps no NMI was waiting for.
UNATTRIBUTED_SECONDS = 5.0


def create_app(config: Config, state_file: Path | None = None) -> FastAPI:
    state_path = state_file or config.resolve(config.state_file) or DEFAULT_STATE_FILE
    policy_path = config.resolve(config.policy_file)
    if policy_path is not None and not policy_path.is_file():
        raise ConfigError(f"policy_file: {policy_path} does not exist")
    store = Store(state_path)
    box = SecretBox(load_or_create_key(config.fernet_key, state_path.with_suffix(".key")))
    backends = Backends(box, config.backends)
    lease = ProcessLease(store, config.lease_seconds)
    dump_directory = (
        config.resolve(config.crash_dumps.directory) or state_path.parent / "crash-dumps"
    )
    collector = None
    if config.collector.enabled:
        collector = Collector(
            config.collector,
            config.resolve(config.collector.directory) or state_path.parent / "collector",
        )
    compute = ComputeService(
        config,
        store,
        PolicyEnforcer(policy_path),
        backends,
        box,
        lease.id,
        dump_directory,
        collector=collector,
    )
    follower = CrashDumpFollower(
        store,
        backends,
        config.crash_dumps,
        dump_directory,
        owner=lease.id,
        host=config.host_name,
        mark_timeout=config.backends.state_timeout_seconds,
        uploads=None if collector is None else collector.uploads,
    )
    dispatcher = CrashDumpDispatcher(
        store, backends, follower, timeout=config.driver_timeout_seconds
    )
    capture = CaptureRunner(
        store,
        backends,
        dump_directory,
        host=config.host_name,
        timeout=config.capture.timeout_seconds,
        dispatch_nmi=dispatcher.run,
    )
    sync = PowerStateSync(store, backends, config)
    _load_inventory(config, store, box)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if collector is not None:
            collector.prepare(store, box)
            await asyncio.to_thread(collector.start)
        lease.renew()
        recovered = lease.fail_orphaned_events()
        if recovered:
            LOG.warning("%d crash dump event(s) were left running; marked Error", recovered)
        await follower.resume_orphans(lease.live_owners())
        await asyncio.to_thread(follower.prune)
        # One bounded pass before serving, so the first reads show real states.
        await sync.run_once()
        background = [
            asyncio.create_task(sync.run_forever()),
            asyncio.create_task(
                compute.readiness.run_forever(config.readiness.interval_seconds, TICK_SECONDS)
            ),
            asyncio.create_task(lease.keep()),
            asyncio.create_task(
                follower.keep_resuming(lease.live_owners, config.lease_seconds / 3)
            ),
        ]
        if collector is not None:
            background += [
                asyncio.create_task(follower.keep_collecting_unattributed(UNATTRIBUTED_SECONDS)),
                asyncio.create_task(collector.keep_running(TICK_SECONDS)),
            ]
        yield
        for task in background:
            task.cancel()
        await follower.close()
        if collector is not None:
            collector.stop()
        lease.end()
        backends.close()

    app = FastAPI(
        title="crashlab",
        version="0.1.0",
        description="Nova-compatible trigger_crash_dump (microversion 2.17) over libvirt, "
        "IPMI and Redfish, with an embedded Keystone v3 subset.",
        lifespan=lifespan,
        # Nova answers 404 for a path it does not route, a trailing slash included.
        redirect_slashes=False,
    )
    app.state.service = compute
    app.state.dispatcher = dispatcher
    app.state.follower = follower
    app.state.capture = capture
    app.state.collector = collector
    app.state.tokens = TokenStore(config.identity, store.engine)
    app.state.public_endpoint = config.public_endpoint
    install_fault_handlers(app)
    install_openapi(app, config)
    for module in (
        versions,
        identity,
        servers,
        instance_actions,
        extension,
        crash_dumps,
        crash_readiness,
        dump_target,
    ):
        app.include_router(module.router)
    app.add_middleware(
        TenantAdmission,
        validate=app.state.tokens.validate,
        concurrency=config.tenant_requests.concurrency,
        queue=config.tenant_requests.queue,
    )
    # Outermost, so every answer (a 429 from admission too) carries Nova's headers.
    app.add_middleware(NovaHeadersMiddleware, max_body_bytes=config.max_body_bytes)
    return app


def _load_inventory(config: Config, store: Store, box: SecretBox) -> None:
    """Config servers are upserted; their runtime state is kept across restarts."""
    for server in config.servers:
        built = build_server(
            config.identity,
            box,
            uuid=server.server_uuid,
            name=server.name,
            project=server.project_id,
            user=server.user_id,
            driver=server.driver,
            driver_info=server.driver_info,
            source="config",
            dump_target=server.dump_target,
            dump_timeouts=server.dump_timeouts,
            expected_kernel_release=server.expected_kernel_release,
            collector_enabled=config.collector.enabled,
        )
        # The config's state applies to a new server only (see upsert_config_server).
        store.upsert_config_server(
            replace(built, vm_state_override=server.vm_state, locked_by=server.locked_by)
        )
