"""The root of the test suite: the shared fixtures' plugin.

The fast tier (``pytest -m fast``) is the modules marked ``pytestmark = pytest.mark.fast``:
tests/app's in-process tests, and the pure functions elsewhere; no child process, no peer.
"""

from __future__ import annotations

pytest_plugins = ["tests.fixtures"]
