"""app/redaction.py: what a non-admin reads of an event's details."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.redaction import REDACTED, backend_settings, redact

pytestmark = pytest.mark.fast

IPMI = {"address": "bmc7.rack4.example", "port": 6230, "username": "opsuser", "timeout": 1.0}
REDFISH = {"address": "https://bmc9.example.net:8443", "username": "root", "verify_tls": True}
LIBVIRT = {"uri": "qemu+ssh://virt@kvm3.example/system", "domain": "alice-guest-7"}

# (driver_info, details as a driver writes them, what a non-admin reads)
CASES = [
    (
        IPMI,
        "no answer from BMC at 127.0.0.1:6230 within 1s (during login)",
        "no answer from BMC at [redacted] within 1s (during login)",
    ),
    (
        IPMI,
        "BMC at bmc7.rack4.example:6230 rejected the credentials of user 'opsuser': bad",
        "BMC at [redacted] rejected the credentials of user '[redacted]': bad",
    ),
    # Settings match as whole words, in any case.
    (IPMI, "BMC7.RACK4.EXAMPLE refused OpsUser.", "[redacted] refused [redacted]."),
    (IPMI, "user opsusers is not opsuser", "user opsusers is not [redacted]"),
    (
        REDFISH,
        "cannot reach BMC at https://bmc9.example.net:8443: timed out",
        "cannot reach BMC at [redacted]: timed out",
    ),
    # The host and user inside a URL setting, wherever they appear alone.
    (
        REDFISH,
        "HTTPSConnectionPool(host='bmc9.example.net', port=8443): login as root refused",
        "HTTPSConnectionPool(host='[redacted]', port=[redacted]): login as [redacted] refused",
    ),
    (
        LIBVIRT,
        "domain alice-guest-7 does not exist at qemu+ssh://virt@kvm3.example/system",
        "domain [redacted] does not exist at [redacted]",
    ),
    (LIBVIRT, "ssh to kvm3.example as virt failed", "ssh to [redacted] as [redacted] failed"),
    # Patterns, whatever the settings.
    (
        {},
        "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file",
        "Failed to connect socket to '[redacted]': No such file",
    ),
    ({}, "see /etc/crashlab/policy.yaml.", "see [redacted]."),
    ({}, "qemu:///system refused", "[redacted] refused"),
    (
        {},
        "peers 10.0.0.5, 10.0.0.6:623 and 192.168.1.1.",
        "peers [redacted], [redacted] and [redacted].",
    ),
    ({}, "at [fe80::1%eth0]:623 and [::1]", "at [redacted] and [redacted]"),
    (
        {},
        "from 2001:db8::5 or ::ffff:10.0.0.1 or fe80::1%eth0",
        "from [redacted] or [redacted] or [redacted]",
    ),
    ({}, "bmc.lab:623 and localhost:8000", "[redacted] and [redacted]"),
]
# Nothing in these looks like an address or a path, so they read the same.
KEPT = [
    "Triggering crash dump is not supported",
    "the backend did not answer within 60 s",
    "service restarted before the result was known",
    "NotImplementedError",
    "done at 12:30:45 after 1/2 of the retries, and/or a reset",
    "MAC aa:bb:cc:dd:ee:ff, completion code 0xc1, step 2:3",
    "IpmiException: Unauthorized name",
    "the vmcore crashed at 2026-12-02T13:34:24Z, before this NMI was sent at 2026-12-02T13:35:19Z",
    "a complete dump of 17151653 bytes arrived on the disk",
]


@pytest.mark.parametrize(("driver_info", "details", "shown"), CASES)
def test_redact(driver_info: dict[str, object], details: str, shown: str) -> None:
    assert redact(details, driver_info) == shown


@pytest.mark.parametrize("details", KEPT)
def test_details_without_addresses_are_kept(details: str) -> None:
    assert redact(details, IPMI) == details
    assert REDACTED not in redact(details, LIBVIRT)


def test_settings_that_are_not_strings_are_not_words() -> None:
    # The port alone is a number like any other; with its host it goes.
    assert redact("retry 6230 times", IPMI) == "retry 6230 times"
    assert redact("verify True", REDFISH) == "verify True"


def test_a_dump_target_s_domain_goes_and_its_type_and_device_stay() -> None:
    server = SimpleNamespace(
        driver_info={"address": "bmc.lab"},
        dump_target={"type": "disk", "device": "vda", "domain": "guest-7"},
    )
    settings = backend_settings(server)  # type: ignore[arg-type]
    assert redact("the disk vda of guest-7 behind bmc.lab", settings) == (
        "the disk vda of [redacted] behind [redacted]"
    )
