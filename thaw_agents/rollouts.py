"""Rollout records and the pivot: where sampled continuations of one prefix part ways.

A rollout directory holds the prefix every rollout forked from and one small JSON record per
rollout (data only; no engine is needed to read it)::

    DIR/
      prefix.json                 the PrefixHandle (``handle.to_json()``)
      <snapshot_id>.thawkv        its KV snapshot (``handle.save(DIR)``), loadable elsewhere
      rollouts/<rollout_id>.json  one record per rollout (``RolloutRecord``, format below)

Record (``"format": "thaw-rollout/1"``): ``rollout_id``, ``prefix`` (snapshot file, snapshot
id, token count), ``suffix``, ``sample_index``, ``options`` (temperature, seed, ...),
``text``, ``token_ids``, ``tokens`` (decoded pieces), ``logprobs`` (one float per generated
token), ``finish_reason``, ``reward`` (or null), ``extra``.

The pivot (``find_pivot``): the first generated position where the rollouts do not all pick
the same token (a rollout that already ended picks "end"). The rollouts are grouped by their
choice there; each group is ranked by its best sequence log-probability (the sum of the
generated tokens' log-probabilities), and the rollouts inside a group likewise.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

FORMAT = "thaw-rollout/1"
RECORDS_DIR = "rollouts"
HANDLE_FILE = "prefix.json"
_REQUIRED = ("rollout_id", "token_ids", "logprobs")


@dataclass(slots=True)
class RolloutRecord:
    """One sampled continuation of a prefix, with its token log-probabilities."""

    rollout_id: str
    token_ids: list[int]
    logprobs: list[float]
    """Log-probability of each generated token, as the engine sampled it."""
    tokens: list[str] = field(default_factory=list)
    text: str = ""
    prefix: dict[str, Any] = field(default_factory=dict)
    """``snapshot_file``, ``snapshot_id``, ``num_tokens`` of the prefix it forked from."""
    suffix: str = ""
    sample_index: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    reward: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"rollout {self.rollout_id!r}: {len(self.token_ids)} token ids but "
                f"{len(self.logprobs)} logprobs (one per generated token needed)"
            )
        if self.tokens and len(self.tokens) != len(self.token_ids):
            raise ValueError(
                f"rollout {self.rollout_id!r}: {len(self.token_ids)} token ids but "
                f"{len(self.tokens)} decoded tokens"
            )

    @property
    def sequence_logprob(self) -> float:
        """Sum of the generated tokens' log-probabilities."""
        return float(sum(self.logprobs))

    def token_text(self, position: int) -> str:
        """The decoded piece at ``position`` (the id in brackets when not recorded)."""
        if position < len(self.tokens):
            return self.tokens[position]
        return f"<{self.token_ids[position]}>"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "record") -> RolloutRecord:
        """Parse and check one record (``ValueError`` naming ``source`` and what is wrong)."""
        if not isinstance(data, dict):
            raise ValueError(
                f"{source}: a rollout record is a JSON object, got {type(data).__name__}"
            )
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: format {data.get('format')!r}; expected {FORMAT!r}")
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in names}
        if not all(isinstance(t, int) for t in values["token_ids"]):
            raise ValueError(f"{source}: token_ids must be integers")
        if not all(isinstance(lp, (int, float)) for lp in values["logprobs"]):
            raise ValueError(
                f"{source}: logprobs must be numbers (one per token; record "
                "rollouts with options={'logprobs': True})"
            )
        return cls(**values)


def record_from_branch(
    result: Any,
    *,
    rollout_id: str,
    prefix: dict[str, Any],
    suffix: str = "",
    options: dict[str, Any] | None = None,
    reward: float | None = None,
) -> RolloutRecord:
    """A record from a fork_fanout ``BranchResult`` run with ``options={"logprobs": True}``."""
    entries = result.logprobs or []
    if len(entries) != len(result.token_ids):
        raise ValueError(
            f"branch {rollout_id!r} has {len(result.token_ids)} tokens but "
            f"{len(entries)} logprob entries: run fork_fanout with "
            "options={'logprobs': True}"
        )
    if any(e.get("logprob") is None for e in entries):
        raise ValueError(f"branch {rollout_id!r}: a generated token has no log-probability")
    return RolloutRecord(
        rollout_id=rollout_id,
        token_ids=list(result.token_ids),
        logprobs=[float(e["logprob"]) for e in entries],
        tokens=[str(e.get("token", "")) for e in entries],
        text=result.text,
        prefix=prefix,
        suffix=suffix,
        sample_index=result.sample_index,
        options=dict(options or {}),
        finish_reason=result.finish_reason,
        reward=reward,
    )


