"""Compute API microversions, parsed as Nova's api_version_request does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.exceptions import InvalidVersion, VersionNotSupported

_FORMAT = re.compile(r"^([1-9]\d*)\.([1-9]\d*|0)$")


@dataclass(frozen=True, order=True)
class APIVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> APIVersion:
        match = _FORMAT.match(text)
        if match is None:
            raise InvalidVersion(text)
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


MIN_VERSION = APIVersion(2, 1)
# The highest microversion crashlab implements completely.
MAX_VERSION = APIVersion(2, 17)
TRIGGER_CRASH_DUMP_VERSION = APIVersion(2, 17)
LOCKED_FIELD_VERSION = APIVersion(2, 9)
HOST_STATUS_VERSION = APIVersion(2, 16)
EXTENDED_ATTRIBUTES_VERSION = APIVersion(2, 3)


def requested_version(headers: dict[str, str]) -> APIVersion:
    """The version a request asks for; the default is the minimum, as in Nova.

    ``OpenStack-API-Version: compute X.Y`` wins over the legacy
    ``X-OpenStack-Nova-API-Version: X.Y``; ``latest`` means the maximum.
    """
    text = _from_new_header(headers.get("openstack-api-version"))
    if text is None:
        text = headers.get("x-openstack-nova-api-version")
    if text is None:
        return MIN_VERSION
    text = text.strip()
    if text.lower() == "latest":
        return MAX_VERSION
    version = APIVersion.parse(text)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise VersionNotSupported(text, str(MIN_VERSION), str(MAX_VERSION))
    return version


def _from_new_header(value: str | None) -> str | None:
    if not value:
        return None
    for item in value.split(","):
        service, _, version = item.strip().partition(" ")
        if service.lower() == "compute":
            return version.strip()
    return None
