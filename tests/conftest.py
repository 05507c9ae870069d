"""The root of the test suite: the shared fixtures' plugin, and the fast tier's marker."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures"]

# The fast tier (``pytest -m fast``): tests/app, and the modules elsewhere that test
# pure functions in-process, with no child process and no peer.
FAST_MODULES = frozenset(
    {
        "tests/api/test_redaction.py",
        "tests/drivers/test_support_matrix.py",
        "tests/drivers/test_uris.py",
        "tests/scenarios/test_verdict.py",
        "tests/scenarios/test_vmcore.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.relative_to(config.rootpath).as_posix()
        if module.startswith("tests/app/") or module in FAST_MODULES:
            item.add_marker(pytest.mark.fast)
