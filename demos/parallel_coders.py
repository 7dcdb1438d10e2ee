"""Parallel coding agents: N coders forked from one repository context, ranked by tests.

    repository context (a small package: README, modules, the stub to implement)
      --fork_fanout--> N coders, one approach each (slicing, two pointers, regex, ...), each
                       starting from the context's KV cache
      --> each candidate runs against a hidden pytest task in its own subprocess (a temp
          folder, a timeout, no network) --> ranked by pass rate

    python demos/parallel_coders.py [--n 8] [--max-tokens 160] [--workers 0] [--model PATH]

Writes a JSON receipt (default benchmarks/results/parallel_coders_<cpu|gpu-slug>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from demo_support import quiet_environment, where_it_ran, write_receipt
from langchain_core.messages import HumanMessage, SystemMessage

from thaw_agents import ChatThaw, fork_fanout

FUNCTION = "is_palindrome"
REPOSITORY = '''\
# textkit — small text utilities

textkit/__init__.py
    from textkit.strings import is_palindrome, slugify, word_count

textkit/strings.py
    """String helpers used by the search and the URL layers."""

    import re


    def slugify(text: str) -> str:
        """Lower-case, keep letters and digits, join words with "-".

        >>> slugify("Hello, World!")
        'hello-world'
        """
        words = re.findall(r"[a-z0-9]+", text.lower())
        return "-".join(words)


    def word_count(text: str) -> int:
        """Number of words (runs of letters, digits or apostrophes).

        >>> word_count("It's a test")
        3
        """
        return len(re.findall(r"[A-Za-z0-9']+", text))


    def is_palindrome(text: str) -> bool:
        """True when ``text`` reads the same forwards and backwards, ignoring case and every
        character that is not a letter or a digit. The empty string is a palindrome.

        >>> is_palindrome("A man, a plan, a canal: Panama")
        True
        >>> is_palindrome("race a car")
        False
        """
        raise NotImplementedError

tests/test_strings.py
    from textkit.strings import slugify, word_count

    def test_slugify():
        assert slugify("Hello, World!") == "hello-world"

    def test_word_count():
        assert word_count("It's a test") == 3
'''

# The hidden task: what the candidate must pass (written next to it as test_solution.py).
TESTS = """\
from solution import is_palindrome

def test_simple():
    assert is_palindrome("racecar")

def test_not_a_palindrome():
    assert not is_palindrome("race a car")

def test_ignores_case():
    assert is_palindrome("Level")

def test_ignores_punctuation_and_spaces():
    assert is_palindrome("A man, a plan, a canal: Panama")

def test_empty():
    assert is_palindrome("")

def test_digits():
    assert is_palindrome("12321") and not is_palindrome("123")
"""
NUM_TESTS = TESTS.count("def test_")

# No network inside the test run, even without a network namespace (see run_candidate).
CONFTEST = """\
import socket

def _blocked(*args, **kwargs):
    raise OSError("network access is disabled in this test run")

socket.socket = _blocked
socket.create_connection = _blocked
"""

APPROACHES = [
    "compare the cleaned string with its reverse using slicing [::-1]",
    "walk two indices from both ends towards the middle",
    "remove non-alphanumeric characters with re.sub first",
    "clean the text with str.isalnum in a generator expression",
    "use recursion on the cleaned string",
    "use reversed() and str.join",
    "use a for loop that compares characters from both ends",
    "use collections.deque and pop from both ends",
]
PREAMBLE = "import re\nimport collections\nfrom collections import deque\n\n"


def extract_code(text: str) -> str:
    """The candidate function from a reply: the fenced block that defines it, else the text
    from its ``def`` on."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        if f"def {FUNCTION}" in block:
            return block
    start = text.find(f"def {FUNCTION}")
    if start >= 0:
        return text[start:].split("```")[0]
    return blocks[0] if blocks else text


