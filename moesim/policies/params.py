"""Parameters of policies and prefetchers, read from their constructors: listed by ``moesim
policies`` and checked (and converted to the default's type) before a class is built, so a wrong
name or a non-numeric value is one clear sentence instead of a Python ``TypeError``."""

from __future__ import annotations

import inspect
import math
from typing import Any

# set by the driver from the trace, never by a user
DRIVER_ARGS = frozenset({"self", "num_layers", "num_experts", "top_k"})


class ParamError(ValueError):
    """A parameter that the class does not take, or a value of the wrong kind."""


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The user-settable keyword parameters of ``cls``'s constructor, in declaration order; a
    constructor that forwards ``**kwargs`` also lists its base classes' parameters."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        forwards = False
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                forwards = forwards or p.kind == p.VAR_KEYWORD
            elif p.name not in DRIVER_ARGS:
                out.setdefault(p.name, p)
        if not forwards:
            break
    return out


def describe_defaults(cls: type) -> list[str]:
    """``["lam=0.1", ...]`` for listings and error messages."""
    return [f"{n}={p.default}" if p.default is not p.empty else n for n, p in parameters(cls).items()]


def _kind(p: inspect.Parameter) -> str:
    """"bool", "int", "float" or "" (anything), from the default, else from the annotation text."""
    d = p.default
    if isinstance(d, bool):
        return "bool"
    if isinstance(d, int):
        return "int"
    if isinstance(d, float):
        return "float"
    ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
    for kind in ("bool", "float", "int"):
        if kind in str(ann):
            return kind
    return ""


def _convert(what: str, key: str, value: Any, kind: str) -> Any:
    if kind == "" or value is None:
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ParamError(f"{what}: {key}={value!r} is not true or false")
    if isinstance(value, bool):
        raise ParamError(f"{what}: {key}={value!r} is not a number")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ParamError(f"{what}: {key}={value!r} is not an integer") from None
        if not isinstance(value, int):
            raise ParamError(f"{what}: {key}={value!r} is not an integer")
        return value
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)  # also "inf", "1e3"
        except ValueError:
            raise ParamError(f"{what}: {key}={value!r} is not a number") from None
    else:
        raise ParamError(f"{what}: {key}={value!r} is not a number")
    if math.isnan(number):  # NaN compares false with every bound, so no range check would catch it
        raise ParamError(f"{what}: {key}={value!r} is not a number (NaN)")
    return number


def check_params(cls: type, params: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """``params`` converted to the types of ``cls``'s defaults; :class:`ParamError` names an unknown
    key (listing the known ones) or a value of the wrong kind. ``what`` names the class in messages,
    e.g. "policy 'lrfu'"."""
    known = parameters(cls)
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key not in known:
            listed = ", ".join(describe_defaults(cls))
            raise ParamError(f"{what} has no parameter {key!r} "
                             + (f"(its parameters: {listed})" if listed else "(it takes no parameters)"))
        out[key] = _convert(what, key, value, _kind(known[key]))
    return out
