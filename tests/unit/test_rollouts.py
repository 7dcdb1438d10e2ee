"""Rollout records and the pivot (pure code: no engine)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thaw_agents.cli import main as cli_main
from thaw_agents.rollouts import (
    FORMAT,
    RolloutRecord,
    find_pivot,
    format_pivot,
    read_records,
    record_from_branch,
    write_records,
)

PREFIX = {"snapshot_id": "abc", "snapshot_file": "abc.thawkv", "num_tokens": 256}


def rollout(
    rid: str, ids: list[int], logprobs: list[float] | None = None, reward: float | None = None
) -> RolloutRecord:
    logprobs = logprobs if logprobs is not None else [-0.5] * len(ids)
    return RolloutRecord(
        rollout_id=rid,
        token_ids=ids,
        logprobs=logprobs,
        tokens=[f"t{i}" for i in ids],
        text="".join(f"t{i}" for i in ids),
        prefix=PREFIX,
        suffix="Solve it.",
        reward=reward,
    )


def test_pivot_groups_by_choice_and_ranks_by_sequence_logprob():
    records = [
        rollout("r0", [1, 2, 3, 4], [-0.1, -0.1, -1.0, -0.2]),
        rollout("r1", [1, 2, 5, 6], [-0.1, -0.1, -0.3, -0.1]),
        rollout("r2", [1, 2, 3, 7], [-0.1, -0.1, -1.2, -0.1]),
        rollout("r3", [1, 2, 5], [-0.1, -0.1, -0.5]),
    ]
    pivot = find_pivot(records)
    assert pivot is not None
    assert pivot.position == 2
    assert pivot.shared_token_ids == [1, 2]
    assert pivot.shared_text == "t1t2"
    assert [g.token_id for g in pivot.groups] == [5, 3]  # best sequence: r1 (-0.6)
    assert [r.rollout_id for r in pivot.groups[0].rollouts] == ["r1", "r3"]
    assert [r.rollout_id for r in pivot.groups[1].rollouts] == ["r0", "r2"]
    assert pivot.groups[0].choice_logprob == pytest.approx(-0.4)
    assert pivot.groups[1].rollouts[0].sequence_logprob == pytest.approx(-1.4)
    assert pivot.groups[0].token == "t5"


def test_pivot_at_the_first_token_and_at_an_end():
    first = find_pivot([rollout("a", [9, 1]), rollout("b", [8, 1])])
    assert first is not None and first.position == 0 and first.shared_token_ids == []
    ended = find_pivot([rollout("a", [1, 2]), rollout("b", [1, 2, 3], [-0.1, -0.1, -0.1])])
    assert ended is not None and ended.position == 2
    by_token = {g.token_id: g for g in ended.groups}
    assert set(by_token) == {None, 3}
    assert by_token[None].token == "<end>" and by_token[None].choice_logprob is None


def test_identical_rollouts_have_no_pivot():
    records = [rollout("a", [1, 2, 3]), rollout("b", [1, 2, 3])]
    assert find_pivot(records) is None
    assert "no pivot" in format_pivot(None, len(records))


def test_pivot_refuses_one_rollout_and_mixed_prompts():
    with pytest.raises(ValueError, match="at least two"):
        find_pivot([rollout("a", [1])])
    other = rollout("b", [2])
    other.suffix = "Something else."
    with pytest.raises(ValueError, match="different prompts"):
        find_pivot([rollout("a", [1]), other])


def test_record_checks_lengths():
    with pytest.raises(ValueError, match="logprobs"):
        RolloutRecord(rollout_id="x", token_ids=[1, 2], logprobs=[-0.1])
    with pytest.raises(ValueError, match="decoded tokens"):
        RolloutRecord(rollout_id="x", token_ids=[1, 2], logprobs=[-0.1, -0.2], tokens=["a"])


@given(st.lists(st.lists(st.integers(0, 3), max_size=6), min_size=2, max_size=5))
def test_pivot_is_the_longest_common_prefix(sequences):
    records = [rollout(f"r{i}", ids) for i, ids in enumerate(sequences)]
    common = 0
    while all(len(s) > common for s in sequences) and len({s[common] for s in sequences}) == 1:
        common += 1
    pivot = find_pivot(records)
    if len({tuple(s) for s in sequences}) == 1:
        assert pivot is None
    else:
        assert pivot is not None and pivot.position == common
        assert sum(len(g.rollouts) for g in pivot.groups) == len(records)
        best = [g.best_sequence_logprob for g in pivot.groups]
        assert best == sorted(best, reverse=True)


def test_records_round_trip_and_read_errors(tmp_path):
    records = [rollout("rollout-001", [1, 2], reward=1.0), rollout("rollout-000", [1, 3])]
    paths = write_records(tmp_path, records)
    assert [p.name for p in paths] == ["rollout-001.json", "rollout-000.json"]
    assert json.loads(paths[0].read_text())["format"] == FORMAT
    back = read_records(tmp_path)
    assert [r.rollout_id for r in back] == ["rollout-000", "rollout-001"]
    assert back[1] == records[0]
    with pytest.raises(FileNotFoundError, match="no rollout records"):
        read_records(tmp_path / "missing")
    (tmp_path / "rollouts" / "bad.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="bad.json: format 'other/9'"):
        read_records(tmp_path)


class _Branch:  # the fields of a BranchResult that record_from_branch reads
    text = "ab"
    token_ids = [5, 6]
    sample_index = 3
    finish_reason = "length"
    logprobs = [
        {"token": "a", "token_id": 5, "logprob": -0.25},
        {"token": "b", "token_id": 6, "logprob": -1.0},
    ]


def test_record_from_branch():
    record = record_from_branch(
        _Branch(), rollout_id="r", prefix=PREFIX, suffix="s", options={"seed": 4}, reward=0.1
    )
    assert record.tokens == ["a", "b"] and record.sequence_logprob == pytest.approx(-1.25)
    assert record.sample_index == 3 and record.options == {"seed": 4}
    branch = _Branch()
    branch.logprobs = []
    with pytest.raises(ValueError, match="logprobs"):
        record_from_branch(branch, rollout_id="r", prefix=PREFIX)


def test_cli_pivot(tmp_path, capsys):
    write_records(tmp_path, [rollout("a", [1, 2]), rollout("b", [1, 3], [-0.1, -0.9])])
    assert cli_main(["rollouts", "pivot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pivot at generated token 1 of 2 rollouts" in out and "'t2'" in out
    assert cli_main(["rollouts", "pivot", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_rollouts"] == 2 and data["pivot"]["position"] == 1
    assert cli_main(["rollouts", "pivot", str(tmp_path / "nope")]) == 2
    assert "no rollout records" in capsys.readouterr().err
