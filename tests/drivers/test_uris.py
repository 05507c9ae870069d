"""drivers/uris.py: the URIs and addresses a backend may be given, and how libvirt's are opened."""

from __future__ import annotations

import math
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from drivers.base import TRUSTED, BackendUnreachable, Driver, SettingsSource
from drivers.fake import FakeDriver
from drivers.ipmi import IPMIDriver
from drivers.libvirt import LibvirtDriver, LibvirtSettings
from drivers.redfish import RedfishDriver
from drivers.uris import check_host, check_http_url, parse_libvirt_uri

pytestmark = pytest.mark.fast

API = SettingsSource(api=True, test_drivers=False)
API_WITH_TEST_DRIVERS = SettingsSource(api=True, test_drivers=True)
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"
TLS_KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n"

ACCEPTED = {
    "qemu:///system": "qemu:///system",
    "qemu:///session": "qemu:///session",
    "qemu+ssh://kvm1.example.com/system": "qemu+ssh://kvm1.example.com/system",
    "qemu+ssh://root@10.0.0.7:2222/system": "qemu+ssh://root@10.0.0.7:2222/system",
    "qemu+tls://kvm1.example.com/system": "qemu+tls://kvm1.example.com/system",
    "qemu+tls://[fd00::7]:16514/system": "qemu+tls://[fd00::7]:16514/system",
}
HOSTILE = [
    "qemu+ext:///system?command=/tmp/script",  # runs a program
    "test:///etc/hostname",  # reads a file
    "qemu+unix:///system?socket=/tmp/any.sock",  # any socket
    "qemu:///system?socket=/tmp/any.sock",
    "qemu+ssh://host/system?command=/tmp/script",
    "qemu+ssh://host/system?keyfile=/etc/shadow",
    "qemu+ssh://host/system?no_verify=1",
    "qemu+tls://host/system?pkipath=/root",
    "qemu+tcp://host/system",
    "qemu+libssh://host/system",
    "qemu+libssh2://host/system",
    "qemu+ssh:///system",  # no host
    "qemu+tls:///system",
    "qemu://host/system",  # implicit transport
    "qemu+ssh://host/session",
    "qemu+ssh://host/system/../x",
    "qemu+ssh://-oProxyCommand=touch%20x/system",
    "qemu+ssh://-oProxyCommand=x@host/system",
    "qemu+ssh://user:password@host/system",
    "qemu+tls://user@host/system",
    "qemu+ssh://host:0/system",
    "qemu+ssh://host:70000/system",
    "qemu:///system#fragment",
    "qemu:///system?",
    "qemu:///sys%74em",
    "qemu:///sys\ntem",
    " qemu:///system",
    "xen:///system",
    "lxc:///system",
    "",
]


@pytest.mark.parametrize(("uri", "canonical"), ACCEPTED.items())
def test_allowed_libvirt_uris_parse_to_their_canonical_form(uri: str, canonical: str) -> None:
    assert str(parse_libvirt_uri(uri, allow_test=False)) == canonical


@pytest.mark.parametrize("uri", HOSTILE)
def test_every_other_libvirt_uri_is_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="must|needs|takes|invalid|reaches"):
        parse_libvirt_uri(uri, allow_test=True)


def test_the_test_hypervisor_only_where_test_backends_are_allowed() -> None:
    assert str(parse_libvirt_uri("test:///default", allow_test=True)) == "test:///default"
    with pytest.raises(ValueError, match="test_drivers"):
        parse_libvirt_uri("test:///default", allow_test=False)


@pytest.mark.parametrize("host", ["10.0.0.5", "fd00::5", "bmc-1.example.com", "localhost"])
def test_hosts_are_dns_names_or_ip_literals(host: str) -> None:
    assert check_host(host) == host


@pytest.mark.parametrize(
    "host",
    ["", "/var/run/bmc.sock", "file:///etc/passwd", "unix:/tmp/s", "-oProxy", "a b", "x" * 64],
)
def test_paths_sockets_and_options_are_not_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="DNS name or an IP address"):
        check_host(host)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://10.0.0.5", "https://10.0.0.5"),
        ("http://bmc.example.com:8000/redfish/v1/", "http://bmc.example.com:8000"),
    ],
)
def test_redfish_addresses_are_root_urls(url: str, base: str) -> None:
    assert check_http_url(url, paths=("", "/", "/redfish/v1", "/redfish/v1/")) == base


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "http+unix://%2Ftmp%2Fbmc.sock/",
        "https://bmc/?next=file:///etc/passwd",
        "https://bmc/#x",
        "https://admin:pw@bmc/",
        "https://bmc/other",
        "https://-bmc/",
        "https:///redfish/v1",
    ],
)
def test_other_redfish_addresses_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check_http_url(url)


def _parse(driver: type[Driver], raw: dict[str, Any], source: SettingsSource = API) -> Any:
    return driver.parse_settings(raw, source)


@pytest.mark.parametrize(
    ("driver", "raw"),
    [
        (IPMIDriver, {"address": "/var/run/bmc.sock", "username": "u", "password": "p"}),
        (IPMIDriver, {"address": "10.0.0.1?x", "username": "u", "password": "p"}),
        (RedfishDriver, {"address": "file:///etc/passwd", "username": "u", "password": "p"}),
        (LibvirtDriver, {"uri": HOSTILE[0], "domain": "d"}),
    ],
)
def test_settings_refuse_files_and_sockets_from_any_source(
    driver: type[Driver], raw: dict[str, Any]
) -> None:
    for source in (TRUSTED, API_WITH_TEST_DRIVERS):
        with pytest.raises(ValidationError):
            _parse(driver, raw, source)


