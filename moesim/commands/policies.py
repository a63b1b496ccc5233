"""``moesim policies``: list eviction policies and prefetchers with their parameters."""

from __future__ import annotations

import argparse
import inspect


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list eviction policies and prefetchers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.policies import policy_class, policy_names
    from moesim.policies.prefetch import _PREFETCHERS

    print("eviction policies (--policy NAME [--param KEY=VALUE]):")
    for name in policy_names():
        cls = policy_class(name)
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        sig = ", ".join(f"{p.name}={p.default}" for p in params)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:14s} {('(' + sig + ')') if sig else '':24s} {doc}")
    print("prefetchers (--prefetch NAME [--prefetch-budget N --prefetch-distance D]):")
    for name, cls in sorted(_PREFETCHERS.items()):
        print(f"  {name:14s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    return 0
