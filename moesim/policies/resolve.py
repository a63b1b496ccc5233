"""One resolver from what a user names -- a policy or prefetcher and its parameters -- to what runs:
the replay, the timing simulator and the cell runner all go through it, so a name or a parameter is
checked in one place and fails with the same :class:`~moesim.errors.SettingError` everywhere."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from moesim.errors import SettingError
from moesim.policies.base import EvictionPolicy, policy_class
from moesim.policies.compiled import ScorePolicy
from moesim.policies.params import ParamError, check_params
from moesim.policies.prefetch import _PREFETCHERS, Prefetcher, make_prefetcher

PolicySpec = str | Callable[[], EvictionPolicy] | ScorePolicy


def policy_name(policy: PolicySpec) -> str:
    """The name a result reports: the registered name, else the factory's ``name`` or ``__name__``."""
    if isinstance(policy, str):
        return policy
    return getattr(policy, "name", None) or getattr(policy, "__name__", "custom")


def eviction_factory(policy: PolicySpec, params: Mapping[str, Any] | None) -> Callable[[], EvictionPolicy]:
    """A zero-argument factory of configured policy objects. A registered name is looked up and its
    parameters are checked and converted (one instance is built, so a constructor's own checks run
    now); a factory is called with ``params`` as keywords, if any."""
    if not isinstance(policy, str):
        return policy if not params else (lambda: policy(**params))  # type: ignore[call-arg,operator]
    try:
        cls = policy_class(policy)
    except KeyError as exc:
        raise SettingError("policy", str(exc.args[0])) from None
    try:
        checked = check_params(cls, dict(params or {}), f"policy {policy!r}")
        cls(**checked)
    except ParamError as exc:
        raise SettingError("params", str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise SettingError("params", f"policy {policy!r}: {exc}") from None
    return lambda: cls(**checked)


def prefetcher(name: str, *, num_layers: int, num_experts: int, top_k: int,
               params: Mapping[str, Any] | None = None) -> Prefetcher:
    """A configured prefetcher for a model of this geometry; ``params`` holds ``budget`` and
    ``distance`` (every prefetcher's) and the prefetcher's own parameters."""
    try:
        return make_prefetcher(name, num_layers=num_layers, num_experts=num_experts, top_k=top_k, **dict(params or {}))
    except KeyError as exc:
        raise SettingError("prefetch", str(exc.args[0])) from None
    except ParamError as exc:
        raise SettingError("prefetch_params", str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise SettingError("prefetch_params", f"prefetcher {name!r}: {exc}") from None


def needs_predictions(name: str) -> bool:
    """Whether the prefetcher ``name`` reads a trace's recorded predictions (``pred{d}_experts``)."""
    cls = _PREFETCHERS.get(name)
    return bool(cls is not None and cls.needs_predictions)
