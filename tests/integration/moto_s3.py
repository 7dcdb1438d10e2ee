"""moto's S3 server for the tests that move snapshots through ``s3://`` over real HTTP."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

_AWS_NAMES = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
]


@contextmanager
def moto_s3(bucket: str, *, endpoint_in_env: bool) -> Iterator[str]:
    """moto's S3 server over real HTTP on a free loopback port, ``bucket`` created; yields its URL.

    Test credentials go in the environment, and the endpoint too when ``endpoint_in_env``
    (processes started meanwhile inherit it); the environment is restored afterwards.
    """
    moto_server = pytest.importorskip("moto.server")
    from thaw_agents_core.store.s3 import make_client

    saved = {name: os.environ.get(name) for name in _AWS_NAMES}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for name in _AWS_NAMES[3:]:
            os.environ.pop(name, None)
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        if endpoint_in_env:
            os.environ["AWS_ENDPOINT_URL"] = url
        make_client(url).create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
