"""The README's Python examples are exactly what runs: each ```python block (unless the line
before it is ``<!-- not run: REASON -->``) is written to a file and run as a plain script — no
``if __name__ == "__main__":`` guard, the way a new user pastes it — in a fresh interpreter,
on the embedded model. A block passes when its script exits 0 and prints what the block's
``# expect: TEXT`` comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every README Python block that is run."""
    text = README.read_text()
    blocks = []
    for match in _BLOCK.finditer(text):
        if match.group("before").strip().startswith("<!-- not run"):
            continue
        line = text[: match.start("code")].count("\n") + 1
        blocks.append((line, match.group("code")))
    return blocks


def test_readme_has_runnable_examples():
    assert len(readme_blocks()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "line,code", readme_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_block_runs_as_a_plain_script(tmp_path, line, code):
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"README block at line {line} failed ({proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    for expected in re.findall(r"# expect: (.+)", code):
        assert expected.strip() in proc.stdout, (
            f"README block at line {line}: {expected.strip()!r} not in its output:\n"
            f"{proc.stdout[-3000:]}"
        )
