"""``moesim record`` with the routed experts offloaded to the host (moesim.recorder.offload).

The oracle for "the same trace" is the plain recording (whole model on the device) read back with the
recorder's own reader; the oracle for "only the routed experts were copied, one layer at a time" is
what the routers returned, caught by a hook of the test's own, and the parameters' devices seen from
inside each experts call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moesim.errors import SettingError
from moesim.recorder import ByteTokenizer, adapter_for, build_preset, record
from moesim.recorder.offload import Footprint, choose_mode, place_model
from moesim.recorder.presets import save_preset_checkpoint
from moesim.traces.format import read_trace

PROMPTS = ["def add(a, b):", "Hello there"]
ROOT = Path(__file__).resolve().parents[1]


def _columns(path) -> dict[str, np.ndarray]:
    t = read_trace(path)
    cols = {"seq": t.seq, "token": t.token, "phase": t.phase, "layer": t.layer, "experts": t.experts,
            "weights": t.weights}
    cols.update({f"pred{d}_experts": t.pred_experts(d) for d in t.pred_distances})
    return cols


@pytest.mark.parametrize(("preset", "from_directory"), [("tiny-mixtral", False), ("tiny-qwen2-moe", True)])
def test_offloaded_recording_equals_the_resident_one(preset, from_directory, tmp_path):
    plain = record(preset, PROMPTS, tmp_path / "plain.parquet", max_new_tokens=3, predict_distance=2,
                   offload="none", progress=False)
    source = preset
    if from_directory:  # the checkpoint-directory path (from_pretrained on the host, then placed)
        source = str(tmp_path / "ckpt")
        save_preset_checkpoint(preset, source)
    off = record(source, PROMPTS, tmp_path / "off.parquet", max_new_tokens=3, predict_distance=2,
                 offload="experts", progress=False)
    assert plain.placement.mode == "resident" and off.placement.mode == "experts"
    assert off.placement.offload.bytes_copied > 0
    a, b = _columns(plain.path), _columns(off.path)
    assert set(a) == set(b) and {"pred1_experts", "pred2_experts"} <= set(a)
    assert len(a["experts"]) == plain.tokens * read_trace(plain.path).meta.num_layers
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert plain.generated == off.generated
    meta = read_trace(off.path).meta
    assert meta.provenance["placement"]["weights"] == "experts"
    assert meta.expert_bytes == read_trace(plain.path).meta.expert_bytes  # the placeholders keep the shapes


def test_only_the_routed_experts_of_the_running_layer_are_on_the_device():
    model = build_preset("tiny-mixtral", seed=3)
    adapter = adapter_for(model)
    expert_bytes = adapter.expert_bytes()
    placement = place_model(model, adapter, "cpu", offload="experts", progress=False)
    off = placement.offload

    def real_layers() -> set[int]:
        return {m.index for m in adapter.layers if all(p.device.type != "meta" for p in m.experts.parameters())}

    assert real_layers() == set()
    routed: dict[int, list[set[int]]] = {m.index: [] for m in adapter.layers}
    seen_inside: list[tuple[int, set[int]]] = []
    handles = []
    for m in adapter.layers:
        handles.append(m.gate.register_forward_hook(
            lambda mod, a, out, i=m.index: routed[i].append(set(out[2].reshape(-1).tolist()))))
        # registered after the offload's own pre-hook, so it runs after the experts were brought in
        handles.append(m.experts.register_forward_pre_hook(lambda mod, a, i=m.index: seen_inside.append((i, real_layers()))))
    ids = torch.tensor([ByteTokenizer().encode("route me somewhere")])
    with torch.no_grad():
        model(ids)
        model(ids[:, :1])
    for h in handles:
        h.remove()
    assert [layers for _, layers in seen_inside] == [{i} for i, _ in seen_inside]
    assert [i for i, _ in seen_inside] == [m.index for m in adapter.layers] * 2
    assert real_layers() == set() and off.resident_layers == 0
    want = sum(len(s) for calls in routed.values() for s in calls)
    assert 0 < want < 2 * len(adapter.layers) * adapter.num_experts  # the single-token pass routes only top-k
    assert off.bytes_copied == want * expert_bytes
    off.remove()
    assert real_layers() == {m.index for m in adapter.layers}


def test_record_puts_a_model_object_back_on_the_host_after_offloading(tmp_path):
    model = build_preset("tiny-olmoe", seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = record(model, PROMPTS[:1], tmp_path / "t.parquet", max_new_tokens=2, tokenizer=ByteTokenizer(),
                 offload="experts", progress=False)
    assert res.placement.mode == "experts"
    after = dict(model.named_parameters())
    for n, p in before.items():
        assert after[n].device.type == "cpu"
        torch.testing.assert_close(after[n].detach(), p, rtol=0, atol=0, msg=n)


GB = 10**9


@pytest.mark.parametrize(("offload", "budget", "want"), [
    ("auto", None, "resident"),          # CPU without a budget: no limit
    ("auto", 10 * GB, "resident"),       # 10 GB of weights fit 10 GB
    ("auto", 10 * GB - 1, "experts"),    # one byte short
    ("auto", 3 * GB, "experts"),         # 2 GB dense + 1 GB of one layer's experts
    ("experts", None, "experts"),
    ("experts", 100 * GB, "experts"),
    ("none", 10 * GB, "resident"),
])
def test_choose_mode(offload, budget, want):
    fp = Footprint(total=10 * GB, experts=8 * GB, largest_layer=GB)
    assert fp.dense == 2 * GB and fp.offloaded_peak == 3 * GB
    assert choose_mode(fp, budget, offload) == want


@pytest.mark.parametrize(("offload", "budget", "setting"), [
    ("auto", 3 * GB - 1, "max_gpu_gb"), ("experts", GB, "max_gpu_gb"), ("none", 9 * GB, "offload"),
    ("sideways", None, "offload")])
def test_choose_mode_refuses(offload, budget, setting):
    fp = Footprint(total=10 * GB, experts=8 * GB, largest_layer=GB)
    with pytest.raises(SettingError) as err:
        choose_mode(fp, budget, offload)
    assert err.value.setting == setting


def moesim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True, text=True)


def test_cli_budget_too_small_for_one_layer_is_one_line(tmp_path):
    out = tmp_path / "t.parquet"
    r = moesim("record", "--model", "tiny-mixtral", "--num-prompts", "1", "--max-new-tokens", "2",
               "--max-gpu-gb", "0.0001", "-o", str(out))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--max-gpu-gb" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


def test_cli_offloads_when_the_model_is_over_the_budget(tmp_path):
    out = tmp_path / "t.parquet"
    r = moesim("record", "--model", "tiny-mixtral", "--num-prompts", "1", "--max-new-tokens", "2",
               "--max-gpu-gb", "0.001", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "routed experts kept in host memory" in r.stdout
    placed = read_trace(out).meta.provenance["placement"]
    assert placed["weights"] == "experts" and placed["device_budget_bytes"] == 10**6
    assert placed["weight_bytes"] > 10**6 > placed["weight_bytes"] - placed["expert_bytes_on_host"]


def _with_one_weight_changed(src, dst) -> None:
    """A copy of trace ``src`` whose routing weights differ in exactly one row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    w = t.column("weights").combine_chunks()
    values = w.values.to_numpy().copy()
    values[5] += 0.25
    changed = pa.FixedSizeListArray.from_arrays(pa.array(values, w.type.value_type), w.type.list_size)
    i = t.schema.get_field_index("weights")
    pq.write_table(t.set_column(i, t.schema.field(i), changed), dst)


