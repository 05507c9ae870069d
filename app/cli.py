"""The product's commands: serve the API and talk to it.

``python -m app.cli serve`` runs the service with nothing of the emulators or the
scenarios imported. The installed ``crashlab`` command adds the scenario layer's
commands to these (scenarios/cli.py).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.client import ClientError, CrashlabClient, Credentials
from app.config import ConfigError, load_config

DESCRIPTION = "The ``crashlab`` command: serve the API, talk to it, run scenarios."

Handler = Callable[[argparse.Namespace], int]
# What add_parser is called on: the action argparse's add_subparsers returns.
Commands = Any


def main(argv: Sequence[str] | None = None) -> int:
    """The product's commands alone; ``crashlab`` as installed is scenarios/cli.py."""
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` with ``parser`` and run the chosen command's handler."""
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except ConfigError as error:
        print(f"crashlab: config error: {error}", file=sys.stderr)
        return 2
    except (ClientError, ValueError, TimeoutError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1


def build_parser(*more_commands: Callable[[Commands], None]) -> argparse.ArgumentParser:
    """The ``crashlab`` parser: the product's commands, then those ``more_commands`` add."""
    parser = argparse.ArgumentParser(prog="crashlab", description=DESCRIPTION)
    commands = parser.add_subparsers(title="commands")
    add_commands(commands)
    for add in more_commands:
        add(commands)
    return parser


def is_product_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` names one of the commands ``add_commands`` adds."""
    commands = argparse.ArgumentParser().add_subparsers()
    add_commands(commands)
    return bool(argv) and argv[0] in commands.choices


def add_commands(commands: Commands) -> None:
    """Add the product's commands: serve, hash-password, support-matrix and the API client's."""
    serve = commands.add_parser("serve", help="serve the API")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8774)
    serve.add_argument("--state", type=Path, help="SQLite state file (overrides the config)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(handler=_serve)

    hash_pw = commands.add_parser("hash-password", help="print a bcrypt hash for the config")
    hash_pw.add_argument("password", nargs="?", help="read from the terminal when omitted")
    hash_pw.set_defaults(handler=_hash_password)

    matrix = commands.add_parser("support-matrix", help="print what each driver supports")
    matrix.set_defaults(handler=_support_matrix)

    trigger = commands.add_parser("trigger-crash", help="trigger a crash dump in a server")
    _client_flags(trigger)
    trigger.add_argument("server", help="name or uuid")
    trigger.add_argument(
        "--wait",
        action="store_true",
        help="wait for the NMI's result, then for the crash dump to be verified or failed",
    )
    trigger.add_argument(
        "--require-armed",
        action="store_true",
        help="send only if the server's crash readiness is armed (checked afresh)",
    )
    trigger.add_argument(
        "--allow-unknown", action="store_true", help="with --require-armed: send if unknown too"
    )
    trigger.add_argument("--timeout", type=float, default=600.0)
    trigger.set_defaults(handler=_trigger_crash)

    readiness = commands.add_parser(
        "readiness", help="would an NMI leave a dump? armed, not-armed or unknown"
    )
    _client_flags(readiness)
    readiness.add_argument("server", help="name or uuid")
    readiness.add_argument("--refresh", action="store_true", help="check afresh, bounded")
    readiness.set_defaults(handler=_readiness)

    capture = commands.add_parser(
        "capture", help="dump a server's memory from its hypervisor (admin; libvirt)"
    )
    _client_flags(capture)
    capture.add_argument("server", help="name or uuid")
    capture.add_argument("--then", choices=("resume", "nmi", "destroy"), default="resume")
    capture.add_argument("--wait", action="store_true", help="wait until it is verified or not")
    capture.add_argument("--timeout", type=float, default=300.0)
    capture.set_defaults(handler=_capture)

    dump = commands.add_parser("dump", help="crash dumps").add_subparsers(title="dump commands")
    dump_list = dump.add_parser("list", help="list a server's crash dumps, newest first")
    _client_flags(dump_list)
    dump_list.add_argument("server", help="name or uuid")
    dump_list.set_defaults(handler=_dump_list)
    dump_show = dump.add_parser("show", help="show one crash dump")
    _client_flags(dump_show)
    dump_show.add_argument("server", help="name or uuid")
    dump_show.add_argument("dump", help="the crash dump's id")
    dump_show.set_defaults(handler=_dump_show)
    dump_get = dump.add_parser("get", help="download a crash dump's vmcore")
    _client_flags(dump_get)
    dump_get.add_argument("server", help="name or uuid")
    dump_get.add_argument("dump", help="the crash dump's id")
    dump_get.add_argument("-o", "--output", type=Path, required=True, help="where to write it")
    dump_get.set_defaults(handler=_dump_get)

    server = commands.add_parser("server", help="servers").add_subparsers(title="server commands")
    server_list = server.add_parser("list", help="list servers")
    _client_flags(server_list)
    server_list.set_defaults(handler=_server_list)

    action = commands.add_parser("action", help="instance actions").add_subparsers(
        title="action commands"
    )
    action_list = action.add_parser("list", help="list a server's actions")
    _client_flags(action_list)
    action_list.add_argument("server")
    action_list.set_defaults(handler=_action_list)
    action_show = action.add_parser("show", help="show one action and its events")
    _client_flags(action_show)
    action_show.add_argument("server")
    action_show.add_argument("request_id")
    action_show.set_defaults(handler=_action_show)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--os-auth-url", help="default: $OS_AUTH_URL")
    parser.add_argument("--os-username", help="default: $OS_USERNAME")
    parser.add_argument("--os-password", help="default: $OS_PASSWORD")
    parser.add_argument("--os-project-name", help="default: $OS_PROJECT_NAME")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _client(args: argparse.Namespace) -> CrashlabClient:
    return CrashlabClient(
        Credentials.from_env(
            auth_url=args.os_auth_url,
            username=args.os_username,
            password=args.os_password,
            project_name=args.os_project_name,
        )
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.api.app import create_app
    from app.api.http_protocol import NovaH11Protocol
    from app.api.middleware import MAX_REQUEST_HEAD_BYTES

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(load_config(args.config), state_file=args.state)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        http=NovaH11Protocol,
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
    )
    # Shut down: every event and lease is written. A driver thread stuck in a
    # hung backend's call can never be joined, so the process ends without
    # the interpreter's wait for its threads.
    logging.shutdown()
    os._exit(0)


def _hash_password(args: argparse.Namespace) -> int:
    from app.identity import hash_password

    password = args.password or getpass.getpass("password: ")
    print(hash_password(password))
    return 0


def _support_matrix(_args: argparse.Namespace) -> int:
    from drivers.matrix import support_matrix_markdown

    print(support_matrix_markdown())
    return 0


def _trigger_crash(args: argparse.Namespace) -> int:
    client = _client(args)
    server = client.find_server(args.server)
    request_id = client.trigger_crash_dump(
        server["id"], require_armed=args.require_armed, allow_unknown=args.allow_unknown
    )
    if not args.wait:
        _print(
            args, {"server_id": server["id"], "request_id": request_id}, f"Accepted: {request_id}"
        )
        return 0
    action = client.wait_for_event(server["id"], request_id, timeout=args.timeout)
    event = action["events"][0]
    event_line = f"{event['event']}: {event['result']}" + _details(event)
    report: dict[str, Any] = {"server_id": server["id"], "request_id": request_id, "event": event}
    # The dump is opened with the NMI's Success: none means no NMI or no dump target.
    followed = event["result"] == "Success" and any(
        d["request_id"] == request_id for d in client.list_crash_dumps(server["id"])
    )
    if not followed:
        _print(args, report, event_line)
        return 0 if event["result"] == "Success" else 1
    _progress(args, event_line)
    dump = client.wait_for_dump(
        server["id"],
        request_id,
        timeout=args.timeout,
        on_change=lambda d: _progress(args, f"crash dump {d['id']}: {d['state']}"),
    )
    report["crash_dump"] = dump
    report["events"] = client.get_action(server["id"], request_id)["events"]
    for later in report["events"][1:]:
        _progress(args, f"{later['event']}: {later['result']}" + _details(later))
    text = f"crash dump {dump['id']}: {dump['state']}" + (
        f" ({dump['error']})" if dump.get("error") else ""
    )
    _print(args, report, text)
    return 0 if dump["state"] == "verified" else 1


def _readiness(args: argparse.Namespace) -> int:
    client, server_id = _client_and_server(args)
    readiness = client.get_readiness(server_id, refresh=args.refresh)
    lines = [f"{readiness['verdict']} (checked {readiness['checked_at'] or 'never'})"]
    lines += [f"  reason: {reason}" for reason in readiness["reasons"]]
    lines += [
        f"  {name} = {fact['value']!r}  [{fact['source']}]"
        for name, fact in readiness["facts"].items()
    ]
    _print(args, readiness, "\n".join(lines))
    return 0 if readiness["verdict"] == "armed" else 1


def _capture(args: argparse.Namespace) -> int:
    client, server_id = _client_and_server(args)
    dump = client.capture_memory_dump(server_id, then=args.then)
    if args.wait:
        _progress(args, f"crash dump {dump['id']}: {dump['state']}")
        dump = client.wait_for_capture(server_id, dump["id"], timeout=args.timeout)
    text = f"crash dump {dump['id']}: {dump['state']}" + (
        f" ({dump['error']})" if dump.get("error") else ""
    )
    _print(args, dump, text)
    return 0 if dump["state"] in ("verified", "capturing") else 1


def _details(event: dict[str, Any]) -> str:
    return f" ({event['details']})" if event.get("details") else ""


def _progress(args: argparse.Namespace, line: str) -> None:
    """One line per phase on stderr, so --json output stays one object."""
    print(line, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def _dump_list(args: argparse.Namespace) -> int:
    client = _client(args)
    dumps = client.list_crash_dumps(client.find_server(args.server)["id"])
    rows = [
        [d["id"], d["state"], d["target"], d["request_id"], d["created_at"], str(d["error"] or "")]
        for d in dumps
    ]
    _print(
        args, dumps, _table(["ID", "State", "Target", "Request_ID", "Created_At", "Error"], rows)
    )
    return 0


def _dump_show(args: argparse.Namespace) -> int:
    client, server_id = _client_and_server(args)
    _print_json(client.get_crash_dump(server_id, args.dump))
    return 0


def _dump_get(args: argparse.Namespace) -> int:
    client, server_id = _client_and_server(args)
    size = client.download_vmcore(server_id, args.dump, args.output)
    _print(args, {"path": str(args.output), "bytes": size}, f"{args.output}: {size} bytes")
    return 0


def _server_list(args: argparse.Namespace) -> int:
    servers = _client(args).list_servers()
    rows = [
        [
            s["id"],
            s["name"],
            s["status"],
            str(s["OS-EXT-STS:power_state"]),
            str(s.get("locked", "")),
        ]
        for s in servers
    ]
    _print(args, servers, _table(["ID", "Name", "Status", "Power", "Locked"], rows))
    return 0


def _action_list(args: argparse.Namespace) -> int:
    client = _client(args)
    actions = client.list_actions(client.find_server(args.server)["id"])
    rows = [[a["action"], a["request_id"], str(a["message"]), a["start_time"]] for a in actions]
    _print(args, actions, _table(["Action", "Request_ID", "Message", "Start_Time"], rows))
    return 0


def _action_show(args: argparse.Namespace) -> int:
    client, server_id = _client_and_server(args)
    _print_json(client.get_action(server_id, args.request_id))
    return 0


def _client_and_server(args: argparse.Namespace) -> tuple[CrashlabClient, str]:
    """The client, and the id of the server ``args.server`` names."""
    client = _client(args)
    return client, client.find_server(args.server)["id"]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line, fmt(headers), line, *(fmt(r) for r in rows), line])


if __name__ == "__main__":
    sys.exit(main())
