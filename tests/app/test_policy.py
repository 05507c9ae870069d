"""app/policy.py: Nova's default rules, and a policy file that overrides them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app import policy as rules
from app.exceptions import PolicyNotAuthorized
from app.policy import Credentials, PolicyEnforcer
from tests.app.cloud import AppCloud, assert_fault

pytestmark = pytest.mark.fast

TARGET = {"project_id": "p1", "user_id": "u1"}
ADMIN = Credentials("a", "admin", "admin-project", "admin", ("admin", "member", "reader"))
MEMBER = Credentials("u1", "alice", "p1", "alice", ("member", "reader"))
READER = Credentials("u2", "carol", "p1", "alice", ("reader",))
STRANGER = Credentials("u3", "bob", "p2", "bob", ("member", "reader"))


@pytest.mark.parametrize(
    ("rule", "creds", "allowed"),
    [
        (rules.TRIGGER_CRASH_DUMP, MEMBER, True),
        (rules.TRIGGER_CRASH_DUMP, ADMIN, True),
        (rules.TRIGGER_CRASH_DUMP, READER, False),
        (rules.TRIGGER_CRASH_DUMP, STRANGER, False),
        (rules.SERVERS_SHOW, READER, True),
        (rules.SERVERS_INDEX_ALL_TENANTS, MEMBER, False),
        (rules.RESET_STATE, MEMBER, False),
        (rules.RESET_STATE, ADMIN, True),
        (rules.UNLOCK_OVERRIDE, MEMBER, False),
        (rules.BYPASS_NMI_GUARD, MEMBER, False),
        (rules.BYPASS_NMI_GUARD, ADMIN, True),
    ],
)
def test_default_rules(rule: str, creds: Credentials, allowed: bool) -> None:
    assert PolicyEnforcer().allowed(rule, TARGET, creds) is allowed


def test_a_refusal_names_the_rule() -> None:
    with pytest.raises(PolicyNotAuthorized) as refused:
        PolicyEnforcer().authorize(rules.RESET_STATE, TARGET, MEMBER)
    assert refused.value.message == (
        "Policy doesn't allow os_compute_api:os-admin-actions:reset_state to be performed."
    )


def test_a_policy_file_overrides_a_default(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(f'"{rules.TRIGGER_CRASH_DUMP}": "rule:context_is_admin"\n')
    enforcer = PolicyEnforcer(policy_file)
    assert not enforcer.allowed(rules.TRIGGER_CRASH_DUMP, TARGET, MEMBER)
    assert enforcer.allowed(rules.TRIGGER_CRASH_DUMP, TARGET, ADMIN)
    assert enforcer.allowed(rules.LOCK, TARGET, MEMBER)  # the other defaults stay


def test_the_app_enforces_its_policy_file(
    tmp_path: Path, start_cloud: Callable[..., AppCloud]
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(f'"{rules.SERVERS_INDEX}": "rule:context_is_admin"\n')
    cloud = start_cloud(policy_file=str(policy_file))
    assert_fault(
        cloud.get("alice", "/servers"),
        403,
        "forbidden",
        "Policy doesn't allow os_compute_api:servers:index to be performed.",
    )
    assert cloud.get("admin", "/servers").status_code == 200
    assert cloud.trigger("alice", "alice-active").status_code == 202