def write_records(
    directory: str | os.PathLike[str], records: Sequence[RolloutRecord]
) -> list[Path]:
    """Write each record to ``DIR/rollouts/<rollout_id>.json`` (temp file + rename)."""
    folder = Path(directory) / RECORDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for record in records:
        path = folder / f"{record.rollout_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def read_records(directory: str | os.PathLike[str]) -> list[RolloutRecord]:
    """Every record under ``DIR/rollouts/``, ordered by rollout id."""
    folder = Path(directory) / RECORDS_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no rollout records in {directory}: expected a folder "
            f"{folder} of <rollout_id>.json files"
        )
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        records.append(RolloutRecord.from_json(data, source=str(path)))
    if not records:
        raise FileNotFoundError(f"{folder} holds no <rollout_id>.json records")
    return sorted(records, key=lambda r: r.rollout_id)


# --------------------------------------------------------------------------- the pivot


@dataclass(slots=True)
class RankedRollout:
    rollout_id: str
    sequence_logprob: float
    num_tokens: int
    reward: float | None = None


@dataclass(slots=True)
class PivotGroup:
    """The rollouts that chose ``token_id`` at the pivot (None: they had already ended)."""

    token_id: int | None
    token: str
    choice_logprob: float | None
    """Mean log-probability of this choice at the pivot over the group's rollouts."""
    rollouts: list[RankedRollout]

    @property
    def best_sequence_logprob(self) -> float:
        return self.rollouts[0].sequence_logprob


@dataclass(slots=True)
class Pivot:
    """Where the rollouts first disagree, and how they split there."""

    position: int
    """Index of the generated token where the rollouts part ways (0 = the first token)."""
    shared_token_ids: list[int]
    shared_text: str
    groups: list[PivotGroup]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_same_prompt(records: Sequence[RolloutRecord]) -> None:
    prompts = {(json.dumps(r.prefix.get("snapshot_id")), r.suffix) for r in records}
    if len(prompts) > 1:
        raise ValueError(
            f"the rollouts start from {len(prompts)} different prompts "
            f"(prefix snapshot id, suffix): {sorted(prompts)}; a pivot compares "
            "rollouts of one prompt"
        )


def find_pivot(records: Sequence[RolloutRecord]) -> Pivot | None:
    """The first position where the rollouts disagree; None when they are all identical.

    Raises ValueError for fewer than two rollouts or rollouts of different prompts.
    """
    if len(records) < 2:
        raise ValueError(f"a pivot needs at least two rollouts, got {len(records)}")
    _check_same_prompt(records)
    longest = max(len(r.token_ids) for r in records)
    position = next(
        (p for p in range(longest + 1) if len({_choice(r, p) for r in records}) > 1), None
    )
    if position is None:
        return None
    by_choice: dict[int | None, list[RolloutRecord]] = {}
    for record in records:
        by_choice.setdefault(_choice(record, position), []).append(record)
    groups = []
    for choice, members in by_choice.items():
        ranked = sorted(members, key=lambda r: (-r.sequence_logprob, r.rollout_id))
        logprobs = [r.logprobs[position] for r in members if choice is not None]
        groups.append(
            PivotGroup(
                token_id=choice,
                token=members[0].token_text(position) if choice is not None else "<end>",
                choice_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
                rollouts=[
                    RankedRollout(r.rollout_id, r.sequence_logprob, len(r.token_ids), r.reward)
                    for r in ranked
                ],
            )
        )
    groups.sort(key=lambda g: (-g.best_sequence_logprob, g.rollouts[0].rollout_id))
    first = records[0]
    shared = first.token_ids[:position]
    shared_text = "".join(first.tokens[:position]) if first.tokens else ""
    return Pivot(position=position, shared_token_ids=shared, shared_text=shared_text, groups=groups)


def _choice(record: RolloutRecord, position: int) -> int | None:
    return record.token_ids[position] if position < len(record.token_ids) else None


def format_pivot(pivot: Pivot | None, num_rollouts: int) -> str:
    """A short human-readable report of ``find_pivot``'s answer."""
    if pivot is None:
        return f"all {num_rollouts} rollouts generated the same tokens: no pivot"
    lines = [
        f"pivot at generated token {pivot.position} of {num_rollouts} rollouts "
        f"(shared before it: {pivot.shared_text!r})"
    ]
    for rank, group in enumerate(pivot.groups, 1):
        choice = "n/a" if group.choice_logprob is None else f"{group.choice_logprob:.3f}"
        lines.append(
            f"  {rank}. {group.token!r} (logprob {choice}): {len(group.rollouts)} rollout(s)"
        )
        for r in group.rollouts:
            reward = "" if r.reward is None else f", reward {r.reward:g}"
            lines.append(
                f"       {r.rollout_id}: sequence logprob {r.sequence_logprob:.2f} "
                f"over {r.num_tokens} tokens{reward}"
            )
    return "\n".join(lines)
