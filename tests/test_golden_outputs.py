"""Golden outputs (issue 22's guard): ``simulate --json`` for every built-in policy x scope x semantics at two
cache sizes, timing runs on a preset (with and without prefetchers, batched, gate mode), ``mrc --json`` and a
small ``sweep`` table give, byte for byte, the text main printed at bd85472. A refactor must not change one
character; an intended change of behaviour regenerates with tests/golden/regenerate.py (read its docstring).
"""

from __future__ import annotations

import difflib

import pytest

from tests.golden.regenerate import GROUPS, POLICIES, TRACE, golden_path, read_golden, run_case

CASES = [pytest.param(group, case, id=f"{group}:{case.name}") for group, make in GROUPS.items() for case in make()]


@pytest.fixture(scope="module")
def goldens() -> dict[str, dict[str, dict]]:
    return {group: read_golden(group) for group in GROUPS}


def test_golden_files_hold_exactly_the_cases(goldens):
    for group, make in GROUPS.items():
        assert list(goldens[group]) == [c.name for c in make()], f"{golden_path(group)} is out of step with regenerate.py"
        for case in make():
            assert goldens[group][case.name]["argv"] == list(case.argv), case.name


def test_every_built_in_policy_has_goldens():
    from moesim.policies import policy_class, policy_names

    # tests may register their own policies in this process; the built-ins are the ones moesim defines
    built_in = [n for n in policy_names() if policy_class(n).__module__.startswith("moesim.")]
    assert built_in == sorted(POLICIES), (
        "the built-in policies changed: add the new one to POLICIES in tests/golden/regenerate.py and "
        "regenerate only its cases' lines")


@pytest.mark.parametrize("group, case", CASES)
def test_output_is_byte_identical(group, case, goldens, tmp_path):
    assert TRACE.exists()
    expected = goldens[group][case.name]["stdout"]
    got = run_case(case, tmp_path)
    if got != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(), "golden", "now", lineterm=""))
        pytest.fail(f"{case.name}: output differs from {golden_path(group).name}\n{diff}")
