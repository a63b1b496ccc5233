"""studies/formats/make_report.py on a hand-made raw file (figures hand-computed here), the expert
round trip of run_formats.py on a tiny transformers Mixtral, and bad input as one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"formats_{name}", ROOT / "studies" / "formats" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw() -> dict:
    def row(fmt, bits, group, meta, nbytes, ppl, err):
        return {"format": fmt, "bits": bits, "group_size": group, "quant_meta": meta,
                "expert_bytes_mixtral_8x7b": nbytes, "perplexity": ppl, "tokens": 12000,
                "expert_weight_rel_error": err}
    return {"model_config": {"layers": 4, "hidden": 128, "ffn": 256, "vocab": 1024}, "torch": "2.x",
            "date": "2026-12-07", "train": {"steps": 300, "tokens": 614400, "seconds": 300.0},
            "mixtral_8x7b_expert_weights": 3 * 4096 * 14336,
            "formats": [row("bf16", 16, None, None, 352321536, 10.0, 0.002),
                        row("hqq2", 2, 16, True, 66748416, 10.5, 0.25), row("hqq2-g64", 2, 64, False, 55050240, 11.0, 0.4)]}


def test_report_numbers_come_from_the_raw_file(tmp_path):
    mod = _load("make_report")
    raw = tmp_path / "formats.json"
    raw.write_text(json.dumps(_raw()))
    out = tmp_path / "report.md"
    assert mod.main([str(raw), "-o", str(out)]) == 0
    text = out.read_text()
    # 66,748,416 B x 8 / 176,160,768 weights = 3.03125 bits; ppl 10.5 / 10.0 = +5.00%
    assert "| hqq2 | 2-bit, group 16, 8-bit scale/zero | 3.031 | 66,748,416 | 1.000 | 25.00% | 10.500 | +5.00% |" in text
    # 55,050,240 / 66,748,416 = 0.8247; 2.5 bits; +10%
    assert "| hqq2-g64 | 2-bit, group 64, bf16 scale/zero | 2.500 | 55,050,240 | 0.825 | 40.00% | 11.000 | +10.00% |" \
        in text
    assert "| bf16 | bf16 | 16.000 | 352,321,536 | 5.278 | 0.20% | 10.000 | +0.00% |" in text
    assert "perplexity 10.0 in bf16" in text
    assert "12,000 held-out tokens" in text and "300 steps" in text


def test_bad_raw_is_one_line_and_writes_nothing(tmp_path, capsys):
    mod = _load("make_report")
    raw = _raw()
    raw["formats"] = raw["formats"][1:]          # no bf16 row to compare with
    path = tmp_path / "formats.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "report.md"
    assert mod.main([str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and not out.exists()
    assert mod.main([str(tmp_path / "missing.json"), "-o", str(out)]) == 2


def test_expert_round_trip_changes_only_the_experts_and_equals_the_engine_dequantisation():
    """quantise_experts on a tiny transformers Mixtral: every expert matrix becomes quant.matrix of its
    own hqq packing (2-bit: visibly different from the original), nothing else moves."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("hqq")
    from transformers import MixtralConfig, MixtralForCausalLM

    from moesim.engine.pack import pack_matrix
    from moesim.engine.quant import matrix, quant_spec

    mod = _load("run_formats")
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = quant_spec("hqq2")
    err = mod.quantise_experts(model, spec)
    assert 0.05 < err < 1.0   # 2-bit codes: a visible but bounded relative error
    for n, p in model.named_parameters():
        if "experts" not in n:
            assert torch.equal(p, before[n]), n
            continue
        for e in range(p.shape[0]):
            want = matrix(pack_matrix(before[n][e].float(), spec, "cpu"), spec, *p.shape[1:]).to(p.dtype)
            assert torch.equal(p[e], want), f"{n}[{e}]"
        assert (p.float() - before[n].float()).abs().max() > 1e-3, f"{n}: unchanged by 2-bit quantisation"
