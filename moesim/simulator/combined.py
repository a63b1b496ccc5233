"""One result for a replay with a timing model in play: the keys of ``simulate --json`` and of a sweep
table's row.

``requests``, ``hits``, ``misses`` and ``hit_rate`` always mean the exact demand replay (docs/semantics.md).
The timing run's own cache counts differ when a prefetcher puts experts in the cache ahead of demand or
when batch / prefill steps request the union of several tokens' experts; they sit beside the replay's
as ``timing_requests``, ``timing_hits``, ``timing_misses``, ``timing_hit_rate``.
"""

from __future__ import annotations

from typing import Any

CACHE_KEYS = ("requests", "hits", "misses", "hit_rate")
TIMING_PREFIX = "timing_"


def replay_with_timing(replay: dict[str, Any], timing: dict[str, Any] | None) -> dict[str, Any]:
    """``replay`` (``ReplayResult.to_dict()``) merged with ``timing`` (``TimingResult.to_dict()``):
    the timing run's cache counts renamed ``timing_*``, its echo of the inputs dropped, and the
    prefetch metrics dropped when no prefetcher ran (they would read 0.0, not "not applicable")."""
    out = dict(replay)
    if timing is None:
        return out
    t = dict(timing)
    for key in ("policy", "cache_size"):
        t.pop(key, None)
    if t.get("prefetch", "none") == "none":
        t.pop("prefetch_precision", None)
        t.pop("prefetch_recall", None)
    for key in CACHE_KEYS:
        t[TIMING_PREFIX + key] = t.pop(key)
    out.update(t)
    return out
