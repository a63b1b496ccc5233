"""studies/formats/report.md from raw/formats.json (run_formats.py's output; CPU only, every number from
the raw file).

    python studies/formats/make_report.py [raw/formats.json] [-o studies/formats/report.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from studies._common import md_table, pct, write_text  # noqa: E402


def format_rows(r: dict) -> list[list[Any]]:
    """Per format: layout, bits per weight and bytes of a Mixtral-8x7B expert (and against the seed's
    hqq2), held-out perplexity and its change against bf16."""
    rows_by = {f["format"]: f for f in r["formats"]}
    base, seed = rows_by["bf16"], rows_by.get("hqq2")
    n = r["mixtral_8x7b_expert_weights"]
    out = []
    for f in r["formats"]:
        b = f["expert_bytes_mixtral_8x7b"]
        layout = "bf16" if f["group_size"] is None else \
            f"{f['bits']}-bit, group {f['group_size']}, " + ("8-bit scale/zero" if f["quant_meta"] else "bf16 scale/zero")
        out.append([f["format"], layout, f"{8 * b / n:.3f}", f"{b:,}",
                    f"{b / seed['expert_bytes_mixtral_8x7b']:.3f}" if seed else "-",
                    pct(f["expert_weight_rel_error"], 2), f"{f['perplexity']:.3f}",
                    pct(f["perplexity"] / base["perplexity"] - 1, 2, signed=True)])
    return out


def markdown(r: dict) -> str:
    c = r["model_config"]
    tr = r["train"]
    bf16 = next(f for f in r["formats"] if f["format"] == "bf16")
    return "\n".join([
        "# Expert formats: bytes and quality (issue 23)", "",
        f"Every expert format of `moesim/engine/quant.py`, applied to the experts of the project's learned "
        f"Mixtral-architecture MoE (`tools/train_learned_moe.py`'s corpus split, tokenizer and training loop) "
        f"trained on CPU at {c['layers']} layers, hidden {c['hidden']}, ffn {c['ffn']}, 8 experts top-2, "
        f"vocabulary {c['vocab']} ({tr['steps']} steps, {tr['tokens']:,} tokens, {tr['seconds']:.0f} s; "
        f"torch {r['torch']}, {r['date']}). The H200 checkpoint behind the shipped learned traces is not "
        "committed, so the model is retrained here at a CPU size. Each format's expert matrices are quantised "
        "by hqq (`moesim.engine.pack.pack_matrix`) and dequantised by the engine's reference path "
        "(`quant.matrix`, the fused kernels' numerics); the model trains and runs in fp32 (bf16 matmuls are "
        "many times slower on a CPU), so `bf16` is its expert weights rounded to bf16, and attention, router, "
        f"embeddings and norms stay fp32. Perplexity over {bf16['tokens']:,} held-out tokens (files held out "
        "by path hash, never trained on); weight error: ||W_q - W|| / ||W|| over all expert matrices. Bytes "
        "per expert are for Mixtral-8x7B (hidden 4096, ffn 14336): what one miss copies.", "",
        *md_table(["format", "layout", "bits / weight", "bytes per Mixtral-8x7B expert", "vs hqq2 bytes",
                   "expert weight error", "held-out perplexity", "vs bf16"], format_rows(r)), "",
        f"How far this answers the quality question: a model this small and this briefly trained (held-out "
        f"perplexity {bf16['perplexity']:.1f} in bf16) leans little on its experts' fine weights, so the "
        "perplexity column separates the formats only weakly (a single seed; differences of a few tenths of "
        "a percent are within what another seed or held-out sample would move). The weight error column "
        "is the sharper ranking of the formats; the perplexity of the full-size learned model (or "
        "Mixtral-8x7B) per format needs the GPU and is not measured here.", "",
        "int8 is not an expert format of the engine (no `quant.py` spec), so it has no row. Raw data: "
        "`raw/formats.json` (run_formats.py); this file is built by make_report.py.", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", nargs="?", type=Path, default=HERE / "raw" / "formats.json")
    ap.add_argument("-o", "--out", type=Path, default=HERE / "report.md")
    args = ap.parse_args(argv)
    if not args.raw.is_file():
        print(f"error: {args.raw}: no such raw file (run studies/formats/run_formats.py)", file=sys.stderr)
        return 2
    try:
        text = markdown(json.loads(args.raw.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration, ZeroDivisionError) as exc:
        print(f"error: {args.raw}: not a formats run ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
