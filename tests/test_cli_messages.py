"""Usage mistakes a newcomer makes give one plain sentence (no Python internals) and exit 2: a
parameter the policy does not have lists the ones it has, a non-numeric value says so, a reversed
range says so; a timing option without --hardware names the preset it used."""

from __future__ import annotations

import json

import pytest

from moesim.cli import main
from moesim.policies import policy_class
from moesim.policies.params import ParamError, check_params
from moesim.policies.prefetch import _PREFETCHERS
from moesim.traces.format import DECODE, TraceMeta, TraceWriter
from tests.helpers import run_main as _run


@pytest.fixture()
def good(tmp_path):
    meta = TraceMeta(model="m", family="mixtral", num_layers=2, num_experts=4, top_k=2)
    path = tmp_path / "g.parquet"
    with TraceWriter(path, meta) as w:
        sets = [[0, 1], [2, 3], [1, 2], [0, 3], [3, 1], [0, 2]]
        w.write(0, [t for t in range(3) for _ in range(2)], DECODE, [0, 1] * 3, sets, [[0.6, 0.4]] * 6)
    return str(path)


INTERNALS = ("__init__", "Traceback", "unexpected keyword", "not supported between", "TypeError")


@pytest.mark.parametrize("argv, needles", [
    (["simulate", "{good}", "--policy", "lrfu", "--param", "lambda=0.3", "--cache-size", "2"],
     ["policy 'lrfu' has no parameter 'lambda'", "its parameters: lam=0.1"]),
    (["mrc", "{good}", "--policy", "lrfu", "--param", "lambda=0.3"], ["no parameter 'lambda'", "lam=0.1"]),
    (["simulate", "{good}", "--policy", "lru", "--param", "lam=0.3", "--cache-size", "2"],
     ["policy 'lru' has no parameter 'lam' (it takes no parameters)"]),
    (["simulate", "{good}", "--policy", "lrfu", "--param", "lam=abc", "--cache-size", "2"],
     ["policy 'lrfu': lam='abc' is not a number"]),
    (["simulate", "{good}", "--policy", "lrfu", "--param", "lam=abc", "--cache-size", "2", "--hardware", "a6000"],
     ["lam='abc' is not a number"]),
    (["simulate", "{good}", "--policy", "random", "--param", "seed=1.5", "--cache-size", "2"],
     ["seed=1.5 is not an integer"]),
    (["simulate", "{good}", "--policy", "lru", "--cache-size", "2", "--hardware", "a6000", "--prefetch",
      "transition", "--prefetch-param", "thresh=0.2"],
     ["prefetcher 'transition' has no parameter 'thresh' (its parameters: distance=1, budget=None)"]),
    (["sweep", "--trace", "{good}", "--policy", "lru", "--cache-size", "8..2", "-o", "{out}"],
     ["range '8..2' is reversed (did you mean 2..8?)"]),
    (["sweep", "--trace", "{good}", "--policy", "lrfu", "--param", "lrfu.lambda=0.1,0.2", "--cache-size", "2",
      "-o", "{out}"], ["policy 'lrfu' has no parameter 'lambda'", "lam=0.1"]),
    (["sweep", "--trace", "{good}", "--policy", "lrfu", "--param", "lrfu.lam=abc", "--cache-size", "2",
      "-o", "{out}"], ["lam='abc' is not a number"]),
])
def test_usage_mistakes_are_one_plain_line(tmp_path, good, capsys, argv, needles):
    out = tmp_path / "r.parquet"
    code, _, err = _run([a.format(good=good, out=out) for a in argv], capsys)
    assert code == 2 and len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err
    assert not any(x in err[0] for x in INTERNALS), err
    assert not out.exists()


def test_reversed_range_in_a_sweep_config(tmp_path, good, capsys):
    """In a config file it is bad data in that file (exit 1, like every config mistake)."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'traces = ["{good}"]\npolicies = ["lru"]\ncache_sizes = "4..2"\n')
    code, _, err = _run(["sweep", "--config", cfg, "-o", tmp_path / "r.parquet"], capsys)
    assert code == 1 and len(err) == 1 and "range '4..2' is reversed (did you mean 2..4?)" in err[0], err


def test_prefetch_without_hardware_names_the_preset(good, capsys):
    code, out, err = _run(["simulate", good, "--policy", "lru", "--cache-size", "2", "--prefetch", "transition",
                           "--json"], capsys)
    assert code == 0 and json.loads(out)["hardware"] == "h200"
    assert len(err) == 1 and "no --hardware" in err[0] and "h200 preset" in err[0], err
    code, _, err = _run(["simulate", good, "--policy", "lru", "--cache-size", "2", "--prefetch", "transition",
                         "--hardware", "a6000", "--json"], capsys)
    assert code == 0 and err == []


def test_numeric_text_is_converted_to_the_defaults_type(good, capsys):
    """``half_life=inf`` reaches the policy as a float (not the string 'inf'), and gives the same
    replay as the default inf; ``seed=3`` text becomes an int."""
    cls = policy_class("gate-weighted")
    assert check_params(cls, {"half_life": "inf"}, "p") == {"half_life": float("inf")}
    assert check_params(policy_class("random"), {"seed": "3"}, "p") == {"seed": 3}
    assert check_params(policy_class("random"), {"seed": 3.0}, "p") == {"seed": 3}
    assert check_params(_PREFETCHERS["speculative"], {"threshold": "0.25"}, "p") == {"threshold": 0.25}
    with pytest.raises(ParamError, match="is not a number"):
        check_params(cls, {"half_life": True}, "p")
    runs = []
    for extra in ([], ["--param", "half_life=inf"]):
        code, out, _ = _run(["simulate", good, "--policy", "gate-weighted", "--cache-size", "2", "--json", *extra],
                            capsys)
        assert code == 0
        runs.append(json.loads(out)["hits"])
    assert runs[0] == runs[1]


def test_hardware_table_fits_100_columns_and_json_keeps_every_key(capsys):
    from moesim.simulator.cost_model import CostModel

    assert main(["hardware"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    names = CostModel.presets()
    assert [line.split()[0] for line in lines[2:2 + len(names)]] == list(names)
    h200 = next(line.split() for line in lines if line.split()[:1] == ["h200"])
    model = CostModel.preset("h200").summary()
    assert float(h200[1]) == pytest.approx(model["pcie_gbps"], abs=0.05)  # PCIe GB/s, 1 decimal
    assert "--json" in lines[-1]
    assert main(["hardware", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(names)
    assert next(r for r in rows if r["name"] == "h200") == model  # every key, full precision
