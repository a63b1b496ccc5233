"""A trace's metadata as readable lines (``moesim info``, the HTML report): nested dictionaries
become indented ``key: value`` lines, lists become comma-separated text, byte counts read in MB/GB."""

from __future__ import annotations

from typing import Any

FIRST = ("kind", "format", "source")  # provenance reads best starting with what made the trace
MAX_LIST_ITEMS = 12  # longer lists (e.g. a recording's prompts) show their start and a count


def human_bytes(n: float) -> str:
    """``66748416`` -> "66.7 MB"; decimal units (the GB/s of PCIe and the cost model)."""
    n = float(n)
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def bytes_text(n: int) -> str:
    """"66,748,416 B (66.7 MB)"; 0 reads as not recorded."""
    return f"{n:,} B ({human_bytes(n)})" if n else "0 (not recorded)"


def value_text(value: Any, key: str = "") -> str:
    if key == "logged_layers" and value is None:
        return "all"
    if key.endswith("bytes") and isinstance(value, int) and not isinstance(value, bool):
        return bytes_text(value)
    if isinstance(value, list | tuple):
        items = [value_text(v) for v in value[:MAX_LIST_ITEMS]]
        more = f", ... ({len(value)} in all)" if len(value) > MAX_LIST_ITEMS else ""
        return (", ".join(items) + more) if items else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k} {value_text(v)}" for k, v in value.items()) or "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def nested_lines(d: dict[str, Any], indent: int = 0) -> list[tuple[int, str, str]]:
    """(depth, label, text) per entry; a dictionary value becomes a heading with its entries one
    level deeper. Labels are the keys with underscores as spaces."""
    out: list[tuple[int, str, str]] = []
    first = [k for k in FIRST if k in d]
    for key in [*first, *(k for k in d if k not in first)]:
        value = d[key]
        label = str(key).replace("_", " ")
        # a small all-numbers dictionary (min/median/max) reads well on one line; others nest
        inline = all(isinstance(v, int | float) for v in value.values()) and len(value) <= 4 if isinstance(value, dict) else True
        if not inline:
            out.append((indent, label, ""))
            out.extend(nested_lines(value, indent + 1))
        else:
            out.append((indent, label, value_text(value, str(key))))
    return out


def text_block(d: dict[str, Any], indent: int = 2) -> list[str]:
    """Plain-text lines with the values of each level aligned."""
    rows = nested_lines(d)
    width = max((len(label) + depth * 2 for depth, label, _ in rows), default=0)
    return [" " * indent + (" " * (2 * depth) + label).ljust(width) + ("  " + text if text else "")
            for depth, label, text in rows]
