"""The README's support matrix is the one generated from the drivers' declarations."""

from __future__ import annotations

import re

import pytest

from drivers import all_driver_classes
from drivers.base import Driver
from drivers.matrix import support_matrix_markdown
from tests.live import REPO

pytestmark = pytest.mark.fast


def test_readme_matrix_is_generated() -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(
        r"<!-- support-matrix:begin -->\n(.*?)\n<!-- support-matrix:end -->", readme, re.S
    )
    assert block is not None
    assert block.group(1) == support_matrix_markdown()


def test_nmi_capability_matches_an_overridden_trigger() -> None:
    # A driver declares "nmi" exactly when it overrides the base method.
    for cls in all_driver_classes():
        overrides = cls.trigger_crash_dump is not Driver.trigger_crash_dump
        assert ("nmi" in cls.capabilities) == overrides, cls.name


@pytest.mark.parametrize(
    ("capability", "method"),
    [("guest_agent", "read_guest_files"), ("memory_dump", "capture_memory_dump")],
)
def test_declared_capabilities_match_overridden_methods(capability: str, method: str) -> None:
    for cls in all_driver_classes():
        overrides = getattr(cls, method) is not getattr(Driver, method)
        assert (capability in cls.capabilities) == overrides, cls.name
