"""The ``thaw-agents`` command line.

    thaw-agents serve ...              OpenAI-compatible server (thaw_agents.server)
    thaw-agents freeze|info|verify|diff ...   weight and KV snapshots (thaw_agents.cli_snapshots)
    thaw-agents rollouts pivot DIR     rollout records (thaw_agents.cli_rollouts)

Each command group lives in its own module with a ``register(subparsers)`` function; this
module only wires them together, importing each lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

_GROUPS = ("thaw_agents.server", "thaw_agents.cli_snapshots", "thaw_agents.cli_rollouts")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every available command group registered."""
    parser = argparse.ArgumentParser(prog="thaw-agents", description="fork() for LLM agents")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command group not installed in this build
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
