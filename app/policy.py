"""Nova's policy rules, enforced with oslo.policy, overridable by a policy.yaml.

Rule names and defaults follow Nova at HEAD (Nova's policy modules), with
enforce_new_defaults on, as Nova has had since 27.0.0. crashlab's extension
has rules of its own, named ``crashlab:...``; each option of its trigger has
its own rule, checked only when the option is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oslo_config import cfg
from oslo_policy import policy

from app.exceptions import PolicyNotAuthorized

ADMIN = "rule:context_is_admin"
PROJECT_MEMBER_OR_ADMIN = "rule:project_member_or_admin"
PROJECT_READER_OR_ADMIN = "rule:project_reader_or_admin"

TRIGGER_CRASH_DUMP = "os_compute_api:servers:trigger_crash_dump"
SERVERS_INDEX = "os_compute_api:servers:index"
SERVERS_DETAIL = "os_compute_api:servers:detail"
SERVERS_SHOW = "os_compute_api:servers:show"
SERVERS_INDEX_ALL_TENANTS = "os_compute_api:servers:index:get_all_tenants"
SERVERS_DETAIL_ALL_TENANTS = "os_compute_api:servers:detail:get_all_tenants"
SERVERS_SHOW_HOST_STATUS = "os_compute_api:servers:show:host_status"
EXTENDED_ATTRIBUTES = "os_compute_api:os-extended-server-attributes"
LOCK = "os_compute_api:os-lock-server:lock"
UNLOCK = "os_compute_api:os-lock-server:unlock"
UNLOCK_OVERRIDE = "os_compute_api:os-lock-server:unlock:unlock_override"
RESET_STATE = "os_compute_api:os-admin-actions:reset_state"
ACTIONS_LIST = "os_compute_api:os-instance-actions:list"
ACTIONS_SHOW = "os_compute_api:os-instance-actions:show"
ACTIONS_EVENTS = "os_compute_api:os-instance-actions:events"
# Nova's since 2.84; crashlab's extension shows details to those who fail it redacted.
ACTIONS_EVENTS_DETAILS = "os_compute_api:os-instance-actions:events:details"
# crashlab's own extension.
MANAGE_SERVERS = "crashlab:servers:manage"
EXTENSION_TRIGGER_CRASH_DUMP = "crashlab:servers:trigger_crash_dump"
# The crash dumps that followed each NMI, and their vmcores.
CRASH_DUMPS_LIST = "os_compute_api:crashlab:crash_dumps:list"
CRASH_DUMPS_SHOW = "os_compute_api:crashlab:crash_dumps:show"
CRASH_DUMPS_DOWNLOAD = "os_compute_api:crashlab:crash_dumps:download"
# The extension trigger's options: "ignore_nmi_guard": true.
CRASH_READINESS_SHOW = "os_compute_api:crashlab:crash_readiness:show"
REQUIRE_ARMED = "os_compute_api:crashlab:trigger_crash_dump:require_armed"
CAPTURE_MEMORY_DUMP = "os_compute_api:crashlab:capture_memory_dump"
# The private key of a server's ssh dump target (app/collector.py).
DUMP_TARGET_KEY = "os_compute_api:crashlab:dump_target_key:show"

BYPASS_NMI_GUARD = "crashlab:nmi_guard:bypass"

_BASE_RULES = [
    policy.RuleDefault("context_is_admin", "role:admin"),
    policy.RuleDefault("admin_api", "is_admin:True"),
    policy.RuleDefault("project_member_api", "role:member and project_id:%(project_id)s"),
    policy.RuleDefault("project_reader_api", "role:reader and project_id:%(project_id)s"),
    policy.RuleDefault(
        "project_member_or_admin", "rule:project_member_api or rule:context_is_admin"
    ),
    policy.RuleDefault(
        "project_reader_or_admin", "rule:project_reader_api or rule:context_is_admin"
    ),
]

_API_RULES = {
    TRIGGER_CRASH_DUMP: PROJECT_MEMBER_OR_ADMIN,
    SERVERS_INDEX: PROJECT_READER_OR_ADMIN,
    SERVERS_DETAIL: PROJECT_READER_OR_ADMIN,
    SERVERS_SHOW: PROJECT_READER_OR_ADMIN,
    SERVERS_INDEX_ALL_TENANTS: ADMIN,
    SERVERS_DETAIL_ALL_TENANTS: ADMIN,
    SERVERS_SHOW_HOST_STATUS: ADMIN,
    EXTENDED_ATTRIBUTES: ADMIN,
    LOCK: PROJECT_MEMBER_OR_ADMIN,
    UNLOCK: PROJECT_MEMBER_OR_ADMIN,
    UNLOCK_OVERRIDE: ADMIN,
    RESET_STATE: ADMIN,
    ACTIONS_LIST: PROJECT_READER_OR_ADMIN,
    ACTIONS_SHOW: PROJECT_READER_OR_ADMIN,
    ACTIONS_EVENTS: ADMIN,
    ACTIONS_EVENTS_DETAILS: ADMIN,
    MANAGE_SERVERS: ADMIN,
    EXTENSION_TRIGGER_CRASH_DUMP: PROJECT_MEMBER_OR_ADMIN,
    BYPASS_NMI_GUARD: ADMIN,
    CRASH_DUMPS_LIST: PROJECT_READER_OR_ADMIN,
    CRASH_DUMPS_SHOW: PROJECT_READER_OR_ADMIN,
    CRASH_DUMPS_DOWNLOAD: PROJECT_READER_OR_ADMIN,
    CRASH_READINESS_SHOW: PROJECT_READER_OR_ADMIN,
    REQUIRE_ARMED: PROJECT_MEMBER_OR_ADMIN,
    CAPTURE_MEMORY_DUMP: ADMIN,
    DUMP_TARGET_KEY: ADMIN,
}


@dataclass(frozen=True)
class Credentials:
    """Who is asking: what a Keystone token says about its user."""

    user_id: str
    user_name: str
    project_id: str
    project_name: str
    roles: tuple[str, ...]

    def as_policy_creds(self, is_admin: bool) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "project_id": self.project_id,
            "roles": list(self.roles),
            "is_admin": is_admin,
        }


class PolicyEnforcer:
    """Answers "may these credentials do this to that target?"."""

    def __init__(self, policy_file: Path | None = None) -> None:
        conf = cfg.ConfigOpts()
        conf([], project="crashlab", default_config_files=[], default_config_dirs=[])
        # No policy file means Nova's defaults; a name that cannot be found
        # would silently mean the same, so it is checked by the caller.
        self._enforcer = policy.Enforcer(
            conf, policy_file=str(policy_file) if policy_file else "/nonexistent/policy.yaml"
        )
        conf.set_override("policy_dirs", [], group="oslo_policy")
        conf.set_override("enforce_new_defaults", True, group="oslo_policy")
        self._enforcer.register_defaults(_BASE_RULES)
        self._enforcer.register_defaults(
            [policy.RuleDefault(name, check) for name, check in _API_RULES.items()]
        )
        self._enforcer.load_rules()

    def is_admin(self, creds: Credentials) -> bool:
        """Nova's context.is_admin: the context_is_admin rule."""
        return self._check("context_is_admin", {}, creds, is_admin=False)

    def allowed(self, rule: str, target: dict[str, Any], creds: Credentials) -> bool:
        return self._check(rule, target, creds, is_admin=self.is_admin(creds))

    def authorize(self, rule: str, target: dict[str, Any], creds: Credentials) -> None:
        if not self.allowed(rule, target, creds):
            raise PolicyNotAuthorized(rule)

    def _check(
        self, rule: str, target: dict[str, Any], creds: Credentials, *, is_admin: bool
    ) -> bool:
        return bool(
            self._enforcer.authorize(rule, target, creds.as_policy_creds(is_admin), do_raise=False)
        )