def test_file_paths_are_config_only() -> None:
    assert _parse(FakeDriver, {"nmi_log": "/tmp/log"}, TRUSTED).nmi_log == Path("/tmp/log")
    with pytest.raises(ValidationError, match="nmi_log can be set only in the config file"):
        _parse(FakeDriver, {"nmi_log": "/tmp/log"}, API_WITH_TEST_DRIVERS)
    bundle = {"address": "https://bmc", "username": "u", "password": "p", "ca_bundle": "/x"}
    with pytest.raises(ValidationError, match="ca_bundle can be set only in the config file"):
        _parse(RedfishDriver, bundle, API)


def test_test_backends_through_the_api_only_where_enabled() -> None:
    with pytest.raises(ValidationError, match="test_drivers is not enabled"):
        _parse(FakeDriver, {}, API)
    assert _parse(FakeDriver, {}, API_WITH_TEST_DRIVERS).power_state == "running"
    with pytest.raises(ValidationError, match="test_drivers"):
        _parse(LibvirtDriver, {"uri": "test:///default", "domain": "test"}, API)
    _parse(LibvirtDriver, {"uri": "test:///default", "domain": "test"}, API_WITH_TEST_DRIVERS)


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf, 61, -1])
def test_numbers_are_finite_and_bounded(number: float) -> None:
    with pytest.raises(ValidationError):
        _parse(FakeDriver, {"delay_seconds": number}, TRUSTED)
    bmc = {"address": "10.0.0.1", "username": "u", "password": "p", "timeout": number}
    with pytest.raises(ValidationError):
        _parse(IPMIDriver, bmc, TRUSTED)
    with pytest.raises(ValidationError):
        _parse(RedfishDriver, bmc | {"address": "https://10.0.0.1"}, TRUSTED)


@pytest.mark.parametrize(
    "raw",
    [
        {"uri": "qemu:///system", "ssh_private_key": KEY},
        {"uri": "qemu+ssh://h/system", "tls_client_key": TLS_KEY},
        {"uri": "qemu+tls://h/system", "tls_client_key": TLS_KEY, "tls_ca_cert": CERT},
        {"uri": "qemu+ssh://h/system", "ssh_private_key": "/root/.ssh/id_rsa"},
    ],
)
def test_credentials_must_fit_the_transport(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _parse(LibvirtDriver, raw | {"domain": "d"})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_qemu_ssh_gets_keyfile_and_no_tty_from_crashlab(tmp_path: Path) -> None:
    raw = {"uri": "qemu+ssh://root@kvm1/system", "domain": "d", "ssh_private_key": KEY}
    settings = _parse(LibvirtDriver, raw)
    assert isinstance(settings, LibvirtSettings)
    parts = urlsplit(settings.connection_uri(tmp_path))
    assert (parts.scheme, parts.netloc, parts.path) == ("qemu+ssh", "root@kvm1", "/system")
    parameters = parse_qs(parts.query, strict_parsing=True)
    assert parameters == {"keyfile": [str(tmp_path / "id")], "no_tty": ["1"]}
    assert (tmp_path / "id").read_text() == KEY + "\n"
    assert _mode(tmp_path / "id") == 0o600
    # Without a key, ssh's own keys are used, still in batch mode.
    settings = _parse(LibvirtDriver, {"uri": "qemu+ssh://kvm2/system", "domain": "d"})
    assert settings.connection_uri(tmp_path) == "qemu+ssh://kvm2/system?no_tty=1"


def test_qemu_tls_gets_a_pkipath_holding_the_three_files(tmp_path: Path) -> None:
    raw = {
        "uri": "qemu+tls://kvm1:16514/system",
        "domain": "d",
        "tls_ca_cert": CERT,
        "tls_client_cert": CERT,
        "tls_client_key": TLS_KEY,
    }
    uri = _parse(LibvirtDriver, raw).connection_uri(tmp_path)
    assert parse_qs(urlsplit(uri).query) == {"pkipath": [str(tmp_path)]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cacert.pem",
        "clientcert.pem",
        "clientkey.pem",
    ]
    assert (tmp_path / "clientkey.pem").read_text() == TLS_KEY
    assert all(_mode(p) == 0o600 for p in tmp_path.iterdir())


def test_libvirt_reads_the_credentials_crashlab_hands_it() -> None:
    """libvirt takes pkipath: it reads the certificates from crashlab's private directory."""
    raw = {
        "uri": "qemu+tls://127.0.0.1:1/system",
        "domain": "d",
        "tls_ca_cert": CERT,
        "tls_client_cert": CERT,
        "tls_client_key": TLS_KEY,
    }
    driver = LibvirtDriver("s", _parse(LibvirtDriver, raw))
    read_from = r"(/\S+/crashlab-libvirt-[^/]+)/(cacert|clientcert|clientkey)\.pem"
    with pytest.raises(BackendUnreachable, match=read_from) as error:
        driver.get_power_state()
    assert "BEGIN" not in str(error.value)
    match = re.search(read_from, str(error.value))
    assert match is not None and not Path(match[1]).exists(), "the private directory is removed"
