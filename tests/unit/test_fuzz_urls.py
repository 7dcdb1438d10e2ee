"""Fuzzing snapshot-store URLs (thaw_agents_core/store/url.py): ``shm://NAME?capacity=1GiB
[&create=true|false]``, ``file:///PATH[?max_bytes=...]``, plain paths, and sizes.

Documented: a bad URL or size raises ``ValueError`` (``parse_size``, ``open_store``,
``attach_url``; ``urllib``'s own refusals, e.g. a bad IPv6 netloc, are ValueErrors too); a size
is a non-negative byte count; ``attach_url`` turns any ``shm://`` URL into one that attaches
(``create=false``, no capacity) and leaves the store name and other parameters alone.

The stores themselves are replaced by recorders here (no directory or shared memory is created
for arbitrary strings); what reaches them is checked instead. The one real store made below is
the regression for a capacity past what ``posix_fallocate`` takes.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import uuid
from unittest import mock

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from thaw_agents_core.store import shm as shm_mod
from thaw_agents_core.store import url as url_mod
from thaw_agents_core.store.shm import ShmStore
from thaw_agents_core.store.url import attach_url, open_store, parse_size

try:
    from .fuzz_profiles import FUZZ_TIMEOUT, fuzz
except ImportError:  # tests/unit is not a package: pytest put it on sys.path
    from fuzz_profiles import FUZZ_TIMEOUT, fuzz

pytestmark = FUZZ_TIMEOUT

UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class Recorder:
    """Stands in for ShmStore / FileStore: remembers what open_store passed."""

    def __init__(self, kind: str, *args, **kwargs) -> None:
        self.kind, self.args, self.kwargs = kind, args, kwargs


def opened(url) -> Recorder:
    with (
        mock.patch.object(shm_mod, "ShmStore", lambda *a, **k: Recorder("shm", *a, **k)),
        mock.patch.object(url_mod, "FileStore", lambda *a, **k: Recorder("file", *a, **k)),
    ):
        return open_store(url)


def check_opened(store: Recorder) -> None:
    if store.kind == "shm":
        name, capacity = store.args
        assert isinstance(name, str)
        assert capacity is None or (type(capacity) is int and capacity >= 0)
        assert store.kwargs["create"] in (True, False, None)
    else:
        (path,) = store.args
        assert isinstance(path, str)
        max_bytes = store.kwargs.get("max_bytes")
        assert max_bytes is None or (type(max_bytes) is int and max_bytes >= 0)


# -- sizes ------------------------------------------------------------------------------------

unit_text = st.sampled_from(list(UNITS)).flatmap(
    lambda u: st.sampled_from([u, u.upper()]).flatmap(
        lambda uu: st.sampled_from(["", "b", "B", "ib", "iB", "IB"]).map(lambda suffix: uu + suffix)
    )
)
size_like = st.builds(
    lambda ws1, digits, ws2, unit, ws3: ws1 + digits + ws2 + unit + ws3,
    st.sampled_from(["", " ", "\t"]),
    st.text("0123456789", min_size=1, max_size=30),
    st.sampled_from(["", " "]),
    unit_text,
    st.sampled_from(["", " ", "\n"]),
)


@fuzz(300)
@given(
    st.text(max_size=40)
    | size_like
    | st.text("0123456789kKmMgGtTiIbB \t-+._eE\u0660\u0669\u212a", max_size=12)
)
@example("9" * 4301)  # int's digit limit: a ValueError, which is what parse_size documents
@example("1\u212aiB")  # KELVIN SIGN matches [kmgt] under IGNORECASE and lowers to 'k'
@example("\u0664GiB")  # ARABIC-INDIC FOUR: \d and int() both take it
def test_parse_size_of_any_string_is_a_size_or_a_value_error(text):
    try:
        n = parse_size(text)
    except ValueError:
        return
    assert type(n) is int and n >= 0


@fuzz(300)
@given(
    st.integers(0, 2**70),
    st.sampled_from(list(UNITS)),
    st.sampled_from(["", "b", "ib", "B", "iB"]),
    st.booleans(),
    st.sampled_from(["", " ", "  "]),
)
def test_parse_size_round_trips(n, unit, suffix, upper, space):
    text = f"{n}{space}{unit.upper() if upper else unit}{suffix}"
    assert parse_size(text) == n << UNITS[unit]
    assert parse_size(f" {text} ") == n << UNITS[unit]
    assert parse_size(n) == n


# -- open_store / attach_url on anything ------------------------------------------------------

url_chars = st.text(st.sampled_from("shmfile:/?&=#[]%@.-_ aZ09\\\x00\u00e9"), max_size=30)
urlish = st.builds(
    lambda scheme, rest: scheme + rest,
    st.sampled_from(["shm://", "file://", "file:///", "s3://", "c:", "", "SHM://", "shm:"]),
    url_chars | st.text(max_size=20),
)


@fuzz(400)
@given(urlish | st.text(max_size=40))
@example("shm://[x")  # urllib: "Invalid IPv6 URL", a ValueError
@example("shm://x?capacity=" + "9" * 4301)
@example("shm://x?create=maybe")
@example("file:///tmp/x?max_bytes=-1")
def test_open_store_of_any_string_raises_only_value_errors(url):
    try:
        store = opened(url)
    except ValueError:
        return
    check_opened(store)


@fuzz(300)
@given(urlish | st.text(max_size=40))
def test_attach_url_of_any_string_is_an_attaching_url(url):
    try:
        attached = attach_url(url)
    except ValueError:
        return
    assert isinstance(attached, str)
    assert attach_url(attached) == attached  # idempotent
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "shm":
        assert attached == url
        return
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(attached).query))
    assert query.get("create") == "false" and "capacity" not in query
    assert urllib.parse.urlsplit(attached).netloc == parsed.netloc


# -- valid URLs round-trip -----------------------------------------------------------------------

names = st.from_regex(re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"), fullmatch=True)
extra_params = st.dictionaries(
    st.from_regex(re.compile(r"[a-z_]{1,8}"), fullmatch=True).filter(
        lambda k: k not in ("capacity", "create")
    ),
    st.text(min_size=1, max_size=8),
    max_size=3,
)


@fuzz(300)
@given(
    names,
    st.none() | st.tuples(st.integers(1, 2**40), st.sampled_from(["", "KiB", "MiB", "g", "T"])),
    st.sampled_from([None, "true", "false"]),
    extra_params,
)
def test_shm_urls_round_trip(name, capacity, create, extra):
    query = dict(extra)
    if capacity is not None:
        query["capacity"] = f"{capacity[0]}{capacity[1]}"
    if create is not None:
        query["create"] = create
    url = f"shm://{name}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    store = opened(url)
    assert store.kind == "shm" and store.args[0] == name
    assert store.args[1] == (None if capacity is None else parse_size(query["capacity"]))
    assert store.kwargs["create"] == {None: None, "true": True, "false": False}[create]
    attached = attach_url(url)
    again = opened(attached)
    assert again.args == (name, None) and again.kwargs["create"] is False
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(attached).query)) == {
        **extra,
        "create": "false",
    }


@fuzz(300)
@given(
    st.lists(
        st.text(
            st.characters(exclude_categories=("Cs",), exclude_characters="/\x00"),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=4,
    ),
    st.none() | st.integers(0, 2**50),
)
def test_file_urls_and_paths_round_trip(parts, max_bytes):
    path = "/" + "/".join(parts)
    url = (
        "file://"
        + urllib.parse.quote(path)
        + ("" if max_bytes is None else f"?max_bytes={max_bytes}")
    )
    store = opened(url)
    assert (store.kind, store.args, store.kwargs) == ("file", (path,), {"max_bytes": max_bytes})
    assert attach_url(url) == url
    plain = opened(path)
    if not urllib.parse.urlsplit(path).scheme:
        assert (plain.kind, plain.args) == ("file", (path,))


# -- the capacity that reaches posix_fallocate ---------------------------------------------------


@pytest.mark.parametrize("capacity", ["8EiB", str(2**63 - 1), str(2**64), "99999999999T"])
def test_a_capacity_no_file_can_have_is_an_os_error(capacity):
    """Finding 7: a capacity past off_t reached os.posix_fallocate, whose OverflowError escaped
    ShmStore as neither ValueError nor the OSError that says the arena cannot be allocated."""
    name = f"fuzz-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    before = {n for n in os.listdir("/dev/shm") if name in n}
    with pytest.raises((ValueError, OSError)):
        open_store(f"shm://{name}?capacity={capacity}").close()
    assert {n for n in os.listdir("/dev/shm") if name in n} == before == set()
    with pytest.raises((ValueError, OSError)):
        ShmStore(name, parse_size(capacity) if capacity != "8EiB" else 8 << 60, create=True).close()
