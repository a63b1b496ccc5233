"""Eviction and prefetch policies. Imports nothing from moesim's other subpackages (by design)."""

from moesim.policies import eviction as _eviction  # noqa: F401  (registers the built-ins)
from moesim.policies.base import (
    NEVER,
    EvictionPolicy,
    ExpertCache,
    make_policy,
    policy_class,
    policy_names,
    register,
)

__all__ = ["NEVER", "EvictionPolicy", "ExpertCache", "make_policy", "policy_class", "policy_names", "register"]
