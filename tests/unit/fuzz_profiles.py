"""Hypothesis settings shared by the fuzz tests (``tests/unit/test_fuzz_*.py``); no conftest.

``THAW_FUZZ_PROFILE`` picks the profile:

- ``ci`` (default): a few hundred examples per target; every fuzz file together runs in well
  under two minutes on a 2-core machine. No example database (nothing written to the tree);
  a failure prints the ``@reproduce_failure`` blob and the falsifying example.
- ``deep``: 25x the examples, the local example database (``.hypothesis/``) so a failure
  found once is replayed first next time. E.g.
  ``THAW_FUZZ_PROFILE=deep .venv/bin/python -m pytest tests/unit/test_fuzz_*.py``

Each test asks for ``fuzz(n)``: ``n`` examples under ``ci``, scaled under ``deep``. A hang is
caught twice: hypothesis' ``deadline`` fails any example that takes over 2 s (a super-linear
parse of a small input), and the pytest-timeout mark ``FUZZ_TIMEOUT`` ends a test that never
returns (a loop that does not terminate).

Below the settings: strategies the fuzz files share for JSON that comes from outside (edge
ints, raw JSON texts no encoder writes, bytes that are not UTF-8, and a renderer for them).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("THAW_FUZZ_PROFILE", "ci")
_SCALE = {"ci": 1, "deep": 25}
if PROFILE not in _SCALE:
    raise ValueError(f"THAW_FUZZ_PROFILE={PROFILE!r}: use one of {sorted(_SCALE)}")

_COMMON = dict(
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thaw-fuzz-ci", database=None, **_COMMON)
settings.register_profile("thaw-fuzz-deep", **_COMMON)
_BASE = settings.get_profile(f"thaw-fuzz-{PROFILE}")

FUZZ_TIMEOUT = pytest.mark.timeout(120 * _SCALE[PROFILE])
"""Module-level ``pytestmark`` for a fuzz file: a test that hangs fails instead."""


def fuzz(examples: int) -> settings:
    """Settings for one fuzz target: ``examples`` examples under ``ci``, more under ``deep``."""
    return settings(_BASE, max_examples=examples * _SCALE[PROFILE])


# -- shared strategies: JSON from outside ------------------------------------------------------

EDGE_INTS = [
    0,
    1,
    -1,
    2,
    7,
    255,
    256,
    4095,
    4096,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**400,
]
"""Sizes and offsets at the edges: int32/uint32/int64/uint64 limits, past any float (10**400)."""
INTERESTING_INTS = st.sampled_from(EDGE_INTS)


class Raw(str):
    """JSON text that :func:`render` inserts verbatim (a value no ``json.dumps`` produces)."""

    def __repr__(self) -> str:  # falsifying examples stay readable
        text = str(self)
        return (
            f"Raw({text!r})"
            if len(text) <= 40
            else f"Raw({text[:16]!r} ... {text[-8:]!r}, {len(text)} chars)"
        )


RAW_JSON = [
    Raw(t)
    for t in [
        "1" * 4301,
        "-" + "9" * 5000,  # past int's 4300-digit limit: ValueError, not JSONDecodeError
        "[" * 5000 + "]" * 5000,
        '{"a":' * 5000 + "0" + "}" * 5000,  # past the recursion limit
        "1" + "0" * 400,
        "1e400",
        "-1e400",
        "NaN",
        "Infinity",
        "-Infinity",
        "-0",
        "0.0",
        "1.0",
        "1E0",
        "4e0",
        "-0.0",
        "1e-400",
        '"\\ud800"',
        '"\\udfff\\ud800"',
        '"\\u0000"',
        '"\\ufeff"',
        "true",
        "false",
        "null",
        "[]",
        "{}",
        '""',
        '"' + "f" * 100_000 + '"',
    ]
]
"""JSON texts no encoder writes for our values but any file or peer may hold."""

INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xe2\x82",
    b"\x00",
    b"\xef\xbb\xbf",
]
"""Bytes that are not UTF-8 (overlong, surrogate, past U+10FFFF, truncated) plus NUL and a BOM."""


class Pairs(list):
    """A JSON object as a list of (key, value) pairs: keys may repeat."""


def render(value: Any) -> str:
    """Compact JSON like the project's writers (``separators=(",", ":")``, ASCII), plus
    :class:`Raw` values and :class:`Pairs` objects with duplicate keys."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        value = Pairs(value.items())
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | INTERESTING_INTS
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    JSON_SCALARS,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)
"""Any JSON value ``json.loads`` can return (no NaN, so values compare equal after a round trip)."""

hostile_json = json_values | st.sampled_from(RAW_JSON)
"""Any JSON value, or one of the :data:`RAW_JSON` texts (render it with :func:`render`)."""
