"""``moesim policies``: list eviction policies and prefetchers with their parameters."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list eviction policies and prefetchers",
                       description="List every eviction policy and prefetcher, its parameters (with "
                                   "defaults) and what it does.")
    p.set_defaults(func=run)


def _block(title: str, entries, name_w: int, param_w: int) -> list[str]:
    """One aligned row per entry; extra parameters go on continuation lines in their own column, so
    the description column stays straight and each description stays on one line."""
    lines = [title, f"  {'name':<{name_w}}  {'parameters':<{param_w}}  description"]
    for e in entries:
        params = e.params or ["-"]
        lines.append(f"  {e.name:<{name_w}}  {params[0]:<{param_w}}  {e.summary}".rstrip())
        lines.extend(f"  {'':<{name_w}}  {p}" for p in params[1:])
    return lines


def run(args: argparse.Namespace) -> int:
    from moesim.policies.catalog import eviction_policies, prefetchers

    policies, fetchers = eviction_policies(), prefetchers()
    both = policies + fetchers
    name_w = max(len(e.name) for e in both)
    param_w = max(len("parameters"), *(len(p) for e in both for p in e.params))
    lines = _block("eviction policies (--policy NAME, parameters with --param KEY=VALUE):", policies, name_w, param_w)
    lines.append("")
    lines += _block("prefetchers (--prefetch NAME, with a timing model; every one takes --prefetch-budget N and\n"
                    "--prefetch-distance D, other parameters with --prefetch-param KEY=VALUE):",
                    fetchers, name_w, param_w)
    print("\n".join(lines))
    return 0
