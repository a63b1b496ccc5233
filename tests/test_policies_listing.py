"""``moesim policies``: every policy and prefetcher, whole one-sentence descriptions in plain text,
parameters with defaults, columns aligned."""

from __future__ import annotations

from moesim.cli import main
from moesim.policies import EvictionPolicy, policy_class, policy_names
from moesim.policies.catalog import summary_of
from moesim.policies.prefetch import _PREFETCHERS, prefetcher_names


def _listing(capsys) -> list[str]:
    assert main(["policies"]) == 0
    return capsys.readouterr().out.splitlines()


def test_every_policy_and_prefetcher_has_a_whole_plain_description(capsys):
    lines = _listing(capsys)
    classes = [policy_class(n) for n in policy_names()] + [_PREFETCHERS[n] for n in prefetcher_names()]
    for cls in classes:
        rows = [ln for ln in lines if ln.split()[:1] == [cls.name]]
        assert len(rows) == 1, (cls.name, rows)
        summary = summary_of(cls)
        assert summary and summary.endswith(".") and "``" not in summary and "\n" not in summary, cls.name
        assert rows[0].endswith(summary), (rows[0], summary)  # printed whole, not cut
    assert "``" not in "\n".join(lines)


def test_columns_are_aligned_and_parameters_listed(capsys):
    lines = _listing(capsys)
    headers = [ln for ln in lines if ln.split()[:3] == ["name", "parameters", "description"]]
    assert len(headers) == 2
    param_col, desc_col = headers[0].index("parameters"), headers[0].index("description")
    assert (headers[1].index("parameters"), headers[1].index("description")) == (param_col, desc_col)
    names = set(policy_names()) | set(prefetcher_names())
    rows = {ln.split()[0]: ln for ln in lines if ln.startswith("  ") and ln.split()[0] in names}
    for row in rows.values():
        assert row[param_col - 1] == " " and row[param_col] != " ", row
        assert row[desc_col - 2:desc_col] == "  " and row[desc_col] != " ", row
    assert rows["lrfu"][param_col:].startswith("lam=0.1 ")
    assert rows["lru"][param_col:].startswith("- ")
    assert rows["speculative"][param_col:].startswith("threshold=None")
    # s3fifo's three parameters: one per line, all in the parameter column
    i = lines.index(rows["s3fifo"])
    assert [ln.strip() for ln in lines[i + 1:i + 3]] == ["ghost_ratio=0.9", "move_to_main=2"]
    assert all(ln[:param_col].strip() == "" for ln in lines[i + 1:i + 3])


def test_a_users_policy_without_summary_shows_its_first_sentence():
    class Newest(EvictionPolicy):
        """Evict the ``most`` recently used expert, e.g. the newest
        one. Second sentence (Lee et al. 2001) is not shown."""
        name = "newest-test"

    assert summary_of(Newest) == "Evict the most recently used expert, e.g. the newest one."

    class Bare(EvictionPolicy):
        name = "bare-test"

    assert summary_of(Bare) == ""
