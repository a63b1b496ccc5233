"""``moesim validate`` refuses engine cells measured on another trace (issue 26 item 3): the cells file
names its trace by the routing digest, which depends on the routing alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.cli import main
from moesim.traces.format import read_trace
from tests.helpers import random_trace


def _traces(tmp_path):
    rng = np.random.default_rng(11)
    a = random_trace(tmp_path / "a.parquet", rng, tokens=10, num_layers=2, num_experts=8, top_k=2, skew=1.0)
    b = random_trace(tmp_path / "b.parquet", rng, tokens=10, num_layers=2, num_experts=8, top_k=2, skew=1.0)
    return Path(a.path), Path(b.path)


def test_validate_refuses_cells_of_another_trace(tmp_path, capsys):
    a, b = _traces(tmp_path)
    engine = tmp_path / "validate.json"
    engine.write_text(json.dumps({"trace": "a.parquet", "trace_digest": read_trace(a).routing_digest(),
                                  "tokens": 4, "expert_bytes": 1000, "cells": []}))
    code = main(["validate", str(b), "--engine", str(engine), "-o", str(tmp_path / "rep")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert str(engine) in err[0] and "was measured on another trace" in err[0] and "a.parquet" in err[0]
    assert not list(tmp_path.glob("rep*"))


def test_digest_is_the_routing_not_the_file(tmp_path):
    a, _ = _traces(tmp_path)
    digest = read_trace(a).routing_digest()
    table = pq.read_table(a)
    # the same routing written again: rows reversed, other compression -> the same digest
    again = tmp_path / "again.parquet"
    pq.write_table(table.take(np.arange(table.num_rows)[::-1].copy()), again, compression="snappy")
    assert again.read_bytes() != a.read_bytes() and read_trace(again).routing_digest() == digest
    # one expert id changed -> another digest
    ex = table.column("experts").combine_chunks()
    flat = ex.values.to_numpy().copy()
    flat[0] = (flat[0] + 1) % 8 if (flat[0] + 1) % 8 != flat[1] else (flat[0] + 2) % 8
    changed = tmp_path / "changed.parquet"
    col = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=ex.type.value_type), 2)
    pq.write_table(table.set_column(table.schema.get_field_index("experts"), table.schema.field("experts"), col),
                   changed)
    assert read_trace(changed).routing_digest() != digest
