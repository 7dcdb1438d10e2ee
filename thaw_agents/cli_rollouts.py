"""``thaw-agents rollouts ...``: inspect rollout records (no engine needed).

thaw-agents rollouts pivot DIR [--json]
    the first generated position where the rollouts in DIR (``DIR/rollouts/*.json``, as
    demos/rl_rollouts.py writes them) disagree, the rollouts grouped by their choice there
    and ranked by sequence log-probability
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from thaw_agents.rollouts import find_pivot, format_pivot, read_records


def register(subparsers: Any) -> None:
    """Add the ``rollouts`` command group to the ``thaw-agents`` parser."""
    group = subparsers.add_parser(
        "rollouts",
        help="inspect rollout records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = group.add_subparsers(dest="rollouts_command", required=True)
    pivot = commands.add_parser("pivot", help="where the rollouts in DIR part ways")
    pivot.add_argument("directory", metavar="DIR", help="a rollout directory")
    pivot.add_argument("--json", action="store_true", help="print the pivot as JSON")
    pivot.set_defaults(func=pivot_command)


def pivot_command(args: argparse.Namespace) -> int:
    """Print the pivot of DIR's rollouts; exit status 2 on unreadable or unusable records."""
    try:
        records = read_records(args.directory)
        pivot = find_pivot(records)
    except (OSError, ValueError) as exc:
        print(f"thaw-agents rollouts pivot: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {"num_rollouts": len(records), "pivot": pivot.to_json() if pivot else None},
                indent=1,
            )
        )
    else:
        print(format_pivot(pivot, len(records)))
    return 0
