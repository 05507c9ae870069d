"""The Redfish driver against real services: sushy-tools over libvirt domains, and a small peer.

sushy-tools always lists ``Nmi``; the other ways a BMC may publish (or not)
its reset types are served by ``emulators/redfish_sim.py`` over HTTP.
Nothing here patches sushy or libvirt.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest

from drivers.base import (
    BackendAuthFailed,
    BackendError,
    BackendRejected,
    BackendUnreachable,
    NMINotSupported,
    PowerState,
    ServerNotFound,
    ServerPoweredOff,
)
from drivers.redfish import RedfishDriver
from emulators.guest import Guest
from emulators.guest_image import ImageVariant, build_image
from emulators.redfish_sim import PeerBehaviour, RedfishPeer
from emulators.sushy import SushyEmulator
from tests.fixtures import (
    NMI_PANIC,
    assert_one_nmi_logged,
    bmc_cloud,
    error_events_while_the_api_answers,
    trigger_until_panic,
)
from tests.live import LiveServer

pytestmark = [pytest.mark.bmc, pytest.mark.libvirt]

SUSHY_METADATA = "http://openstack.org/xmlns/libvirt/sushy"
RESET_LOGGED = "POST /redfish/v1/Systems/{}/Actions/ComputerSystem.Reset"


def _redfish_info(emulator: SushyEmulator, **overrides: object) -> dict[str, object]:
    return emulator.driver_info() | {"verify_tls": False} | overrides


def _driver(emulator: SushyEmulator, **overrides: object) -> RedfishDriver:
    settings = RedfishDriver.parse_settings(_redfish_info(emulator, **overrides))
    return RedfishDriver("server-1", settings)


def _peer_driver(peer: RedfishPeer, **overrides: object) -> RedfishDriver:
    raw = {
        "address": peer.url,
        "username": peer.behaviour.username,
        "password": peer.behaviour.password,
    }
    return RedfishDriver("server-1", RedfishDriver.parse_settings(raw | overrides))


def _resets_logged(emulator: SushyEmulator, domain: str) -> int:
    return emulator.log().count(RESET_LOGGED.format(emulator.system_id(domain)))


def _persistent_xml(conn: libvirt.virConnect, name: str) -> str:
    xml: str = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    return xml


# -- against sushy-tools in front of libvirt domains -----------------------------------


def test_power_state_follows_the_domain(
    sushy_emulator: Callable[..., SushyEmulator],
    blank_domain: Callable[..., str],
    libvirt_conn: libvirt.virConnect,
) -> None:
    name = blank_domain()
    emulator = sushy_emulator()
    driver = _driver(emulator, system_id=emulator.system_id(name))
    assert driver.get_power_state() == PowerState.RUNNING
    libvirt_conn.lookupByName(name).destroy()
    assert driver.get_power_state() == PowerState.SHUTDOWN


def test_nmi_reaches_the_guest_exactly_once(
    sushy_emulator: Callable[..., SushyEmulator], nmi_logging_guest: Guest
) -> None:
    emulator = sushy_emulator()
    driver = _driver(emulator, system_id=nmi_logging_guest.uuid)
    assert_one_nmi_logged(nmi_logging_guest, driver.trigger_crash_dump)
    assert _resets_logged(emulator, nmi_logging_guest.name) == 1


def test_the_first_trigger_does_not_pay_for_sushy_tools_first_get(
    sushy_emulator: Callable[..., SushyEmulator],
    blank_domain: Callable[..., str],
    libvirt_conn: libvirt.virConnect,
) -> None:
    """sushy-tools' first GET of a system defines the domain; the emulator pays it at start."""
    name = blank_domain()
    assert SUSHY_METADATA not in _persistent_xml(libvirt_conn, name)
    emulator = sushy_emulator(domains=[name])
    assert SUSHY_METADATA in _persistent_xml(libvirt_conn, name), "warmed before use"
    driver = _driver(emulator, system_id=emulator.system_id(name))
    started = time.monotonic()
    driver.trigger_crash_dump()
    assert time.monotonic() - started < 2.0
    assert _resets_logged(emulator, name) == 1