def test_device_driver_on_cpu(tmp_path):
    sys.path.insert(0, str(ROOT))
    from studies.record_offload.gpu_record_offload import compare_traces, main

    out = tmp_path / "out"
    assert main(["--cpu-check", "--out", str(out), "--layers", "3", "--prompts", "1", "--new-tokens", "3"]) == 0
    result = json.loads((out / "record_offload.json").read_text())
    assert result["plain"]["mode"] == "resident" and result["offloaded"]["mode"] == "experts"
    assert result["comparison"]["identical"] and result["comparison"]["generated_equal"]
    assert set(result["comparison"]["columns"]) == {"experts", "weights", "pred1_experts", "pred2_experts"}
    assert result["offloaded"]["bytes_host_to_device"] > 0 and result["cap_bytes"] < result["weight_bytes"]["total"]
    assert sorted(p.name for p in out.iterdir()) == ["offloaded.parquet", "plain.parquet", "record_offload.json",
                                                    "record_offload.log"]
    _with_one_weight_changed(out / "plain.parquet", tmp_path / "changed.parquet")
    cmp = compare_traces(out / "plain.parquet", tmp_path / "changed.parquet")
    assert not cmp["identical"]
    assert cmp["columns"]["weights"] == {"equal": False, "rows_differing": 1}
    assert cmp["columns"]["experts"] == {"equal": True, "rows_differing": 0}


def test_experts_called_without_positional_ids_get_every_expert():
    """The routed-only copy reads the expert ids from the call; without them it must copy the whole layer."""
    model = build_preset("tiny-mixtral", seed=5)
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    with torch.no_grad():
        x = torch.randn(3, adapter.hidden_size)
        _, weights, ids = layer.gate(x)
        want = layer.experts(x, ids, weights)
        off = place_model(model, adapter, "cpu", offload="experts", progress=False).offload
        by_position = layer.experts(x, ids, weights)
        routed = off.bytes_copied
        by_keyword = layer.experts(x, top_k_index=ids, top_k_weights=weights)
    torch.testing.assert_close(by_position, want, rtol=0, atol=0)
    torch.testing.assert_close(by_keyword, want, rtol=0, atol=0)
    assert routed == len(set(ids.reshape(-1).tolist())) * adapter.expert_bytes()
    assert off.bytes_copied - routed == adapter.num_experts * adapter.expert_bytes()