def _network_sandbox() -> list[str]:
    """``unshare --net`` (a network namespace with no interfaces) where the kernel allows it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    try:
        probe = subprocess.run(
            [unshare, "--net", "--map-root-user", "true"], timeout=10, capture_output=True
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [unshare, "--net", "--map-root-user"] if probe.returncode == 0 else []


def run_candidate(
    code: str, timeout_s: float = 30.0, sandbox: list[str] | None = None
) -> dict[str, Any]:
    """Run the hidden tests against ``code`` in a temp folder; passed / total and why."""
    with tempfile.TemporaryDirectory(prefix="thaw-coder-") as tmp:
        folder = Path(tmp)
        (folder / "solution.py").write_text(PREAMBLE + code)
        (folder / "test_solution.py").write_text(TESTS)
        (folder / "conftest.py").write_text(CONFTEST)
        command = [
            *(sandbox or []),
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--junitxml=report.xml",
            "test_solution.py",
        ]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        }
        try:
            done = subprocess.run(
                command, cwd=folder, env=env, timeout=timeout_s, capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            return {"passed": 0, "total": NUM_TESTS, "status": f"timeout after {timeout_s} s"}
        report = folder / "report.xml"
        if not report.exists():
            return {
                "passed": 0,
                "total": NUM_TESTS,
                "status": f"pytest exit {done.returncode}: {done.stdout[-300:]}",
            }
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        failed = sum(int(suite.get(key, 0)) for key in ("failures", "errors", "skipped"))
        ran = int(suite.get("tests", 0))
        passed = max(ran - failed, 0)
        status = "collection error" if ran < NUM_TESTS and passed == 0 else "ran"
        return {"passed": passed, "total": NUM_TESTS, "status": status}


def context_messages() -> list:
    return [
        SystemMessage(
            "You are a careful Python engineer working in this repository. Reply with code only."
        ),
        HumanMessage(f"The repository:\n\n{REPOSITORY}"),
    ]


def task(approach: str) -> str:
    return (
        f"Implement {FUNCTION}(text) in textkit/strings.py. Approach: {approach}. Reply "
        "with the complete function only, in one ```python code block."
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    approaches = APPROACHES[: args.n]
    llm = ChatThaw(
        model=args.model,
        temperature=0.0,
        max_tokens=args.max_tokens,
        max_model_len=4096,
        kv_store="auto" if args.workers else None,
    )
    pool = None
    try:
        await asyncio.to_thread(llm.engine.start)
        pool = llm.fork_pool(args.workers) if args.workers else None
        began = time.perf_counter()
        coders = await fork_fanout(
            llm, context_messages(), [task(a) for a in approaches], pool=pool
        )
        generate_s = time.perf_counter() - began
        prefix_tokens = len(llm.render_prefix(context_messages()).token_ids)
    finally:
        if pool is not None:
            pool.close()
        llm.close()
    sandbox = _network_sandbox()
    began = time.perf_counter()
    rows = []
    for approach, coder in zip(approaches, coders):
        code = extract_code(coder.text) if coder.ok else ""
        result = (
            run_candidate(code, sandbox=sandbox)
            if code
            else {"passed": 0, "total": NUM_TESTS, "status": coder.error or "no code"}
        )
        rows.append(
            {
                "approach": approach,
                "engine": coder.engine,
                **result,
                "pass_rate": round(result["passed"] / result["total"], 3),
                "prompt_tokens": coder.prompt_tokens,
                "cached_tokens": coder.cached_tokens,
                "code": code,
            }
        )
    test_s = time.perf_counter() - began
    ranked = sorted(rows, key=lambda r: (-r["pass_rate"], approaches.index(r["approach"])))
    reused = sum(r["cached_tokens"] for r in rows)
    print(
        f"\n=== {len(rows)} coders forked from one {prefix_tokens}-token repository context "
        f"({llm.model_name}, {where_it_ran()}) ==="
    )
    print(
        f"generation {generate_s:.1f} s; tests {test_s:.1f} s in {len(rows)} subprocesses "
        f"({'network namespace' if sandbox else 'socket blocked'}); prefix tokens reused "
        f"{reused:,} of {sum(r['prompt_tokens'] for r in rows):,} prompt tokens\n"
    )
    print(f"{'rank':<5}{'pass':<7}{'reused':<11}approach")
    for rank, row in enumerate(ranked, 1):
        print(
            f"{rank:<5}{row['passed']}/{row['total']:<5}"
            f"{row['cached_tokens']}/{row['prompt_tokens']:<7}{row['approach']}"
            + ("" if row["status"] == "ran" else f"  [{row['status'][:60]}]")
        )
    best = ranked[0]
    print(
        f"\nbest candidate ({best['approach']}, {best['passed']}/{best['total']}):\n"
        f"{best['code'].strip()}"
    )
    receipt = write_receipt(
        args.receipt,
        "parallel_coders",
        {
            "model": llm.model_name,
            "workload": {
                "coders": len(rows),
                "max_tokens": args.max_tokens,
                "workers": args.workers,
                "tests": NUM_TESTS,
                "prefix_tokens": prefix_tokens,
            },
            "generate_s": round(generate_s, 3),
            "test_s": round(test_s, 3),
            "sandbox": "unshare --net" if sandbox else "socket blocked",
            "tokens_reused": reused,
            "ranked": ranked,
        },
    )
    print(f"receipt: {receipt}")
    return {"receipt": str(receipt)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n",
        type=int,
        default=len(APPROACHES),
        help=f"coders, one approach each (1-{len(APPROACHES)})",
    )
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--receipt", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.n <= len(APPROACHES):
        parser.error(f"--n must be between 1 and {len(APPROACHES)}, got {args.n}")
    quiet_environment()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
