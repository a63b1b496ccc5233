"""Build the shipped learned-routing traces from the raw recordings of ``train_learned_moe.py``.

    python tools/make_learned_traces.py --run A=/work/.device/1/learned_full --run B=/work/.device/2/learned_full \
        --offset B=100 -o traces/learned-mixtral-32l

Each ``--run NAME=PATH`` is one recording (a trace file or part directory) of the same checkpoint;
its sequence ids are shifted by ``--offset NAME=N`` (so two samplings of one prompt stay distinct
sequences). Writes ``PREFIX.parquet`` (every row, prefill and decode; experts, weights and the
recorded predictions ``pred1..3_experts``; no logits) and ``PREFIX-logits.parquet`` (the decode rows
of the first ``--logits-seqs`` sequences with router logits and prediction logits), both through
temp files. The metadata is the first run's, with the runs named in ``provenance``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from moesim.traces.format import DECODE, META_KEY, read_trace, write_table_atomic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=PATH of one recording")
    ap.add_argument("--offset", action="append", default=[], help="NAME=N: add N to that run's sequence ids")
    ap.add_argument("--logits-seqs", type=int, default=8)
    ap.add_argument("--note", default="", help="free text for provenance")
    ap.add_argument("--model", help="model name for the metadata (default: the recording's)")
    ap.add_argument("-o", "--output", required=True, help="output prefix (PREFIX.parquet, PREFIX-logits.parquet)")
    args = ap.parse_args()
    offsets = {k: int(v) for k, v in (o.split("=", 1) for o in args.offset)}
    tables, meta, runs = [], None, []
    for item in args.run:
        name, path = item.split("=", 1)
        t = read_trace(path)
        if meta is None:
            meta = t.meta
        elif (t.meta.num_layers, t.meta.num_experts, t.meta.top_k, t.meta.model) != (
                meta.num_layers, meta.num_experts, meta.top_k, meta.model):
            raise SystemExit(f"{path}: geometry or model differs from the first run")
        table = t.table
        off = offsets.get(name, 0)
        seq = table.column("seq").to_numpy().astype(np.int32) + off
        table = table.set_column(table.schema.get_field_index("seq"), table.schema.field("seq"), pa.array(seq, pa.int32()))
        tables.append(table.replace_schema_metadata(None))
        runs.append({"name": name, "seq_offset": off, "sequences": int(len(np.unique(seq))), "rows": len(table),
                     "decode_tokens": int((t.phase == DECODE).sum() // t.meta.num_layers),
                     "provenance": t.meta.provenance, "created": t.meta.created})
    assert meta is not None
    meta.provenance = {**meta.provenance, "prompts": None, "runs": runs, "note": args.note}
    if args.model:
        meta.model = args.model
    merged = pa.concat_tables(tables)
    key = (merged.column("seq").to_numpy().astype(np.int64) << 40) + (merged.column("token").to_numpy().astype(np.int64) << 16)
    merged = merged.take(pa.array(np.argsort(key + merged.column("layer").to_numpy(), kind="stable")))
    metadata = {META_KEY: meta.to_json().encode()}
    routing_cols = [c for c in merged.column_names if not c.endswith("logits")]
    out = Path(args.output)
    main_path = out.with_name(out.name + ".parquet")
    write_table_atomic(merged.select(routing_cols).replace_schema_metadata(metadata), main_path,
                       compression="zstd", use_dictionary=["seq", "phase", "layer"])
    seqs = np.unique(merged.column("seq").to_numpy())[: args.logits_seqs]
    keep = pc.and_(pc.is_in(merged.column("seq"), value_set=pa.array(seqs, pa.int32())),
                   pc.equal(merged.column("phase"), DECODE))
    logits_path = out.with_name(out.name + "-logits.parquet")
    write_table_atomic(merged.filter(keep).replace_schema_metadata(metadata), logits_path,
                       compression="zstd", use_dictionary=["seq", "phase", "layer"])
    for p in (main_path, logits_path):
        t = read_trace(p)   # validates
        print(json.dumps({"file": str(p), "bytes": p.stat().st_size, "rows": len(t),
                          "sequences": int(len(np.unique(t.seq))),
                          "decode_tokens": int((t.phase == DECODE).sum() // t.meta.num_layers),
                          "columns": t.table.column_names}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
