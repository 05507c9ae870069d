"""Fixtures for the scenario layer: guest images and real libvirt guests.

Images are built once per session into the normal cache (a cache hit after
the first run). Every guest is a ``Guest`` context manager, so it is destroyed,
undefined and deleted even when a test fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest_image import GuestImage, ImageVariant, build_image


@pytest.fixture(scope="session")
def images() -> dict[ImageVariant, GuestImage]:
    return {variant: build_image(variant) for variant in ImageVariant}


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    try:
        conn = libvirt.open(DEFAULT_LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        pytest.fail(
            f"libvirtd is not reachable at {DEFAULT_LIBVIRT_URI} "
            f"(start virtlogd -d; libvirtd -d): {exc}"
        )
    yield conn
    conn.close()


def processes_mentioning(path: Path) -> list[int]:
    """PIDs whose command line names ``path`` (read whole from /proc, never truncated)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended meanwhile
    return pids
