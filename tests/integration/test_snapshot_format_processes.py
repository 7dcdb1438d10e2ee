"""The .thawkv block hashes, recomputed in another process (a fresh interpreter).

The rest of the format's tests run in one process: tests/unit/test_snapshot_format.py.
"""

from __future__ import annotations

import subprocess
import sys

from thaw_agents_core.snapshot.block_hashes import block_hash_chain


def test_block_hash_chain_is_reproducible_across_processes():
    code = "from thaw_agents_core.snapshot.block_hashes import block_hash_chain as c; print(c(list(range(64)), 16)[-1].hex())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == block_hash_chain(list(range(64)), 16)[-1].hex()
