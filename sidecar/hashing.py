"""The argon2 parameters the sidecar and CLI hash keys with."""

from __future__ import annotations

from collections.abc import Mapping

import argon2

__all__ = ["hasher_from_env"]


def hasher_from_env(env: Mapping[str, str]) -> argon2.PasswordHasher:
    """The production argon2id profile, or the cheapest one when ``MCPGUARD_ARGON2_PROFILE=cheapest`` (tests)."""
    profile = env.get("MCPGUARD_ARGON2_PROFILE", "")
    if not profile:
        return argon2.PasswordHasher()
    if profile == "cheapest":
        return argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    raise ValueError("MCPGUARD_ARGON2_PROFILE accepts only 'cheapest' (for tests)")
