"""Every demo runs end to end at a small size, as a user would run it (a subprocess), and its
JSON receipt has the right shape and counts. Timings are recorded, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moto_s3 import moto_s3

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
TIMEOUT_S = 600


def run_demo(name: str, *args: str) -> str:
    """Run demos/<name>.py with ``args``; returns its output (fails with it on a non-zero exit)."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "demos" / f"{name}.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_pr_review_side_by_side(tmp_path):
    receipt = tmp_path / "pr_review.json"
    out = run_demo("pr_review", "--rounds", "2", "--max-tokens", "8", "--receipt", str(receipt))
    assert "prefill computed" in out and "steady state" in out
    data = json.loads(receipt.read_text())
    assert data["benchmark"] == "pr_review" and data["where"] and data["machine"]["vllm"]
    rows = data["rounds"]
    assert sorted((r["round"], r["mode"]) for r in rows) == [
        (1, "baseline"),
        (1, "thaw"),
        (2, "baseline"),
        (2, "thaw"),
    ]
    for row in rows:
        assert len(row["branches"]) == 4 and row["summary"]
        assert all(b["text"] and b["ttft_s"] is not None for b in row["branches"])
        if row["mode"] == "thaw":
            assert row["tokens_reused"] > 0
            assert all(b["cached_tokens"] >= 128 for b in row["branches"])
        else:
            assert row["tokens_reused"] == 0
    by = {(r["mode"], r["round"]): r for r in rows}
    for r in (1, 2):
        assert by["thaw", r]["prefill_computed"] < by["baseline", r]["prefill_computed"]
        assert by["thaw", r]["prefix_tokens"] == by["baseline", r]["prefix_tokens"]
    assert set(data["steady_state"]) >= {"thaw", "baseline", "prefill_ratio", "ttft_ratio"}


def test_rl_rollouts_records_and_pivot(tmp_path):
    receipt, out_dir = tmp_path / "rl.json", tmp_path / "rollouts"
    out = run_demo(
        "rl_rollouts",
        "--samples",
        "3",
        "--max-tokens",
        "8",
        "--out",
        str(out_dir),
        "--receipt",
        str(receipt),
    )
    assert "prefill tokens avoided" in out
    data = json.loads(receipt.read_text())
    assert data["forked"]["tokens_reused"] > 0 and data["reprefilled"]["tokens_reused"] == 0
    assert (
        data["prefill_tokens_avoided"]
        == data["reprefilled"]["prefill_computed"] - data["forked"]["prefill_computed"]
        > 0
    )
    assert len(data["rollouts"]) == 3
    records = sorted((out_dir / "rollouts").glob("*.json"))
    assert len(records) == 3 and (out_dir / "prefix.json").is_file()
    assert len(list(out_dir.glob("*.thawkv"))) == 1
    record = json.loads(records[0].read_text())
    assert len(record["logprobs"]) == len(record["token_ids"]) > 0
    assert all(lp <= 0.0 for lp in record["logprobs"])
    cli = subprocess.run(
        [sys.executable, "-m", "thaw_agents.cli", "rollouts", "pivot", str(out_dir), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    pivot = json.loads(cli.stdout)
    assert pivot["num_rollouts"] == 3
    if pivot["pivot"] is not None:
        assert sum(len(g["rollouts"]) for g in pivot["pivot"]["groups"]) == 3


def test_parallel_coders_ranked_by_tests(tmp_path):
    receipt = tmp_path / "coders.json"
    out = run_demo("parallel_coders", "--n", "2", "--max-tokens", "48", "--receipt", str(receipt))
    assert "best candidate" in out
    data = json.loads(receipt.read_text())
    ranked = data["ranked"]
    assert len(ranked) == 2 and data["tokens_reused"] > 0
    assert all(r["total"] == 6 and 0 <= r["passed"] <= 6 for r in ranked)
    assert [r["pass_rate"] for r in ranked] == sorted(
        (r["pass_rate"] for r in ranked), reverse=True
    )
    assert all(r["cached_tokens"] >= 128 for r in ranked)


def test_agent_fork_migrates_a_session_through_s3(tmp_path):
    """The tiny float32 model (bit-exact) and an s3:// destination (moto over HTTP)."""
    receipt = tmp_path / "agent_fork.json"
    with moto_s3("sessions", endpoint_in_env=True):  # the demo's processes inherit the endpoint
        out = run_demo(
            "agent_fork",
            "--model",
            "tiny",
            "--max-tokens",
            "8",
            "--dest",
            "s3://sessions/demo/session.thawkv",
            "--receipt",
            str(receipt),
        )
    assert "equals what process 1 would have produced: True" in out
    data = json.loads(receipt.read_text())
    assert data["continuation_equal"] is True and data["dest"] == "s3"
    assert data["tokens_compared"] > 0
    assert data["origin"]["pid"] != data["restore"]["pid"] != os.getpid()
    restore = data["restore"]
    assert restore["cached_tokens"] >= 128
    assert restore["cached_tokens"] <= restore["num_snapshot_tokens"] < restore["prompt_tokens"]
