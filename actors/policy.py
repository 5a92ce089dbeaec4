"""Tier policies: configuration, not code.

The packaged defaults live in ``tiers.toml`` beside this module; :func:`load_policy` parses a
TOML document with msgspec, so a wrong field gets an error naming its path.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class TierPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one tier grants: session lifetime limits and scheduling priority."""

    idle_timeout: Seconds
    max_age: Seconds
    max_sessions_per_user: Annotated[int, msgspec.Meta(ge=1)] = 10
    priority: int = 0


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A versioned set of tier policies. Every session records the version it was created under."""

    version: Annotated[int, msgspec.Meta(ge=1)]
    tiers: dict[str, TierPolicy]

    def tier(self, name: str) -> TierPolicy | None:
        return self.tiers.get(name)


class PolicyError(ValueError):
    """A policy document is malformed; the message names the offending path."""


def load_policy(text: str | bytes) -> Policy:
    """Parse a TOML policy document. Raises :class:`PolicyError` naming the bad field."""
    try:
        policy = msgspec.toml.decode(text, type=Policy)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"invalid tier policy: {exc}") from None
    except msgspec.DecodeError as exc:
        raise PolicyError(f"tier policy is not valid TOML: {exc}") from None
    if not policy.tiers:
        raise PolicyError("invalid tier policy: at least one tier is required - at `$.tiers`")
    return policy


def default_policy() -> Policy:
    """The packaged default policy (free, basic, pro, enterprise)."""
    return load_policy(resources.files(__package__).joinpath("tiers.toml").read_bytes())
