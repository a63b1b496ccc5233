"""Large routing logs: the importers read line by line with a progress bar (bytes) on request, and keep
rows in compact arrays -- an exact oracle (a dict of rows, written here) checks duplicate handling,
and the memory per row is bounded (a Python object per value took ~500 bytes a row)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from moesim.errors import DataError
from moesim.traces.importing import RoutingRows, json_lines


def _oracle(rows: list[tuple]) -> tuple[dict, str | None]:
    """Dict of key -> (experts, weights, phase, first line), and the error the first conflict gives."""
    seen: dict[tuple, tuple] = {}
    for line, seq, tok, layer, ex, ws, ph in rows:
        old = seen.get((seq, tok, layer))
        if old is None:
            seen[(seq, tok, layer)] = (ex, ws, ph, line)
        elif old[:3] != (ex, ws, ph):
            return seen, f"line {line}: conflicts with line {old[3]} for seq={seq} token={tok} layer={layer}"
    return seen, None


@pytest.mark.parametrize("seed", range(6))
def test_rows_match_a_dict_of_rows(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for line in range(1, 400):
        seq, tok, layer = (int(x) for x in rng.integers(0, [3, 6, 4]))
        ex = tuple(int(x) for x in rng.choice(8, 2, replace=False)) if rng.random() < 0.9 or seed < 3 else (0, 1)
        ws = (0.5, 0.5) if seed < 3 else (float(rng.integers(1, 3)) / 4, 0.25)
        ph = 1 if seed < 3 else int(rng.integers(0, 2))
        if seed < 3:  # duplicates repeat the key's first row exactly: collapse, never conflict
            first = next((r for r in rows if r[1:4] == (seq, tok, layer)), None)
            if first is not None:
                ex, ws, ph = first[4:]
        rows.append((line, seq, tok, layer, ex, ws, ph))
    want, error = _oracle(rows)
    got = RoutingRows(Path("log.jsonl"), describe_key=("seq", "token", "layer"))
    for r in rows:
        got.add(r[0], *r[1:4], r[4], r[5], r[6])
    if error is not None:
        with pytest.raises(DataError) as exc:
            got.finish()
        assert str(exc.value) == f"log.jsonl: {error}"
        return
    r = got.finish()
    keys = sorted(want)
    assert [tuple(int(v) for v in k) for k in zip(r.seq, r.token, r.layer, strict=True)] == keys
    assert [tuple(int(x) for x in e) for e in r.experts] == [want[k][0] for k in keys]
    assert [tuple(float(x) for x in w) for w in r.weights] == [want[k][1] for k in keys]
    assert r.phase.tolist() == [want[k][2] for k in keys] and r.lines.tolist() == [want[k][3] for k in keys]


def test_memory_per_row_is_small():
    n = 60_000
    rows = RoutingRows(Path("log.jsonl"))
    tracemalloc.start()
    try:
        for i in range(n):
            rows.add(i + 1, i // 3200, (i // 32) % 100, i % 32, (i % 8, (i + 1) % 8), (0.75, 0.25))
        rows.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == n
    assert peak / n < 200, f"{peak / n:.0f} bytes per row"


def test_progress_bar_counts_the_files_bytes(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(20_000)) + "\n")
    assert sum(1 for _ in json_lines(path)) == 20_000
    assert capsys.readouterr().err == ""  # not a terminal, a small file: no bar
    assert [o["i"] for _, o in json_lines(path, progress=True)][-1] == 19_999
    err = capsys.readouterr().err
    from tqdm import tqdm

    assert "import log.jsonl" in err and f"/{tqdm.format_sizeof(path.stat().st_size)} [" in err, err  # bytes
