"""The support matrix, generated from what each driver declares."""

from __future__ import annotations

from drivers import all_driver_classes

CAPABILITIES = {
    "nmi": "trigger_crash_dump (NMI)",
    "power_state": "live power state",
    "guest_agent": "crash readiness (guest agent)",
    "memory_dump": "host-side memory dump",
}


def support_matrix_markdown() -> str:
    classes = all_driver_classes()
    header = "| Driver | Backend | " + " | ".join(CAPABILITIES.values()) + " |"
    rule = "|" + "---|" * (2 + len(CAPABILITIES))
    rows = [
        f"| `{cls.name}` | {cls.description} | "
        + " | ".join("yes" if cap in cls.capabilities else "no" for cap in CAPABILITIES)
        + " |"
        for cls in classes
    ]
    return "\n".join([header, rule, *rows])
