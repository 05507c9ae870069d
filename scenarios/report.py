"""Scenario results for people (a report, a summary table) and for machines (JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from scenarios.kdump import ScenarioResult


def to_json(results: ScenarioResult | Sequence[ScenarioResult]) -> str:
    """One object for one run; ``{"ok": ..., "results": [...]}`` for a matrix."""
    if isinstance(results, ScenarioResult):
        return json.dumps(results.as_dict(), indent=2)
    return json.dumps(
        {"ok": all(r.ok for r in results), "results": [r.as_dict() for r in results]}, indent=2
    )


def render_report(result: ScenarioResult) -> str:
    """The readable report of one run."""
    s = result.seconds
    vmcore = result.vmcore
    event = _or(result.action_result)
    if result.action_details:
        event += f" ({result.action_details})"
    rows = [
        ("path", f"{result.via}, variant {result.variant}"),
        ("guest", f"{_or(result.domain)} ({_or(result.accel)})"),
        ("guest kernel", _or(result.guest_kernel_release)),
        ("boot", _secs(s.boot)),
        ("server", _or(result.server_id)),
        ("request", _or(result.request_id)),
        ("action event", event),
        ("NMI received", _yes(result.nmi_received)),
        ("panicked", _yes(result.panicked) + _after(s.trigger_to_panic, "the trigger", 2)),
        ("dump saved", _yes(result.dump_saved) + _after(s.panic_to_dump, "the panic")),
        ("crash dump", _dump(result)),
    ]
    if vmcore:
        rows += [
            ("vmcore", f"{vmcore.path} ({vmcore.bytes / 1e6:.1f} MB, downloaded)"),
            ("vmcore format", vmcore.format),
            ("vmcore kernel", _match(vmcore.kernel_release, result.guest_kernel_release)),
            ("panic message", _or(vmcore.panic_message)),
        ]
    else:
        rows.append(("vmcore", "-"))
    rows += [
        ("artifacts", _or(str(result.artifacts) if result.artifacts else None)),
        ("total", _secs(s.total)),
    ]
    width = max(len(name) for name, _ in rows)
    command = (
        f"kdump --via {result.via}" if result.scenario == "kdump" else result.scenario
    ) + f" --variant {result.variant}"
    lines = [f"crashlab scenario {command}", ""]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    verdict = f"{result.verdict}" + (f": {result.reason}" if result.reason else "")
    outcome = "PASS" if result.ok else f"FAIL (expected {result.expected_verdict})"
    lines += ["", f"  verdict  {verdict}  {outcome}"]
    return "\n".join(lines)


def render_summary(results: Sequence[ScenarioResult]) -> str:
    """The matrix as one table, then one line saying whether it all passed."""
    headers = ["scenario", "via", "variant", "verdict", "expected", "ok", "dump", "boot"]
    headers += ["trigger→panic", "panic→dump", "vmcore kernel", "total"]
    rows = [
        [
            r.scenario,
            r.via.value,
            r.variant.value,
            r.verdict.value,
            r.expected_verdict.value,
            "PASS" if r.ok else "FAIL",
            _or(r.dump_state),
            _secs(r.seconds.boot),
            _secs(r.seconds.trigger_to_panic, digits=2),
            _secs(r.seconds.panic_to_dump),
            r.vmcore.kernel_release if r.vmcore else "-",
            _secs(r.seconds.total),
        ]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    table = [rule, line(headers), rule, *(line(row) for row in rows), rule]
    failed = [r for r in results if not r.ok]
    table.append(f"{len(results) - len(failed)}/{len(results)} scenarios gave the expected verdict")
    table += [f"  {r.scenario} {r.via}/{r.variant}: {r.verdict}: {r.reason}" for r in failed]
    return "\n".join(table)


def _dump(result: ScenarioResult) -> str:
    """The crash dump the API followed: its id, its state and, when it failed, why."""
    if result.dump_id is None:
        return "-"
    text = f"{result.dump_id} ({result.dump_state})"
    return text + (f": {result.dump_error}" if result.dump_error else "")


def _or(value: str | None) -> str:
    return value if value else "-"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _secs(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def _after(value: float | None, what: str, digits: int = 1) -> str:
    return "" if value is None else f" ({value:.{digits}f} s after {what})"


def _match(found: str, expected: str | None) -> str:
    return (
        f"{found} (matches the guest)" if found == expected else f"{found} (guest ran {expected})"
    )