@pytest.mark.parametrize("form", ["uuid", "path", "domain name", "only system"])
def test_system_is_found_by_id_path_name_or_as_the_only_one(
    sushy_emulator: Callable[..., SushyEmulator], blank_domain: Callable[..., str], form: str
) -> None:
    name = blank_domain()
    emulator = sushy_emulator(domains=[name] if form == "only system" else None)
    system_id = {
        "uuid": emulator.system_id(name),
        "path": emulator.system_path(name),
        "domain name": name,  # sushy-tools redirects it to the UUID
        "only system": None,
    }[form]
    assert _driver(emulator, system_id=system_id).get_power_state() == PowerState.RUNNING


def test_missing_system_is_not_found(sushy_emulator: Callable[..., SushyEmulator]) -> None:
    emulator = sushy_emulator()
    with pytest.raises(
        ServerNotFound, match=f"BMC at {emulator.url} has no system 'no-such-system'"
    ):
        _driver(emulator, system_id="no-such-system").trigger_crash_dump()


def test_powered_off_server_is_refused_and_nothing_is_sent(
    sushy_emulator: Callable[..., SushyEmulator], blank_domain: Callable[..., str]
) -> None:
    # sushy-tools would answer 204 and drop the NMI: no silent success.
    name = blank_domain(running=False)
    emulator = sushy_emulator()
    with pytest.raises(ServerPoweredOff, match=r"^server is powered off$"):
        _driver(emulator, system_id=emulator.system_id(name)).trigger_crash_dump()
    assert _resets_logged(emulator, name) == 0


def test_wrong_password_is_an_auth_failure_that_names_no_password(
    sushy_emulator: Callable[..., SushyEmulator], blank_domain: Callable[..., str]
) -> None:
    name = blank_domain()
    emulator = sushy_emulator()
    driver = _driver(emulator, system_id=emulator.system_id(name), password="not-the-password")
    with pytest.raises(
        BackendAuthFailed, match=r"rejected the credentials of user 'crashlab' \(HTTP 401\)"
    ) as failure:
        driver.trigger_crash_dump()
    assert "not-the-password" not in str(failure.value)
    assert emulator.password not in str(failure.value)
    assert _resets_logged(emulator, name) == 0


def test_tls_verified_against_its_certificate(
    sushy_emulator: Callable[..., SushyEmulator], blank_domain: Callable[..., str]
) -> None:
    name = blank_domain()
    emulator = sushy_emulator(tls=True)
    assert emulator.url.startswith("https://") and emulator.ca_file is not None
    system_id = emulator.system_id(name)
    verified = _driver(
        emulator, system_id=system_id, verify_tls=True, ca_bundle=str(emulator.ca_file)
    )
    assert verified.get_power_state() == PowerState.RUNNING
    verified.trigger_crash_dump()
    assert _resets_logged(emulator, name) == 1


def test_tls_with_an_untrusted_certificate_is_refused_unless_verification_is_off(
    sushy_emulator: Callable[..., SushyEmulator], blank_domain: Callable[..., str]
) -> None:
    name = blank_domain()
    emulator = sushy_emulator(tls=True)
    system_id = emulator.system_id(name)
    with pytest.raises(BackendError, match="certificate verify failed: self-signed certificate"):
        _driver(emulator, system_id=system_id, verify_tls=True).trigger_crash_dump()
    assert _resets_logged(emulator, name) == 0
    _driver(emulator, system_id=system_id, verify_tls=False).trigger_crash_dump()
    assert _resets_logged(emulator, name) == 1


