"""Small builders for tests: tiny traces written with the real writer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace


def run_main(argv, capsys) -> tuple[int, str, list[str]]:
    """``moesim ARGV`` in this process: exit status (argparse's own exits too), stdout, stderr lines."""
    from moesim.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


def write_trace(path: Path, sets: list[list[int]] | np.ndarray, *, num_layers: int = 1, num_experts: int = 8,
                layers: list[int] | None = None, seq: list[int] | None = None, weights=None, **meta_kw):
    """Rows in execution order: row i = token i // num_layers, layer i % num_layers (unless given)."""
    sets = np.asarray(sets, dtype=np.int64)
    n, k = sets.shape
    layer = np.asarray(layers if layers is not None else np.arange(n) % num_layers)
    token = np.arange(n) // num_layers if layers is None else np.arange(n)
    meta = TraceMeta(model="test", family="test", num_layers=num_layers, num_experts=num_experts, top_k=k, **meta_kw)
    w = np.full((n, k), 1.0 / k) if weights is None else np.asarray(weights)
    with TraceWriter(path, meta) as wr:
        wr.write(np.asarray(seq) if seq is not None else 0, token, DECODE, layer, sets, w)
    return read_trace(path)


def skewed_trace(path: Path, e: int, k: int, seed: int, n: int, scope: str, extra: int, concentration: float,
                 *, weighted: bool = False):
    """A 2-layer trace of ``2 n`` skewed sets (:func:`skewed_sets`) of ``min(k, e)`` of ``e`` experts, and a
    cache size from the set width up to every key of ``scope`` (width + ``extra``): the shape of the
    compiled-vs-class property tests. ``weighted``: routing weights rounded to 2 digits (score ties).
    Returns (trace, cache size)."""
    k = min(k, e)
    rng = np.random.default_rng(seed)
    sets = skewed_sets(rng, e, k, 2 * n, concentration)
    weights = np.round(rng.dirichlet(np.ones(k), size=len(sets)), 2) if weighted else None
    t = write_trace(path, sets, num_layers=2, num_experts=e, weights=weights)
    n_keys = e * (2 if scope == "global" else 1)
    return t, min(n_keys, k + extra)


def random_trace(path: Path, rng: np.random.Generator, *, tokens: int, num_layers: int, num_experts: int, top_k: int,
                 skew: float = 1.0):
    """Random top-k sets with Zipf-like popularity (distinct experts per row)."""
    p = 1.0 / np.arange(1, num_experts + 1) ** skew
    p /= p.sum()
    rows = np.array([rng.choice(num_experts, size=top_k, replace=False, p=p) for _ in range(tokens * num_layers)])
    return write_trace(path, rows, num_layers=num_layers, num_experts=num_experts)


def skewed_sets(rng: np.random.Generator, num_experts: int, k: int, n: int, concentration: float) -> list[list[int]]:
    """``n`` sets of ``k`` distinct keys of ``num_experts``, popularity from one Dirichlet(``concentration``)
    draw: skewed as routing is (lower concentration, more skew)."""
    p = rng.dirichlet(np.ones(num_experts) * concentration)
    return [list(rng.choice(num_experts, k, replace=False, p=p)) for _ in range(n)]


def grid_routing(sets: list[list[list[int]]], num_experts: int = 8):
    """The engine's Routing from sets[t][layer] (router order); an empty list is a missing row."""
    from moesim.engine.plan import Routing

    T, L = len(sets), len(sets[0])
    k = max(len(s) for row in sets for s in row)
    experts = np.full((T, L, k), -1, np.int64)
    row = np.full((T, L), -1, np.int64)
    r = 0
    for t in range(T):
        for layer in range(L):
            if sets[t][layer]:
                experts[t, layer] = sets[t][layer]
                row[t, layer] = r
                r += 1
    w = np.where(experts >= 0, 0.5, 0.0).astype(np.float32)
    return Routing(experts, w, row, np.zeros(T, np.int64), np.arange(T), num_experts)


def kernel_hits(stream, name: str, params: dict | None = None, *, layout: int) -> list[int]:
    """Hits per layer of the compiled kernel of built-in ``name`` on ``layout`` (policy_kernels.state's
    LIST, SCAN, HEAP, VECTOR), whatever the cache size."""
    from moesim.simulator.replay import compiled_kernel, kernel_inputs

    kernel, fparams, rng_state = compiled_kernel(name, params)
    nxt, weights = kernel_inputs(stream, kernel)
    _, hit = kernel.replay(layout, stream.cache, stream.keys, stream.clock, weights, stream.group, stream.sizes,
                           stream.n_keys, stream.n_groups, nxt, fparams, rng_state)
    return hit.tolist()


def save_tiny_mixtral(path: Path, seed: int, **config):
    """A tiny random Mixtral written with transformers' ``save_pretrained`` (weights N(0, 0.2), large
    enough for varied routing); returns the model. ``config`` overrides MixtralConfig fields."""
    import torch
    import transformers

    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
               eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**cfg, **config})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


@contextlib.contextmanager
def swapped_cpu_copies(cpu, a: tuple[int, int], b: tuple[int, int]):
    """Hybrid execution's CPU copies (moesim.engine.hybrid.CpuExperts) of experts ``a`` and ``b`` swapped,
    identities included (a copy made from the wrong expert's blob), for the block."""
    saved = dict(cpu.copies), dict(cpu.tags)
    cpu.copies[a], cpu.copies[b] = cpu.copies[b], cpu.copies[a]
    cpu.tags[a], cpu.tags[b] = cpu.tags[b], cpu.tags[a]
    try:
        yield
    finally:
        cpu.copies, cpu.tags = saved
