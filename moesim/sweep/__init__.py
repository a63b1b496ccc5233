"""Resumable parameter sweeps: a grid of cells (trace x policy x params x cache size x prefetcher x
budget x hardware), each keyed by a stable hash of its inputs, run by an executor (in-process, a
local process pool, or Ray), journaled as it goes and consolidated into one Parquet table.

Layers: :mod:`.spec` (what a cell is, grid expansion, hashing) -> :mod:`.runner` (one cell in a
worker) -> :mod:`.executors` (where cells run) -> :mod:`.store` (journal + table) ->
:mod:`.analysis` / :mod:`.plots` (reading the table).
"""

from moesim.sweep.result_store import read_results
from moesim.sweep.spec import Cell, SweepSpec, expand, load_config
from moesim.sweep.sweep import SweepReport, run_sweep

__all__ = ["Cell", "SweepSpec", "expand", "load_config", "read_results", "run_sweep", "SweepReport"]
