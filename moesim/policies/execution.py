"""Execution policies: which executor serves each routed expert that is not resident on the GPU
(docs/timing.md, "Hybrid execution").

The executors: ``copy`` (to a GPU slot, today's engine), ``cpu`` (computed on the host from its copy of
the weights), ``lowbit`` (HOBBIT's substitute: a smaller format copied into the slot) and ``pinned`` (a
GPU set outside the cache that no eviction touches). A request served from the cache is a ``gpu_hit``.

A policy is a small class, like the eviction and prefetch policies: it says which layers run on the CPU
outright (``cpu_layer``), which experts are pinned (``pinned``) and, for the misses of one layer,
which executor takes each (``choose``). ``choose`` may ask the simulator for the finish time of a
candidate plan (``LayerEstimate``): the policy decides, the simulator prices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moesim.errors import DataError, SettingError
from moesim.safe_write import read_json

EXECUTORS = ("gpu_hit", "copy", "cpu", "lowbit", "pinned")
# HOBBIT's threshold: an expert weighing under 0.2 of the layer's output contributes little, which is when
# HOBBIT substitutes a low-precision copy; in the real Mixtral trace (renormalised top-2) about a third of
# the second experts weigh less
HOBBIT_THRESHOLD = 0.2


@dataclass(frozen=True)
class Miss:
    """One expert wanted by a layer and not resident on the GPU."""

    expert: int
    tokens: int          # tokens of the step routed to it
    weight: float        # its mean routing weight over those tokens


# the simulator's price of a plan for the layer's misses (one executor name per miss, in order; None =
# left out): (each planned miss's result-ready time on the GPU, the layer's finish time)
LayerEstimate = Callable[[Sequence[str | None]], tuple[list[float], float]]


class ExecutionPolicy:
    """``copy``: every miss is copied to a GPU slot (the engine before hybrid execution)."""

    name = "copy"
    prices = False   # True: ``choose`` asks the simulator's estimate (the engine replays its schedule)

    def cpu_layer(self, layer: int) -> bool:
        """Whether every expert of ``layer`` runs on the CPU (it then has no GPU slots)."""
        return False

    def pinned(self, layer: int) -> frozenset[int]:
        """Experts of ``layer`` held on the GPU outside the cache."""
        return frozenset()

    def choose(self, layer: int, misses: Sequence[Miss], estimate: LayerEstimate) -> list[str]:
        """The executor of each miss: "copy", "cpu" or "lowbit"."""
        return ["copy"] * len(misses)

    def describe(self) -> str:
        return self.name


class NCpuMoe(ExecutionPolicy):
    """llama.cpp's ``--n-cpu-moe N``: the experts of layers 0..N-1 always run on the CPU."""

    def __init__(self, layers: int) -> None:
        if layers < 0:
            raise SettingError("execution", f"n-cpu-moe needs N >= 0, got {layers}")
        self.layers = layers
        self.name = f"n-cpu-moe={layers}"

    def cpu_layer(self, layer: int) -> bool:
        return layer < self.layers


class Pinned(ExecutionPolicy):
    """A pinned hot set (kTransformers' frequency profile): those experts live on the GPU for the whole
    run; every other miss is copied into the layer's remaining slots, or with ``rest="cpu"`` computed on
    the CPU (a static placement: nothing moves after loading, as with llama.cpp's ``-ot``)."""

    def __init__(self, experts: Sequence[tuple[int, int]], source: str = "", rest: str = "copy") -> None:
        if rest not in ("copy", "cpu"):
            raise SettingError("execution", f"a pinned set's other experts are copied or run on the CPU, not {rest!r}")
        self.by_layer: dict[int, frozenset[int]] = {}
        for layer, e in experts:
            self.by_layer[layer] = self.by_layer.get(layer, frozenset()) | {e}
        self.rest = rest
        self.name = (f"pinned={source}" if source else "pinned") + ("" if rest == "copy" else ", rest on the CPU")

    @classmethod
    def from_file(cls, path: str | Path) -> Pinned:
        raw = read_json(path, "a JSON list of [layer, expert] pairs")
        ok = isinstance(raw, list) and all(
            isinstance(p, list) and len(p) == 2 and all(type(x) is int and x >= 0 for x in p) for p in raw)
        if not ok:
            raise DataError(path, "not a JSON list of [layer, expert] pairs of non-negative integers")
        return cls([(p[0], p[1]) for p in raw], str(path))    # type: ignore[union-attr, index]

    def pinned(self, layer: int) -> frozenset[int]:
        return self.by_layer.get(layer, frozenset())

    def choose(self, layer: int, misses: Sequence[Miss], estimate: LayerEstimate) -> list[str]:
        return [self.rest] * len(misses)


