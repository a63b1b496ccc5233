"""What ``moesim policies`` lists: every registered eviction policy and prefetcher with its
parameters and a one-sentence description."""

from __future__ import annotations

import re
from dataclasses import dataclass

from moesim.policies.base import policy_class, policy_names
from moesim.policies.params import describe_defaults
from moesim.policies.prefetch import _PREFETCHERS, Prefetcher, prefetcher_names

# parameters every prefetcher takes through their own flags (--prefetch-budget, --prefetch-distance)
COMMON_PREFETCH_PARAMS = frozenset(p.split("=")[0] for p in describe_defaults(Prefetcher))


@dataclass(frozen=True)
class Entry:
    name: str
    params: list[str]
    summary: str


def summary_of(cls: type) -> str:
    """The class's ``summary``, else the first sentence of its docstring, as plain text on one line
    (reST ``literals`` unmarked, whitespace collapsed); "" when there is neither."""
    text = getattr(cls, "summary", "") or ""
    if not text:
        doc = " ".join((cls.__doc__ or "").split())
        # a sentence ends at ". " followed by a capital letter (so "e.g. x" or "Lee et al., 2001" stay whole)
        match = re.search(r"(?<=[.!?])\s+(?=[A-Z(])", doc)
        text = doc[:match.start()] if match else doc
    return " ".join(re.sub(r"``(.+?)``", r"\1", text).split())


def eviction_policies() -> list[Entry]:
    out = []
    for name in policy_names():
        cls = policy_class(name)
        out.append(Entry(name, describe_defaults(cls), summary_of(cls)))
    return out


def prefetchers() -> list[Entry]:
    out = []
    for name in prefetcher_names():
        cls = _PREFETCHERS[name]
        own = [p for p in describe_defaults(cls) if p.split("=")[0] not in COMMON_PREFETCH_PARAMS]
        out.append(Entry(name, own, summary_of(cls)))
    return out
