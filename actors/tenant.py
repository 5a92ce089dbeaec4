"""The tenant aggregate (pure): a tenant's tier-policy overrides and per-user quota adjustments.

Its commits live on ``<prefix>.<tenant>.tenant``. Session actors decide under the tenant's
*effective* policy (the base policy with the tenant's overrides merged in), which a
:class:`PolicyBook` keeps per tenant from this aggregate's states.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from actors import aggregate
from actors.events import (
    AdjustUserQuota,
    Commit,
    Decision,
    Event,
    GetSession,
    Rejection,
    SetTenantPolicy,
    TenantCommand,
    TenantPolicyChanged,
    UserQuotaAdjusted,
)
from actors.limits import NO_BOOSTS, Boosts
from actors.policy import Policy, PolicyError, policy_from_document
from actors.ports import AggregateKey


class TenantState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    tenant: str
    version: int = 0  # commits applied
    policy: Policy | None = None  # None: the base policy, never overridden
    overrides: dict[str, Any] = {}  # every override so far, merged
    user_boosts: dict[str, dict[str, tuple[float, float | None]]] = {}
    recent_commands: bytes = b""
    recent_digests: bytes = b""
    recent_refusals: dict[str, Rejection] = {}  # answers to recent refused commands


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, recursively for nested tables."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = merge(current, value)
        else:
            merged[key] = value
    return merged


def _invalid(field: str, expected: str, got: Any) -> Decision:
    return Decision(
        rejection=Rejection(
            "validation_error", f"{field}: expected {expected}, got {got!r}",
            {"field": field, "expected": expected, "got": str(got)},
        )
    )


def effective_policy(state: TenantState, base: Policy) -> Policy:
    return state.policy if state.policy is not None else base


def decide(state: TenantState, command: TenantCommand, now: float, base: Policy) -> Decision:
    """Decide a tenant command at ``now``; ``base`` is the packaged (or configured) policy."""
    if isinstance(command, GetSession):
        return Decision()
    if isinstance(command, SetTenantPolicy):
        if "version" in command.overrides:
            return _invalid("overrides.version", "no version (it is assigned on every change)",
                            command.overrides["version"])
        current = effective_policy(state, base)
        document = merge(msgspec.to_builtins(current), command.overrides)
        document["version"] = current.version + 1
        try:
            policy = policy_from_document(document)
        except PolicyError as exc:
            field = "overrides" + (f".{exc.path}" if exc.path else "")
            return Decision(
                rejection=Rejection(
                    "validation_error", f"{field}: {exc}",
                    {"field": field, "expected": "a valid tier policy (see actors/tiers.toml)"},
                )
            )
        return Decision(events=(TenantPolicyChanged(at=now, policy=policy, overrides=command.overrides),))
    if isinstance(command, AdjustUserQuota):
        if command.until is not None and command.until <= now:
            return _invalid("until", f"an instant after now ({now:.3f})", command.until)
        event = UserQuotaAdjusted(
            at=now, user_id=command.user_id, resource_type=command.resource_type.value,
            limit=command.limit, until=command.until,
        )
        return Decision(events=(event,))
    raise TypeError(f"not a tenant command: {command!r}")


def evolve(state: TenantState, event: Event) -> TenantState:
    replace = msgspec.structs.replace
    if isinstance(event, TenantPolicyChanged):
        return replace(state, policy=event.policy, overrides=merge(state.overrides, event.overrides))
    if isinstance(event, UserQuotaAdjusted):
        mine = {k: v for k, v in state.user_boosts.get(event.user_id, {}).items() if k != event.resource_type}
        if event.limit is not None:
            mine[event.resource_type] = (event.limit, event.until)
        boosts = {**state.user_boosts, event.user_id: mine}
        return replace(state, user_boosts=boosts)
    raise TypeError(f"not a tenant event: {event!r}")


def apply_commit(state: TenantState, commit: Commit) -> TenantState:
    return aggregate.apply_commit(evolve, state, commit)


class PolicyBook:
    """The effective policy and user adjustments of every tenant this process has seen.

    Fed with tenant states (from this process's tenant actors and from following the tenants'
    log); keeps, per tenant, the state with the highest version, so the order in which the two
    sources deliver does not matter.
    """

    def __init__(self, base: Policy) -> None:
        self.base = base
        self._tenants: dict[str, TenantState] = {}

    def observe(self, state: TenantState) -> None:
        known = self._tenants.get(state.tenant)
        if known is None or state.version > known.version:
            self._tenants[state.tenant] = state

    def state(self, tenant: str) -> TenantState:
        return self._tenants.get(tenant) or TenantState(tenant=tenant)

    def policy(self, tenant: str) -> Policy:
        known = self._tenants.get(tenant)
        return self.base if known is None or known.policy is None else known.policy

    def user_boosts(self, tenant: str, user_id: str) -> Boosts:
        known = self._tenants.get(tenant)
        if known is None:
            return NO_BOOSTS
        return known.user_boosts.get(user_id, NO_BOOSTS)


class TenantBehaviour(aggregate.Behaviour):
    """Binds the tenant aggregate's pure functions and the base policy for the actor host."""

    state_type = TenantState
    evolve = staticmethod(evolve)

    def __init__(self, base: Policy) -> None:
        self.base = base

    def initial_state(self, key: AggregateKey) -> TenantState:
        return TenantState(tenant=key.tenant)

    def decide(self, state: TenantState, command: TenantCommand, now: float) -> Decision:
        return decide(state, command, now, self.base)

