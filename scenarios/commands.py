"""The scenario layer's commands: ``image build``, ``doctor``, and ``scenario kdump``,
``preflight``, ``guarded``, ``capture`` and ``all``.

Before booting anything, both scenario commands run ``crashlab doctor``'s cheap
checks and stop with its table when one fails: a host that would re-probe QEMU
on every define fails here in seconds, not minutes later with a driver timeout.

The scenario commands' exit codes: 0 when every run gave the verdict its variant expects, 1 when one
did not or the host is not ready, 130 when interrupted (guests, emulators and
the service are cleaned up first). With ``--json`` the report on stdout is
JSON; progress always goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emulators.doctor import CHEAP_CHECKS, failed, render_table, run_checks
from emulators.doctor import to_json as doctor_json
from emulators.guest_image import ImageVariant, build_image
from scenarios.api import FAKE_CLOUD_ADMIN, FAKE_CLOUD_USER, Account, ScenarioAPI
from scenarios.kdump import EXPECTED_VERDICT, run_kdump_scenario
from scenarios.matrix import run_matrix
from scenarios.progress import Progress
from scenarios.readiness_capture import EXPECTED_READINESS, run_scenario
from scenarios.report import render_report, render_summary, to_json
from scenarios.via import Via


def add_host_commands(commands: Any) -> None:
    """Add ``image build`` and ``doctor`` to the ``crashlab`` subcommands."""
    image = commands.add_parser("image", help="guest images").add_subparsers(title="image commands")
    image_build = image.add_parser("build", help="build (or reuse) the cached guest images")
    image_build.add_argument(
        "--variant", action="append", help="kdump, no-kdump or nmi-ignored (default: all)"
    )
    image_build.set_defaults(handler=_image_build)

    doctor = commands.add_parser("doctor", help="check that this host can run crashlab's guests")
    doctor.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    doctor.set_defaults(handler=_doctor)


def _image_build(args: argparse.Namespace) -> int:
    for variant in args.variant or [v.value for v in ImageVariant]:
        image = build_image(variant)
        print(f"{image.variant.value}: {image.kernel_release} {image.initrd.parent}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    results = run_checks()
    print(doctor_json(results) if args.json else render_table(results))
    return 1 if failed(results) else 0


def add_scenario_parser(commands: Any) -> None:
    """Add ``scenario kdump`` and ``scenario all`` to the ``crashlab`` subcommands."""
    scenario = commands.add_parser(
        "scenario", help="boot a kdump guest, trigger its crash dump via the API, prove the vmcore"
    ).add_subparsers(title="scenarios")

    kdump = scenario.add_parser("kdump", help="one path, one guest variant")
    kdump.add_argument("--via", choices=[v.value for v in Via], default=Via.LIBVIRT.value)
    kdump.add_argument(
        "--variant", choices=[v.value for v in EXPECTED_VERDICT], default=ImageVariant.KDUMP.value
    )
    _common_flags(kdump)
    kdump.add_argument(
        "--target",
        choices=["disk", "ssh"],
        help="the dump target (default: ssh behind a BMC for kdump, else disk)",
    )
    kdump.set_defaults(handler=_kdump)

    preflight = scenario.add_parser(
        "preflight", help="each image variant gets the crash readiness it should have"
    )
    preflight.set_defaults(handler=_beyond_nmi, scenario="preflight", variant="kdump")
    _common_flags(preflight)
    for name, default, text in (
        ("guarded", ImageVariant.NMI_IGNORED, "the guarded trigger refuses a guest not armed"),
        ("capture", ImageVariant.NO_KDUMP, "a host-side memory capture, verified, guest running"),
    ):
        beyond = scenario.add_parser(name, help=text)
        beyond.add_argument(
            "--variant", choices=[v.value for v in EXPECTED_READINESS], default=default.value
        )
        beyond.set_defaults(handler=_beyond_nmi, scenario=name)
        _common_flags(beyond)

    everything = scenario.add_parser(
        "all",
        help="libvirt, ipmi and redfish with kdump; no-kdump and nmi-ignored over libvirt; "
        "preflight, guarded and capture",
    )
    _common_flags(everything)
    everything.set_defaults(handler=_all)


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--api", metavar="URL", help="use this running API instead of starting crashlab serve"
    )
    parser.add_argument(
        "--admin",
        metavar="USER:PASSWORD@PROJECT",
        type=_account,
        default=FAKE_CLOUD_ADMIN,
        help="with --api: who registers the server (default: the fake cloud's admin)",
    )
    parser.add_argument(
        "--user",
        metavar="USER:PASSWORD@PROJECT",
        type=_account,
        default=FAKE_CLOUD_USER,
        help="with --api: who owns the server and triggers the dump (default: alice)",
    )
    parser.add_argument("--output", type=Path, help="where to keep the console, vmcore and logs")
    parser.add_argument("--console", action="store_true", help="echo the guest console")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _account(text: str) -> Account:
    try:
        credentials, project = text.rsplit("@", 1)
        username, password = credentials.split(":", 1)
    except ValueError:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD@PROJECT") from None
    return Account(username, password, project)


def _api(args: argparse.Namespace) -> ScenarioAPI | None:
    return ScenarioAPI(args.api, args.admin, args.user) if args.api else None


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(quiet=args.quiet, echo_console=args.console)


def _host_ready() -> bool:
    results = run_checks(CHEAP_CHECKS)
    if failed(results):
        print(render_table(results), file=sys.stderr)
        print("crashlab: this host is not ready; nothing was booted", file=sys.stderr)
        return False
    return True


def _kdump(args: argparse.Namespace) -> int:
    if args.target == "ssh" and args.variant != ImageVariant.KDUMP.value:
        print("crashlab: --target ssh is for the kdump variant", file=sys.stderr)
        return 2
    if not _host_ready():
        return 1
    try:
        result = run_kdump_scenario(
            args.via,
            args.variant,
            target=args.target,
            api=_api(args),
            output=args.output,
            progress=_progress(args),
        )
    except KeyboardInterrupt:
        print("crashlab: interrupted; the guest and its emulators were removed", file=sys.stderr)
        return 130
    print(to_json(result) if args.json else render_report(result))
    return 0 if result.ok else 1


def _beyond_nmi(args: argparse.Namespace) -> int:
    if not _host_ready():
        return 1
    try:
        result = run_scenario(
            args.scenario,
            args.variant,
            api=_api(args),
            output=args.output,
            progress=_progress(args),
        )
    except KeyboardInterrupt:
        print("crashlab: interrupted; the guests were removed", file=sys.stderr)
        return 130
    print(to_json(result) if args.json else render_report(result))
    return 0 if result.ok else 1


def _all(args: argparse.Namespace) -> int:
    if not _host_ready():
        return 1
    try:
        results = run_matrix(api=_api(args), output=args.output, progress=_progress(args))
    except KeyboardInterrupt:
        print("crashlab: interrupted; the guests and emulators were removed", file=sys.stderr)
        return 130
    print(to_json(results) if args.json else render_summary(results))
    return 0 if all(r.ok for r in results) else 1