class Fiddler(ExecutionPolicy):
    """Fiddler's rule, miss by miss in router order: the CPU when its result (the hidden state's hop
    to the host, the queue on the CPU, the expert, the hop back) is ready before the copy would land
    (the queue on the copy engine, the transfer)."""

    name = "fiddler"
    prices = True

    def choose(self, layer: int, misses: Sequence[Miss], estimate: LayerEstimate) -> list[str]:
        plan: list[str | None] = [None] * len(misses)
        for i in range(len(misses)):
            at = {}
            for kind in ("copy", "cpu"):
                plan[i] = kind
                at[kind] = estimate(plan)[0][i]
            plan[i] = "cpu" if at["cpu"] < at["copy"] else "copy"
        return [str(k) for k in plan]


class Hybrid(ExecutionPolicy):
    """A HybriMoE-style dynamic split of one layer's misses: the n misses with the fewest tokens go to
    the CPU (its time grows with tokens, a copy's does not), the rest are copied; n is the one whose
    simulated finish of the layer is earliest (ties: fewer on the CPU)."""

    name = "hybrid"
    prices = True

    def choose(self, layer: int, misses: Sequence[Miss], estimate: LayerEstimate) -> list[str]:
        order = sorted(range(len(misses)), key=lambda i: (misses[i].tokens, i))
        best: tuple[float, list[str]] | None = None
        for n in range(len(misses) + 1):
            plan = ["copy"] * len(misses)
            for i in order[:n]:
                plan[i] = "cpu"
            finish = estimate(plan)[1]
            if best is None or finish < best[0]:
                best = (finish, plan)
        return best[1] if best else []


class Hobbit(ExecutionPolicy):
    """HOBBIT's rule: a miss whose routing weight is below the threshold gets the low-bit copy."""

    def __init__(self, threshold: float = HOBBIT_THRESHOLD) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise SettingError("execution", f"hobbit's threshold is a routing weight in [0, 1], got {threshold}")
        self.threshold = threshold
        self.name = f"hobbit={threshold:g}"

    def choose(self, layer: int, misses: Sequence[Miss], estimate: LayerEstimate) -> list[str]:
        return ["lowbit" if m.weight < self.threshold else "copy" for m in misses]


SPECS = "copy | n-cpu-moe=N | fiddler | hybrid | hobbit[=THRESHOLD] | pinned=FILE"


def parse_execution(spec: str | ExecutionPolicy | None) -> ExecutionPolicy:
    """The ``--execution`` spelling as a policy object (CONTRACTS.md section 4)."""
    if isinstance(spec, ExecutionPolicy):
        return spec
    if spec is None or spec == "copy":
        return ExecutionPolicy()
    name, _, value = str(spec).partition("=")
    try:
        if name == "n-cpu-moe" and value:
            return NCpuMoe(int(value))
        if name == "hobbit":
            return Hobbit(float(value)) if value else Hobbit()
        if name == "pinned" and value:
            return Pinned.from_file(value)
    except ValueError:
        raise SettingError("execution", f"bad value in execution {spec!r} (known: {SPECS})") from None
    if name in ("fiddler", "hybrid") and not value:
        return Fiddler() if name == "fiddler" else Hybrid()
    raise SettingError("execution", f"unknown execution {spec!r} (known: {SPECS})")