def test_stopped_bmc_is_unreachable_at_once(
    sushy_emulator: Callable[..., SushyEmulator], blank_domain: Callable[..., str]
) -> None:
    name = blank_domain()
    emulator = sushy_emulator()
    driver = _driver(emulator, system_id=emulator.system_id(name))
    emulator.stop()
    started = time.monotonic()
    with pytest.raises(BackendUnreachable, match="Connection refused"):
        driver.trigger_crash_dump()
    assert time.monotonic() - started < 1


@pytest.fixture
def silent_bmc() -> Iterator[str]:
    """A TCP port that accepts connections and never answers, as a hung BMC does."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("timeout", [2.0, None], ids=["timeout=2", "default"])
def test_hung_bmc_fails_within_the_timeout(silent_bmc: str, timeout: float | None) -> None:
    raw: dict[str, object] = {"address": silent_bmc, "username": "u", "password": "p"}
    if timeout:
        raw["timeout"] = timeout
    driver = RedfishDriver("server-1", RedfishDriver.parse_settings(raw))
    started = time.monotonic()
    with pytest.raises(BackendUnreachable, match=f"no answer from BMC at {silent_bmc}"):
        driver.trigger_crash_dump()
    elapsed = time.monotonic() - started
    print(f"\nhung Redfish BMC, timeout {driver.settings.timeout:g}s: failed after {elapsed:.2f}s")
    assert driver.settings.timeout <= elapsed < driver.settings.timeout + 0.5


# -- how a BMC publishes its reset types, via the peer ---------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(PeerBehaviour(), id="nmi-listed"),
        pytest.param(
            PeerBehaviour(allowable_values=None, action_info_values=["On", "Nmi"]),
            id="action-info-with-nmi",
        ),
        # Nothing published means unknown, so it is tried.
        pytest.param(PeerBehaviour(allowable_values=None), id="nothing-published"),
    ],
)
def test_nmi_allowed_or_unknown_is_sent(behaviour: PeerBehaviour) -> None:
    with RedfishPeer(behaviour) as peer:
        _peer_driver(peer).trigger_crash_dump()
        assert peer.resets == ["Nmi"]


@pytest.mark.parametrize(
    ("behaviour", "match"),
    [
        pytest.param(
            PeerBehaviour(allowable_values=["On", "ForceOff", "ForceRestart"]),
            r"does not accept ResetType Nmi \(allowed: ForceOff, ForceRestart, On\)",
            id="list-without-nmi",
        ),
        pytest.param(
            PeerBehaviour(allowable_values=None, action_info_values=["On", "ForceOff"]),
            r"allowed: ForceOff, On\)",
            id="action-info-without-nmi",
        ),
    ],
)
def test_nmi_not_published_is_not_supported_and_nothing_is_sent(
    behaviour: PeerBehaviour, match: str
) -> None:
    with RedfishPeer(behaviour) as peer:
        with pytest.raises(NMINotSupported, match=match):
            _peer_driver(peer).trigger_crash_dump()
        assert peer.resets == []


def test_unknown_and_refused_by_the_bmc_is_rejected_with_its_words() -> None:
    with (
        RedfishPeer(PeerBehaviour(allowable_values=None, reset_status=400)) as peer,
        pytest.raises(BackendRejected, match=r"answered HTTP 400: ResetType Nmi is not supported"),
    ):
        _peer_driver(peer).trigger_crash_dump()


def test_malformed_resource_is_a_backend_error_that_says_so() -> None:
    with RedfishPeer(PeerBehaviour(malformed_root=True)) as peer:
        with pytest.raises(
            BackendError,
            match=f"^BMC at {peer.url} sent a malformed Redfish resource: AttributeError: ",
        ):
            _peer_driver(peer).trigger_crash_dump()
        assert peer.resets == []


def test_peer_powered_off_gets_no_reset() -> None:
    with RedfishPeer(PeerBehaviour(power_state="Off")) as peer:
        driver = _peer_driver(peer)
        assert driver.get_power_state() == PowerState.SHUTDOWN
        with pytest.raises(ServerPoweredOff):
            driver.trigger_crash_dump()
        assert peer.resets == []


def test_a_fleet_of_redfish_bmcs_is_triggered_in_parallel() -> None:
    fleet = 20
    peers = [RedfishPeer(PeerBehaviour(latency=0.1)).__enter__() for _ in range(fleet)]
    try:
        drivers = [_peer_driver(peer) for peer in peers]
        started = time.monotonic()
        drivers[0].trigger_crash_dump()
        one = time.monotonic() - started
        started = time.monotonic()
        with ThreadPoolExecutor(fleet) as pool:
            list(pool.map(lambda d: d.trigger_crash_dump(), drivers))
        wall = time.monotonic() - started
        print(f"\nRedfish: one call {one:.2f}s; {fleet} at once {wall:.2f}s")
        assert [len(p.resets) for p in peers] == [2] + [1] * (fleet - 1)
        assert wall < fleet * one / 4
    finally:
        for peer in peers:
            peer.__exit__(None, None, None)


# -- end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_crash_dump_through_sushy_tools_panics_the_guest(
    sushy_emulator: Callable[..., SushyEmulator],
) -> None:
    with Guest(build_image(ImageVariant.NO_KDUMP)) as guest:
        guest.wait_ready(timeout=180)
        emulator = sushy_emulator(tls=True)
        driver = _driver(
            emulator, system_id=guest.uuid, verify_tls=True, ca_bundle=str(emulator.ca_file)
        )
        assert driver.get_power_state() == PowerState.RUNNING
        driver.trigger_crash_dump()
        guest.wait_for(NMI_PANIC, timeout=60)


# -- through crashlab's REST API ----------------------------------------------------------


@pytest.mark.slow
def test_owner_triggers_through_the_api_and_the_guest_panics(
    sushy_emulator: Callable[..., SushyEmulator], crashlab_server: Callable[..., LiveServer]
) -> None:
    with Guest(build_image(ImageVariant.NO_KDUMP)) as guest:
        guest.wait_ready(timeout=180)
        emulator = sushy_emulator(tls=True)
        info = _redfish_info(
            emulator, system_id=guest.uuid, verify_tls=True, ca_bundle=str(emulator.ca_file)
        )
        server = crashlab_server(bmc_cloud({"bm-redfish": ("redfish", info)}))
        trigger_until_panic(server, guest, "bm-redfish")
        assert emulator.password not in server.log_path.read_text()


def test_bad_password_and_hung_bmc_end_in_error_events_while_the_api_answers(
    sushy_emulator: Callable[..., SushyEmulator],
    blank_domain: Callable[..., str],
    silent_bmc: str,
    crashlab_server: Callable[..., LiveServer],
) -> None:
    name = blank_domain()
    emulator = sushy_emulator()
    wrong_password = "wrong-password-42"
    system_id = emulator.system_id(name)
    hung = {"address": silent_bmc, "username": "root", "password": "hung-secret", "timeout": 3}
    server = crashlab_server(
        bmc_cloud(
            {
                "bm-wrong-password": (
                    "redfish",
                    _redfish_info(emulator, system_id=system_id, password=wrong_password),
                ),
                "bm-hung-bmc": ("redfish", hung),
            }
        )
    )
    wrong_event, hung_event = error_events_while_the_api_answers(
        server, "bm-wrong-password", "bm-hung-bmc", timeout=3
    )
    assert wrong_event["details"] == (
        f"BMC at {emulator.url} rejected the credentials of user 'crashlab' (HTTP 401)"
    )
    assert hung_event["details"] == (
        f"no answer from BMC at {silent_bmc} within 3s (sending ComputerSystem.Reset (Nmi))"
    )
    log = server.log_path.read_text()
    for secret in (wrong_password, emulator.password, "hung-secret"):
        assert secret not in log
    assert _resets_logged(emulator, name) == 0
