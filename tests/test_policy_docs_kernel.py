"""The worked built-in policy of docs/policies.md ("Add a built-in policy", MRU), loaded from the doc's own
code block, against a brute-force MRU written here: compiled and class paths, both scopes and semantics."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies import base
from moesim.simulator.policy_kernels import registry
from moesim.simulator.replay import simulate
from tests.helpers import write_trace

DOC = Path(__file__).resolve().parents[1] / "docs" / "policies.md"


@pytest.fixture(scope="module")
def doc_mru(tmp_path_factory):
    block = re.search(r"### Add a built-in policy.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    path = tmp_path_factory.mktemp("doc") / "doc_mru.py"
    path.write_text(block)  # a file, so that numba can cache the kernel
    spec = importlib.util.spec_from_file_location("doc_mru", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["doc_mru"] = module
    spec.loader.exec_module(module)
    yield module
    base._REGISTRY.pop("mru", None)
    registry.KERNELS.pop("mru", None)
    sys.modules.pop("doc_mru", None)


def brute_mru(rows: list[list[int]], layers: int, size: int, scope: str, semantics: str) -> list[int]:
    """Hits per layer: docs/semantics.md read literally, the victim the most recently requested resident
    outside the set. Rows are (token, layer) sets, token-major."""
    if semantics == "sequential":  # one key at a time, router order
        rows_by = [(i % layers, [k]) for i, row in enumerate(rows) for k in row]
    else:
        rows_by = [(i % layers, row) for i, row in enumerate(rows)]
    caches: dict[int, set] = {}
    last: dict[tuple, int] = {}
    hits = [0] * layers
    tick = 0
    for layer, row in rows_by:
        c = layer if scope == "layer" else 0
        keys = [(layer, k) if scope == "global" else (c, k) for k in row]
        cached = caches.setdefault(c, set())
        hits[layer] += sum(k in cached for k in keys)
        for k in keys:
            tick += 1
            last[k] = tick
        for k in keys:
            if k in cached:
                continue
            if len(cached) >= size:
                cached.remove(max((x for x in cached if x not in keys), key=last.__getitem__))
            cached.add(k)
    return hits


def test_the_doc_policy_is_listed_and_compiled(doc_mru, tmp_path):
    t = write_trace(tmp_path / "t.parquet", [[0, 1], [2, 0], [3, 1], [0, 2]])
    r = simulate(t, "mru", 3)
    assert "mru" in base.policy_names() and r.method == "numba"
    # a b | c a: a hits, c fills | d b: b hits, d evicts the most recent outside {d, b}: a (c is older)
    # | a c: c hits, a evicts b (requested after d): 3 hits
    assert r.hits == 3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), scope=st.sampled_from(["layer", "global"]), semantics=st.sampled_from(["atomic", "sequential"]))
def test_the_doc_kernel_equals_a_brute_force_mru_property(doc_mru, tmp_path_factory, data, scope, semantics):
    experts, layers = data.draw(st.integers(3, 8)), data.draw(st.integers(1, 3))
    top_k = data.draw(st.integers(1, min(3, experts)))
    tokens = data.draw(st.integers(1, 40))
    rows = [data.draw(st.permutations(range(experts)))[:top_k] for _ in range(tokens * layers)]
    size = data.draw(st.integers(top_k, experts * (layers if scope == "global" else 1)))
    t = write_trace(tmp_path_factory.mktemp("m") / "t.parquet", rows, num_layers=layers, num_experts=experts)
    want = brute_mru(rows, layers, size, scope, semantics)
    fast = simulate(t, "mru", size, scope=scope, semantics=semantics)
    ref = simulate(t, "mru", size, scope=scope, semantics=semantics, force_generic=True)
    assert fast.method == "numba"
    assert list(fast.layer_hits) == list(ref.layer_hits) == want
